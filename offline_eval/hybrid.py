"""`hybrid`: sequential item-kNN plus time-decayed popularity (`DecayedPop`), mixed by a
weight chosen on the history's own 80/20 replay (protocol v2), never on the stream; the
popularity's half-life is chosen there first, as the `pop_online_decay` baseline's is.

The two parts live on different scales (vote sums vs log counts), so each is divided by
its row's maximum first; the weight is then "how much of the best popularity score one
best neighbour vote is worth", comparable across data sets. Every weight of the grid is
ranked from the same two parts, so choosing costs one replay of the history.

    >>> model = Hybrid()
    >>> model.fit(log.history())     # chooses model.weight, then fits on the whole history
"""

from __future__ import annotations

import torch

from offline_eval.protocol import EncodedLog, ProtocolConfig
from offline_eval.replay import grid_gains
from offline_eval.baselines import DecayedPop, ItemKNNOnline

WEIGHTS = (0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 4.0, 8.0)


class Hybrid:
    def __init__(self, weights=WEIGHTS, progress: bool = False):
        self.weights, self.progress = tuple(weights), progress
        self.weight = 0.0
        self.knn, self.pop = ItemKNNOnline(), DecayedPop()

    def fit(self, history: EncodedLog) -> None:
        pop = DecayedPop()
        pop.fit(history)  # its half-life chosen on the history's own replay, as the baseline's is
        self.weight = self._choose(history.resplit(ProtocolConfig().history_fraction), pop.half_life_s)
        if self.progress:
            print(f"  hybrid: weight {self.weight}, popularity half-life {pop.half_life_s / 3600:g} h, "
                  "chosen on the history's own replay")
        self.knn, self.pop = ItemKNNOnline(), pop
        self.knn.fit(history)

    def describe(self) -> dict:
        return {"weight": self.weight, "half_life_s": self.pop.half_life_s,
                "summary": f"popularity weight {self.weight:g}, half-life {self.pop.half_life_s / 3600:g} h, "
                           "chosen on the history's own replay"}

    def parts(self, batch: EncodedLog, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N) neighbour votes, each event's earlier batch events voting, and (N,) popularity;
        both scaled to a maximum of 1."""
        return self._scaled(self.knn.score_fresh(batch, n_items), n_items)

    def score_fresh(self, batch: EncodedLog, n_items: int) -> torch.Tensor:
        knn, pop = self.parts(batch, n_items)
        return knn + self.weight * pop

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        knn, pop = self._scaled(self.knn.score(users, n_items), n_items)
        return knn + self.weight * pop

    def _scaled(self, knn: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        pop = torch.log1p(self.pop.score(torch.zeros(1, dtype=torch.long), n_items)[0])  # the same for everyone
        return knn / knn.amax(1, keepdim=True).clamp(min=1e-12), pop / pop.max().clamp(min=1e-12)

    def update(self, batch: EncodedLog) -> None:
        self.knn.update(batch)
        self.pop.update(batch)

    def _choose(self, inner: EncodedLog, half_life_s: float, batch_size: int = 256) -> float:
        """The grid's weight with the best NDCG@10 on ``inner``'s stream (ties: the smaller)."""
        self.knn, self.pop = ItemKNNOnline(), DecayedPop(half_life_s)
        self.knn.fit(inner.history())
        self.pop.fit(inner.history())
        w = torch.tensor(self.weights).view(-1, 1, 1)

        def scores(batch: EncodedLog, n_known: int) -> torch.Tensor:
            knn, pop = self.parts(batch, n_known)
            return knn + w * pop  # (G, B, N)

        gain = grid_gains(inner, scores, self.update, batch_size)
        return self.weights[int(torch.argmax(gain))]  # argmax: the first of equal gains
