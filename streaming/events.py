"""The one interaction `Event` schema: producer, consumer, replay and `POST /events` share it.

Wire format: one UTF-8 JSON object per Kafka message, keyed by ``user_id``::

    >>> Event.from_json(b'{"user_id": "42", "item_id": "1193", "ts": 978300760}')
    Event(user_id='42', item_id='1193', ts=978300760, event_type='view', value=None)

Validation is strict and every rejection carries a reason that says what was wrong
and with which value, so a dead-letter record explains itself.

``event_type`` says what kind of feedback the event is and ``value`` a rating's stars;
`recsys.feedback` gives each kind its weight: positive kinds count as views by default, a
``dislike`` (or a rating below the threshold) masks the item for that user from then on, an
``impression`` teaches no level and keeps the item out of the user's lists for a day. An
unknown kind is a dead letter that names the kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

from features.store import is_population_key
from recsys.feedback import FEEDBACK
from recsys.log_contract import EVENT_TYPES, TS_RANGE  # the offline loader applies the same rules

MAX_PAYLOAD_BYTES = 1024
MAX_ID_CHARS = 128
_FIELDS = {"user_id", "item_id", "ts", "event_type", "value", "event_id"}
_REQUIRED = ("user_id", "item_id", "ts")


class InvalidEvent(ValueError):
    """A payload that is not a valid `Event`; ``reason`` is a short machine-usable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Event:
    """One user-item interaction at time ``ts`` (integer seconds)."""

    user_id: str
    item_id: str
    ts: int
    event_type: str = "view"
    value: float | None = None
    # The client's name for this event: a retry under the same id is applied once (the
    # stream worker remembers each user's latest ids).
    event_id: str | None = None

    def __post_init__(self) -> None:
        _check_id("user_id", self.user_id)
        _check_id("item_id", self.item_id)
        if self.event_id is not None:
            _check_id("event_id", self.event_id)
        if type(self.ts) is not int:
            raise InvalidEvent("wrong_type", f"ts must be an integer number of seconds, got {self.ts!r}")
        if not TS_RANGE[0] <= self.ts < TS_RANGE[1]:
            raise InvalidEvent(
                "ts_out_of_range",
                f"ts={self.ts} is outside [{TS_RANGE[0]}, {TS_RANGE[1]}): send seconds since the epoch",
            )
        if self.event_type not in EVENT_TYPES:
            raise InvalidEvent("bad_event_type", f"event_type={self.event_type!r}, expected one of {EVENT_TYPES}")
        if self.value is not None and not (isinstance(self.value, float) and math.isfinite(self.value)):
            raise InvalidEvent("wrong_type", f"value must be a finite number or null, got {self.value!r}")

    @classmethod
    def from_dict(cls, obj: object) -> Event:
        if not isinstance(obj, dict):
            raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        missing = [f for f in _REQUIRED if f not in obj]
        if missing:
            raise InvalidEvent("missing_field", f"missing {', '.join(missing)}")
        unknown = sorted(set(obj) - _FIELDS)
        if unknown:
            raise InvalidEvent("unknown_field", f"unexpected {', '.join(unknown)}; allowed: {sorted(_FIELDS)}")
        value = obj.get("value")
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        return cls(
            user_id=_id_str("user_id", obj["user_id"]),
            item_id=_id_str("item_id", obj["item_id"]),
            ts=_ts_int(obj["ts"]),
            event_type=obj.get("event_type", "view"),
            value=value,
            event_id=obj.get("event_id"),
        )

    @classmethod
    def from_json(cls, payload: bytes | str) -> Event:
        if isinstance(payload, str):
            payload = payload.encode()
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise InvalidEvent("oversized", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
        try:
            obj = json.loads(payload.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidEvent("not_utf8", str(e)) from None
        except json.JSONDecodeError as e:
            raise InvalidEvent("not_json", str(e)) from None
        return cls.from_dict(obj)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def decode(payload: bytes) -> Event | InvalidEvent:
    """Decode one message, returning the rejection instead of raising (for batch loops)."""
    try:
        return Event.from_json(payload)
    except InvalidEvent as e:
        return e


def decode_fields(payload: bytes) -> tuple[str, str, int, str | None, float] | InvalidEvent:
    """``(user_id, item_id, ts, event_id, feedback weight)`` of a valid message, or its rejection: the stream worker's
    hot path. The common well-formed message is checked inline, without building an
    `Event` (a quarter of the per-event cost otherwise); anything unusual goes through
    `decode`, so what is accepted and every rejection reason are exactly the schema's
    (tests/test_events.py checks the two agree)."""
    if len(payload) <= MAX_PAYLOAD_BYTES:
        try:
            obj = json.loads(payload.decode("utf-8"))
        except ValueError:  # not UTF-8 or not JSON: `decode` names which
            obj = None
        if type(obj) is dict and obj.keys() <= _FIELDS:
            u, i, ts, e = obj.get("user_id"), obj.get("item_id"), obj.get("ts"), obj.get("event_id")
            u = str(u) if type(u) is int else u
            i = str(i) if type(i) is int else i
            if (type(u) is str and type(i) is str and type(ts) is int and TS_RANGE[0] <= ts < TS_RANGE[1]
                    and 0 < len(u) <= MAX_ID_CHARS and u.strip() == u and 0 < len(i) <= MAX_ID_CHARS
                    and i.strip() == i and u.isprintable() and i.isprintable() and not is_population_key(u)
                    and obj.get("event_type", "view") in EVENT_TYPES
                    and _plain_value(obj.get("value")) and e is None):
                return u, i, ts, None, FEEDBACK.weight(obj.get("event_type", "view"), obj.get("value"))
    ev = decode(payload)  # event ids take this path: only clients that retry send them
    if isinstance(ev, InvalidEvent):
        return ev
    return ev.user_id, ev.item_id, ev.ts, ev.event_id, FEEDBACK.weight(ev.event_type, ev.value)


def _plain_value(v: object) -> bool:
    return v is None or (type(v) in (int, float) and math.isfinite(v))


def _id_str(name: str, raw: object) -> str:
    # Integer ids (MovieLens) are accepted and canonicalised to their decimal string.
    if isinstance(raw, int) and not isinstance(raw, bool):
        return str(raw)
    if not isinstance(raw, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string or integer, got {raw!r}")
    return raw


def _ts_int(raw: object) -> int:
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise InvalidEvent("wrong_type", f"ts must be an integer number of seconds, got {raw!r}")
    return raw


def _check_id(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidEvent("wrong_type", f"{name} must be a string, got {value!r}")
    if not 0 < len(value) <= MAX_ID_CHARS or value.strip() != value:
        raise InvalidEvent("bad_id", f"{name}={value!r} must be 1..{MAX_ID_CHARS} chars without surrounding spaces")
    if not value.isprintable():  # control characters (NUL, newlines) and bidi overrides hide what an id is
        raise InvalidEvent("bad_id", f"{name}={value!r} holds control or formatting characters")
    if name == "user_id" and is_population_key(value):
        raise InvalidEvent("reserved_id", f"user_id={value!r} is reserved for the system's own rows")
