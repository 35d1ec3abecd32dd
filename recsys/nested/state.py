"""The fast state, a value: every fast level's tensors, user rows and the population's.

    >>> state = empty_state(cfg, n_users=100, n_items=cfg.n_items)
    >>> state = grow_state(state, n_users=120, n_items=cfg.n_items + 5)   # new users and items, online

`NestedModel.update` returns a new state and leaves its input as it was, unless the caller
donates it (`recsys/nested/model.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch

from recsys.association import AssociationLevel
from recsys.rows import grow
from recsys.nested.config import NestedConfig

USER_FIELDS = ("M", "S", "last", "last_ts", "mid", "acc", "cnt", "recent", "negative", "shown", "shown_ts")  # per user
ITEM_FIELDS = ("recent", "negative", "shown")  # the user fields that hold item indices
# The association level's tensors (`recsys.association.AssociationLevel`), by the same names
ASSOCIATION_FIELDS = ("assoc_ids", "assoc_weights", "assoc_out", "assoc_into", "assoc_clock")
POPULATION_FIELDS = ("pop", "pop_acc", "pop_events", "pop_ts", *ASSOCIATION_FIELDS)  # shared by everyone


@dataclass
class FastState:
    """Everything the fast levels know; rows are users (internal index), plus the population."""

    M: torch.Tensor  # (U, m, m) user-fast associative memory
    S: torch.Tensor  # (U, m, m) its momentum ("surprise")
    last: torch.Tensor  # (U, D) embedding of the user's latest item (the query context)
    last_ts: torch.Tensor  # (U,) int64, -1 = no event yet
    mid: torch.Tensor  # (U, D) user-mid adapter
    acc: torch.Tensor  # (U, D) user-mid gradient accumulated over the current chunk
    cnt: torch.Tensor  # (U,) int64 events of the user applied in total
    recent: torch.Tensor  # (U, R) int64 the user's latest R item indices, oldest first, -1 = empty
    negative: torch.Tensor  # (U, X) int64 the latest X items the user said no to (`negative`), -1 = empty
    shown: torch.Tensor  # (U, Y) int64 the latest Y items shown to the user (impressions), -1 = empty
    shown_ts: torch.Tensor  # (U, Y) int64 when each was shown
    pop: torch.Tensor  # (N, speeds) population-fast decayed item counts (at the last chunk end)
    pop_acc: torch.Tensor  # (N, 1) counts of the current, unfinished population chunk (event clock only)
    pop_events: torch.Tensor  # () int64 global events applied
    pop_ts: torch.Tensor  # () int64 the level's clock: its latest event's time (-1: none yet)
    # The population association level: each item's strongest successors (N, S), their decayed
    # weights (N, S, V), each item's outgoing and incoming weight (N, V), its clock (); a model
    # without the level holds S = V = 0.
    assoc_ids: torch.Tensor
    assoc_weights: torch.Tensor
    assoc_out: torch.Tensor
    assoc_into: torch.Tensor
    assoc_clock: torch.Tensor

    def to(self, device) -> FastState:
        return FastState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def clone(self) -> FastState:
        return FastState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def user_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-user fields of ``rows`` (for checkpoints split by owner)."""
        return {name: getattr(self, name)[rows] for name in USER_FIELDS}

    def take(self, rows: torch.Tensor) -> FastState:
        """A copy holding only ``rows`` (as rows 0..len-1) and the population level: the model
        can run ahead on it without touching this state."""
        population = {name: getattr(self, name).clone() for name in POPULATION_FIELDS}
        return FastState(**self.user_rows(rows), **population)

    def with_user_rows(self, users: dict[str, torch.Tensor]) -> FastState:
        """This state's population level with exactly the given user rows."""
        return replace(self, **users)

    def put_user_rows(self, rows: torch.Tensor, users: dict[str, torch.Tensor]) -> None:
        """Write ``users`` (named as `user_rows` names them) into ``rows``, in place: the state's
        owner (a stream worker restoring rows it takes over) has no other holder to surprise."""
        for name, value in users.items():
            getattr(self, name)[rows] = value.to(getattr(self, name).device)

    def row_shapes(self) -> dict[str, tuple[int, ...]]:
        """One user row's shape per field: what a checkpoint's rows must match."""
        return {name: tuple(getattr(self, name).shape[1:]) for name in USER_FIELDS}

    @staticmethod
    def renumber_items(users: dict[str, torch.Tensor], remap: torch.Tensor) -> dict[str, torch.Tensor]:
        """User rows whose item indices (the latest items) go through ``remap`` (old index → new;
        -1 stays -1): rows from another worker's numbering of the items first seen online."""
        out = dict(users)
        for name in ITEM_FIELDS:
            if name in out:
                out[name] = torch.where(out[name] >= 0, remap[out[name].clamp(min=0)], -1)
        return out

    def split_items(self, users: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """User rows → (their fields but the item indices, (U, R + X) the indices of their latest
        items, then of their negative ones): the part a row stored outside the worker must name by id."""
        fields = {k: v for k, v in users.items() if k not in ITEM_FIELDS}
        return fields, torch.cat([users[name] for name in ITEM_FIELDS], -1)

    def join_items(self, fields: dict[str, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
        """`split_items` undone. A row stored before kinds of feedback existed holds the latest
        items only: its negative and shown items are none."""
        out, at = dict(fields), 0
        for name in ITEM_FIELDS:
            width = getattr(self, name).shape[1]
            part = items[:, at:at + width]
            out[name] = part if part.shape[1] == width else torch.full((len(items), width), -1, dtype=items.dtype)
            at += width
        if "shown_ts" not in out:
            out["shown_ts"] = torch.full_like(out["shown"], -1)
        return out

    # -- the population level, as a worker keeps one per partition ------------------------------
    def population(self) -> dict[str, torch.Tensor]:
        """The population level's tensors by name (a checkpoint's part per partition)."""
        return {name: getattr(self, name) for name in POPULATION_FIELDS}

    def with_population(self, level: dict[str, torch.Tensor], remap: torch.Tensor | None = None) -> FastState:
        """This state with the population level ``level`` (as `population` names it); ``remap``:
        its item counts re-indexed old → new, counts of items that map to -1 left out."""
        level = dict(level)
        if remap is not None:
            if "assoc_ids" in level:
                level |= _renumbered_association(level, remap, len(self.pop))
            for name in ("pop", "pop_acc"):
                value = level[name]
                n = min(len(value), len(remap))  # a level may hold spare capacity past its items
                named = remap[:n] >= 0
                level[name] = value.new_zeros(len(self.pop), *value.shape[1:]).index_add_(
                    0, remap[:n][named], value[:n][named])
        return replace(self, **{k: v.to(self.pop.device) for k, v in level.items()})

    def association(self) -> AssociationLevel:
        """The population association level, as a value (`recsys.association`)."""
        return AssociationLevel(*(getattr(self, name) for name in ASSOCIATION_FIELDS))

    def with_association(self, level: AssociationLevel) -> FastState:
        return replace(self, **level.tensors())

    def level_counts(self) -> torch.Tensor:
        """(N, speeds) the population level's counts (as of `level_clock`)."""
        return self.pop

    def level_events(self) -> int:
        """Events the population level has applied."""
        return int(self.pop_events)

    def level_clock(self) -> int:
        """The population level's clock: its latest event's time (-1: none yet)."""
        return int(self.pop_ts)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def latest_items(self, rows: torch.Tensor) -> torch.Tensor:
        """(U, R) the rows' latest item indices, oldest first (-1: none)."""
        return self.recent[rows]

    def turned_down(self, rows: torch.Tensor, now, window_s: float) -> torch.Tensor:
        """(U, X + Y) what the rows' users turned down as of ``now`` ((U,) or one time; -1: none):
        what they said no to, and what they were shown less than ``window_s`` before it."""
        fresh = (now.reshape(-1, 1) if torch.is_tensor(now) else now) - self.shown_ts[rows] < window_s
        shown = torch.where(fresh & (self.shown_ts[rows] >= 0), self.shown[rows], -1)
        return torch.cat([self.negative[rows], shown], 1)

    def masked_items(self, rows: torch.Tensor, window_s: float) -> torch.Tensor:
        """(U, R + X + Y) what serving masks for each row's user (-1: none): their latest items,
        and what they turned down as of their latest event."""
        return torch.cat([self.recent[rows], self.turned_down(rows, self.last_ts[rows], window_s)], 1)

    def events(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) events applied to each row in total."""
        return self.cnt[rows]

    def last_event_ts(self, rows: torch.Tensor) -> torch.Tensor:
        """(U,) each row's latest event time (-1: none yet)."""
        return self.last_ts[rows]

    @property
    def device(self) -> torch.device:
        return self.cnt.device

    @property
    def n_users(self) -> int:
        """User rows held (spare capacity from amortised growth included)."""
        return len(self.cnt)

    def clock(self) -> torch.Tensor:
        """() the time of the latest event applied: the same offline and online."""
        return self.last_ts.max()

    def absent_s(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) seconds from each user's latest event to the clock."""
        return self.clock() - self.last_ts[users]


def _renumbered_association(level: dict[str, torch.Tensor], remap: torch.Tensor, n_items: int) -> dict:
    """An association level's tensors with item indices old → new (the rows and successors of
    items that map to -1 left out), over ``n_items`` rows."""
    n = min(len(level["assoc_ids"]), len(remap))
    keep = remap[:n] >= 0
    dest = remap[:n][keep]
    ids, weights, out, into = (level[k][:n][keep] for k in ("assoc_ids", "assoc_weights", "assoc_out", "assoc_into"))
    named = (ids >= 0) & (ids < len(remap))
    ids = torch.where(named, remap[ids.clamp(min=0, max=len(remap) - 1)], -1)

    def place(value: torch.Tensor, fill=0) -> torch.Tensor:
        return value.new_full((n_items, *value.shape[1:]), fill).index_copy_(0, dest, value)

    return {"assoc_ids": place(ids, -1), "assoc_weights": place(weights * (ids >= 0).unsqueeze(-1)),
            "assoc_out": place(out), "assoc_into": place(into)}


class Reads(NamedTuple):
    """Each event's user just before the event, in event order."""

    z: torch.Tensor  # (B, D) user vector (the levels combined, as `user_vectors`)
    last_ts: torch.Tensor  # (B,) time of the user's previous event, -1 = none


def empty_state(cfg: NestedConfig, n_users: int, n_items: int, device=None, dtype=torch.float32) -> FastState:
    D, m = cfg.dim, cfg.mem_dim
    z = lambda *s, dtype=dtype: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    return FastState(M=z(n_users, m, m), S=z(n_users, m, m), last=z(n_users, D),
                     last_ts=torch.full((n_users,), -1, dtype=torch.int64, device=device),
                     mid=z(n_users, D), acc=z(n_users, D), cnt=z(n_users, dtype=torch.int64),
                     recent=torch.full((n_users, cfg.recent_items), -1, dtype=torch.int64, device=device),
                     negative=torch.full((n_users, cfg.negative_items), -1, dtype=torch.int64, device=device),
                     shown=torch.full((n_users, cfg.shown_items), -1, dtype=torch.int64, device=device),
                     shown_ts=torch.full((n_users, cfg.shown_items), -1, dtype=torch.int64, device=device),
                     pop=z(n_items, cfg.pop_levels()), pop_acc=z(n_items, 1),
                     pop_events=z((), dtype=torch.int64),
                     pop_ts=torch.full((), -1, dtype=torch.int64, device=device),
                     **empty_association(cfg, n_items, device, dtype))


def empty_association(cfg: NestedConfig, n_items: int, device=None, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """An empty association level's tensors: S slots, V speeds (both 0 for a model without one)."""
    S, V = (cfg.assoc_slots, len(cfg.assoc_half_lives_s)) if cfg.association else (0, 0)
    return {"assoc_ids": torch.full((n_items, S), -1, dtype=torch.int64, device=device),
            "assoc_weights": torch.zeros(n_items, S, V, dtype=dtype, device=device),
            "assoc_out": torch.zeros(n_items, V, dtype=dtype, device=device),
            "assoc_into": torch.zeros(n_items, V, dtype=dtype, device=device),
            "assoc_clock": torch.full((), -1, dtype=torch.int64, device=device)}


def grow_state(state: FastState, n_users: int, n_items: int) -> FastState:
    """New users and items get empty state rows, online, without a restart."""
    out = {}
    for f in fields(state):
        t = getattr(state, f.name)
        if f.name in ("pop", "pop_acc", "assoc_weights", "assoc_out", "assoc_into"):
            out[f.name] = grow(t, n_items)
        elif f.name == "assoc_ids":
            out[f.name] = grow(t, n_items, fill=-1)
        elif f.name in ("pop_events", "pop_ts", "assoc_clock"):
            out[f.name] = t
        else:
            out[f.name] = grow(t, n_users, fill=-1 if f.name in ("last_ts", "shown_ts", *ITEM_FIELDS) else 0)
    return FastState(**out)


def save_state(state: FastState, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.tensors().items()}, str(path))


def load_state(path) -> FastState:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    widths = {"negative": NestedConfig.negative_items, "shown": NestedConfig.shown_items,
              "shown_ts": NestedConfig.shown_items}
    for name, width in widths.items():  # saved before kinds of feedback: no user has said no or been shown anything
        tensors.setdefault(name, torch.full((len(tensors["cnt"]), width), -1, dtype=torch.int64))
    if "assoc_ids" not in tensors:  # saved before the association level: a model without one
        tensors |= empty_association(NestedConfig(), len(tensors["pop"]), dtype=tensors["pop"].dtype)
    return FastState(**tensors)
