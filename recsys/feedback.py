"""What each kind of feedback means to the model: the one place a kind gets its weight.

    >>> FEEDBACK.weight("purchase"), FEEDBACK.weight("dislike"), FEEDBACK.weight("rating", 2.0)
    (1.0, -1.0, -1.0)

A weight above 0 is a positive event of that strength: the levels learn from it and the
population counts it that much. Below 0 a negative one: the user said no, so the item is
masked for them from then on (it is part of their row, `FastState.negative`) and no level
takes credit from it. 0 is an impression (shown, nothing done): no level learns from it, and
the item is kept out of the user's lists for a while (`NestedConfig.impression_window_s`).

A log or a stream without kinds is all ``view`` (weight 1): the model then does exactly
what it did before kinds existed, and the replay treats every event as a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FeedbackConfig:
    """Kinds and their weights; a user changes them here (and in docs/data.md's table)."""

    # Every positive kind counts as a view by default: weighting purchases 3× in the population
    # counts cost 11 % NDCG@10 on the synthetic log with kinds (purchases only: 0.0670 vs 0.0751),
    # as the counts' scale is what the mix was calibrated on. Set a weight here to try one.
    positive: dict[str, float] = field(default_factory=lambda: {
        "view": 1.0, "click": 1.0, "rating": 1.0, "like": 1.0, "cart": 1.0, "purchase": 1.0})
    negative: tuple[str, ...] = ("dislike", "skip", "not_interested")
    impression: str = "impression"
    # A `rating` below this value is a negative event (ML-1M's scale: 1–2 stars say no).
    rating_threshold: float = 3.0

    @property
    def kinds(self) -> tuple[str, ...]:
        """Every kind the schema accepts, in a stable order."""
        return (*self.positive, *self.negative, self.impression)

    def weight(self, kind: str, value: float | None = None) -> float:
        if kind in self.negative:
            return -1.0
        if kind == self.impression:
            return 0.0
        if kind == "rating" and value is not None and value < self.rating_threshold:
            return -1.0
        return self.positive[kind]

    def weights(self, kinds, values=None) -> np.ndarray:
        """(N,) kinds (and ratings' values; NaN or None: none) → (N,) float32 weights."""
        kinds = np.asarray(kinds, dtype=object)
        table = {k: self.weight(k) for k in self.kinds}
        out = np.fromiter((table[k] for k in kinds), dtype=np.float32, count=len(kinds))
        if values is not None:
            v = np.asarray(values, dtype=np.float64)
            out[(kinds == "rating") & (v < self.rating_threshold)] = -1.0  # NaN compares False: no value, positive
        return out


FEEDBACK = FeedbackConfig()
EVENT_KINDS = FEEDBACK.kinds


def is_plain(weights: np.ndarray | None) -> bool:
    """Whether these weights are today's implicit log (every event a view): then no weights
    are passed on, and every path does exactly what it did before kinds."""
    return weights is None or bool((np.asarray(weights) == 1.0).all())
