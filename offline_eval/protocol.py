"""The split and encoding of EVAL_PROTOCOL.md: a time-ordered log → history + stream.

Ids are renumbered **by first appearance** in the time-ordered log. So the items
known before stream batch ``b`` are exactly the indices ``[0, n_known)``, with
``n_known`` one past the largest index seen so far: a model is handed ``n_known``
and cannot see an item before its first event, and an event whose item index is
``>= n_known`` is a first sighting (a miss, by the protocol).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from recsys.dataset import HISTORY_FRACTION, Dataset
from recsys.feedback import FEEDBACK, is_plain


@dataclass(frozen=True)
class ProtocolConfig:
    batch_size: int = 256
    ks: tuple[int, ...] = (10, 20, 50)
    seen_filter: bool = True
    history_fraction: float = HISTORY_FRACTION
    slices: int = 10
    # "event" (version 2, the headline): each event ranked from its user's state after every
    # earlier event of theirs, this batch's included. "batch" (version 1): from the batch start.
    user_freshness: str = "event"

    @property
    def version(self) -> int:
        return 2 if self.user_freshness == "event" else 1

    def __post_init__(self) -> None:
        if self.user_freshness not in ("event", "batch"):
            raise ValueError(f"user_freshness must be 'event' or 'batch', got {self.user_freshness!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 < self.history_fraction < 1:
            raise ValueError(f"history_fraction must be in (0, 1), got {self.history_fraction}")


@dataclass(frozen=True)
class EncodedLog:
    """A time-ordered log with dense ids; ``users[:n_history]`` is the history."""

    users: np.ndarray  # (N,) int64, dense by first appearance
    items: np.ndarray  # (N,) int64, dense by first appearance
    ts: np.ndarray  # (N,) int64 seconds
    n_history: int
    user_ids: np.ndarray  # dense index -> original id
    item_ids: np.ndarray
    # (N,) float32 each event's feedback weight (`recsys.feedback`: > 0 positive, < 0 negative,
    # 0 an impression); None: a log without kinds, every event a positive target.
    weight: np.ndarray | None = None

    @property
    def n_events(self) -> int:
        return len(self.users)

    def history(self) -> EncodedLog:
        return self.slice(0, self.n_history)

    def slice(self, lo: int, hi: int) -> EncodedLog:
        return EncodedLog(self.users[lo:hi], self.items[lo:hi], self.ts[lo:hi], max(0, min(hi, self.n_history) - lo),
                          self.user_ids, self.item_ids, None if self.weight is None else self.weight[lo:hi])

    def targets(self) -> np.ndarray:
        """(N,) bool: the events a model is scored on, the positive ones (all, without kinds)."""
        return np.ones(self.n_events, dtype=bool) if self.weight is None else self.weight > 0

    def select(self, keep: np.ndarray) -> EncodedLog:
        """Only the events ``keep`` marks (the history split kept where it falls)."""
        return EncodedLog(self.users[keep], self.items[keep], self.ts[keep], int(keep[:self.n_history].sum()),
                          self.user_ids, self.item_ids, None if self.weight is None else self.weight[keep])

    def revealed(self, feedback: str) -> EncodedLog:
        """What a model is shown (its ``feedback`` attribute): ``"kinds"`` every event with its
        weight; ``"positives"`` the positive events alone (a kind-blind model, which would take
        a "no" for a "yes"); ``"views"`` every event as a view (the ablation of kinds)."""
        if feedback == "kinds" or self.weight is None:
            return self
        if feedback == "positives":
            return replace(self.select(self.targets()), weight=None)
        if feedback == "views":
            return replace(self, weight=None)
        raise ValueError(f"feedback must be 'kinds', 'positives' or 'views', got {feedback!r}")

    def resplit(self, history_fraction: float) -> EncodedLog:
        """The same events split anew: the history's own replay (settings chosen on it see no stream)."""
        return replace(self, n_history=int(np.floor(history_fraction * self.n_events)))

    @property
    def n_users_known(self) -> int:
        return int(self.users.max()) + 1 if len(self.users) else 0

    @property
    def n_items_known(self) -> int:
        return int(self.items.max()) + 1 if len(self.items) else 0


def _first_appearance_codes(col: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    uniques = col.unique(maintain_order=True)  # order of first appearance
    codes = col.replace_strict(uniques, pl.Series(np.arange(len(uniques))), return_dtype=pl.Int64)
    return codes.to_numpy().copy(), uniques.to_numpy().copy()  # writable, so torch can share them


def encode(ds: Dataset, cfg: ProtocolConfig = ProtocolConfig()) -> EncodedLog:
    inter = ds.interactions.sort("ts", maintain_order=True)  # ties keep file order
    users, user_ids = _first_appearance_codes(inter["user_id"])
    items, item_ids = _first_appearance_codes(inter["item_id"])
    n_history = int(np.floor(cfg.history_fraction * inter.height))
    return EncodedLog(users, items, inter["ts"].to_numpy().astype(np.int64, copy=True), n_history, user_ids, item_ids,
                      feedback_weights(inter))


def feedback_weights(inter: pl.DataFrame) -> np.ndarray | None:
    """Each event's feedback weight from the log's ``event_type`` (and ``value``) columns; None
    for a log without kinds, or whose kinds are all plain views (the replay is then as before)."""
    if "event_type" not in inter.columns:
        return None
    kinds = inter["event_type"].fill_null("view").to_numpy()
    values = inter["value"].cast(pl.Float64).fill_null(float("nan")).to_numpy() if "value" in inter.columns else None
    weight = FEEDBACK.weights(kinds, values)
    return None if is_plain(weight) else weight
