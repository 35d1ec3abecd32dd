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

from recsys.rows import grow
from recsys.nested.config import NestedConfig

USER_FIELDS = ("M", "S", "last", "last_ts", "mid", "acc", "cnt", "recent")  # one row per user
POPULATION_FIELDS = ("pop", "pop_acc", "pop_events", "pop_ts")  # shared by everyone


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
    pop: torch.Tensor  # (N, speeds) population-fast decayed item counts (at the last chunk end)
    pop_acc: torch.Tensor  # (N, 1) counts of the current, unfinished population chunk (event clock only)
    pop_events: torch.Tensor  # () int64 global events applied
    pop_ts: torch.Tensor  # () int64 the level's clock: its latest event's time (-1: none yet)

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

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clock(self) -> torch.Tensor:
        """() the time of the latest event applied: the same offline and online."""
        return self.last_ts.max()

    def absent_s(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) seconds from each user's latest event to the clock."""
        return self.clock() - self.last_ts[users]


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
                     pop=z(n_items, cfg.pop_levels()), pop_acc=z(n_items, 1),
                     pop_events=z((), dtype=torch.int64),
                     pop_ts=torch.full((), -1, dtype=torch.int64, device=device))


def grow_state(state: FastState, n_users: int, n_items: int) -> FastState:
    """New users and items get empty state rows, online, without a restart."""
    out = {}
    for f in fields(state):
        t = getattr(state, f.name)
        if f.name in ("pop", "pop_acc"):
            out[f.name] = grow(t, n_items)
        elif f.name in ("pop_events", "pop_ts"):
            out[f.name] = t
        else:
            out[f.name] = grow(t, n_users, fill=-1 if f.name in ("last_ts", "recent") else 0)
    return FastState(**out)


def save_state(state: FastState, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.tensors().items()}, str(path))


def load_state(path) -> FastState:
    from safetensors.torch import load_file

    return FastState(**load_file(str(path)))
