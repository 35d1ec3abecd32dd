"""What serving needs of the fast state: the value a stream worker hands its push to the
online store, so the push needs no model and names no state field.

    >>> view = ServingView(model, state, user_ids, levels)   # references: cheap per push
    >>> rows = view.users([3, 17])       # vectors, events, masked items, last event times
    >>> level = view.level(partition)    # a partition's partial counts and its clock
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from recsys.nested.state import FastState


class UserRowsView(NamedTuple):
    ids: list[str]
    vectors: np.ndarray  # (U, D) float32 user vectors: what serving scores with
    events: np.ndarray  # (U,) events applied to each user in total
    masked: list[np.ndarray]  # each user's latest items and those they turned down: not served to them
    last_ts: np.ndarray  # (U,) each user's latest event time


class LevelView(NamedTuple):
    counts: np.ndarray  # (N · speeds,) float32 the partition's partial counts, item-major
    events: int
    clock: int  # the time its counts are as of


@dataclass(frozen=True)
class ServingView:
    model: object  # the NestedModel whose levels read the state (user vectors)
    state: FastState  # the worker's user rows
    user_ids: object  # a `Vocab`: row -> user id
    levels: dict[int, FastState]  # owned partition -> its population level

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def partitions(self) -> set[int]:
        return set(self.levels)

    def users(self, rows: list[int]) -> UserRowsView:
        index = torch.tensor(rows, dtype=torch.int64, device=self.state.device)
        masked = self.state.masked_items(index, self.model.cfg.impression_window_s).cpu().numpy()
        with torch.no_grad():
            vectors = self.model.read_users(self.state, index).float().cpu().numpy() if rows else np.zeros((0, 0))
        return UserRowsView([self.user_ids.ids[r] for r in rows], vectors, self.state.events(index).cpu().numpy(),
                            [r[r >= 0] for r in masked],
                            self.state.last_event_ts(index).cpu().numpy())

    def level(self, partition: int) -> LevelView:
        level = self.levels[partition]
        return LevelView(level.level_counts().float().cpu().numpy().ravel(), level.level_events(), level.level_clock())
