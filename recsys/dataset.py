"""The one type every interaction log is loaded into (recsys/datasets.py loads the real
ones, recsys/synthetic.py generates one)."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

# The replay protocol's split (EVAL_PROTOCOL.md): the first 80 % of the time-ordered events
# are the history — all that training, features and baselines' settings may read.
HISTORY_FRACTION = 0.8


@dataclass
class Dataset:
    """An interaction log plus optional side features and a checksum of its source."""

    name: str
    interactions: pl.DataFrame  # user_id, item_id, ts (time-ordered)
    users: pl.DataFrame | None = None  # user_id + categorical columns
    items: pl.DataFrame | None = None  # item_id + categorical columns
    sha256: str = ""
    extra: dict = field(default_factory=dict)  # ground truth of a synthetic set, ...

    @property
    def n_events(self) -> int:
        return self.interactions.height
