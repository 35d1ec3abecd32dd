import json

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.feedback import FEEDBACK
from streaming.events import MAX_PAYLOAD_BYTES, Event, InvalidEvent, decode, decode_fields


def test_round_trip_through_json():
    e = Event(user_id="42", item_id="1193", ts=978300760, event_type="rating", value=5.0)
    assert Event.from_json(e.to_json()) == e


def test_an_event_id_travels_with_the_event_and_is_checked_like_any_id():
    e = Event.from_json(b'{"user_id": "1", "item_id": "2", "ts": 1000, "event_id": "c0ffee-1"}')
    assert e.event_id == "c0ffee-1" and Event.from_json(e.to_json()) == e
    assert decode_fields(e.to_json()) == ("1", "2", 1000, "c0ffee-1", 1.0)
    assert decode(b'{"user_id": "1", "item_id": "2", "ts": 1000, "event_id": ""}').reason == "bad_id"


@pytest.mark.parametrize("kind, value, weight", [
    ("view", None, 1.0), ("purchase", None, FEEDBACK.positive["purchase"]), ("dislike", None, -1.0), ("impression", None, 0.0),
    ("rating", 5.0, 1.0), ("rating", 2.0, -1.0), ("rating", None, 1.0)])
def test_each_kind_of_feedback_reaches_the_worker_with_its_weight(kind, value, weight):
    payload = Event(user_id="1", item_id="2", ts=1000, event_type=kind, value=value).to_json()
    assert decode_fields(payload)[-1] == weight


def test_integer_ids_become_strings_and_defaults_apply():
    e = Event.from_json(b'{"user_id": 42, "item_id": 7, "ts": 978300760}')
    assert (e.user_id, e.item_id, e.event_type, e.value) == ("42", "7", "view", None)


@pytest.mark.parametrize("payload, reason", [
    (b'{"user_id": "1", "ts": 1000}', "missing_field"),
    (b'{"user_id": "1", "item_id": "2", "ts": "yesterday"}', "wrong_type"),
    (b'{"user_id": [1], "item_id": "2", "ts": 1000}', "wrong_type"),
    (b'{"user_id": "1", "item_id": "2", "ts": true}', "wrong_type"),
    (b'{"user_id": "1", "item_id": "2", "ts": 1000, "value": "high"}', "wrong_type"),
    (b'{"user_id": "1", "item_id": "2", "ts": 1700000000000}', "ts_out_of_range"),
    (b'{"user_id": "1", "item_id": "2", "ts": -5}', "ts_out_of_range"),
    (b'{"user_id": "", "item_id": "2", "ts": 1000}', "bad_id"),
    (b'{"user_id": "a\\u0000b", "item_id": "2", "ts": 1000}', "bad_id"),
    (b'{"user_id": "1", "item_id": "evil\\u202egpj.exe", "ts": 1000}', "bad_id"),
    (b'{"user_id": "__population__", "item_id": "2", "ts": 1000}', "reserved_id"),
    (b'{"user_id": "1", "item_id": "2", "ts": 1000, "event_type": "teleport"}', "bad_event_type"),
    (b'{"user_id": "1", "item_id": "2", "ts": 1000, "colour": "red"}', "unknown_field"),
    (b'[1, 2, 3]', "not_an_object"),
    (b'{"user_id": "1", "item_id": ', "not_json"),
    (b'\xff\xfe{"user_id"}', "not_utf8"),
    (b'{"user_id": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}', "oversized"),
])
def test_every_rejection_has_its_reason(payload, reason):
    with pytest.raises(InvalidEvent) as info:
        Event.from_json(payload)
    assert info.value.reason == reason
    assert info.value.detail  # a human-readable explanation travels with the reason
    assert decode(payload).reason == reason  # the non-raising form used in batch loops
    assert decode_fields(payload).reason == reason  # the worker's fast path


_ids = ["view", "rating", " 7", "7 ", "", "x" * 129, "a\x00b", "\u202ex", "__population__"]
_values = st.one_of(st.none(), st.booleans(), st.integers(-10, 5_000_000_000), st.floats(allow_nan=True),
                    st.text(max_size=6), st.sampled_from(_ids))


@settings(max_examples=400, deadline=None)
@given(obj=st.dictionaries(st.sampled_from(["user_id", "item_id", "ts", "event_type", "value", "event_id", "colour"]),
                           _values, max_size=6))
def test_the_fast_path_accepts_and_rejects_exactly_as_the_schema(obj):
    payload = json.dumps(obj).encode()
    want, got = decode(payload), decode_fields(payload)
    if isinstance(want, InvalidEvent):
        assert isinstance(got, InvalidEvent) and got.reason == want.reason
    else:
        assert got == (want.user_id, want.item_id, want.ts, want.event_id, FEEDBACK.weight(want.event_type, want.value))


def test_wire_encoding_of_a_frame_matches_the_schema():
    import polars as pl

    from streaming.producer import encode_frame

    frame = pl.DataFrame({"user_id": [1, 2], "item_id": [10, 20], "ts": [1000, 2000]})
    wire = encode_frame(frame)
    decoded = [Event.from_json(v.encode()) for v in wire["value"]]
    assert decoded == [Event("1", "10", 1000), Event("2", "20", 2000)]
    assert json.loads(wire["value"][0]) == Event("1", "10", 1000).to_dict()
    assert wire["key"].to_list() == ["1", "2"]
