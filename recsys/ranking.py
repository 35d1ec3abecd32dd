"""Ranking a stream event's target among the candidates, shared by the replay protocol
(offline_eval/) and the model's calibration on the history (recsys/calibration.py), so the
setting chosen in training is scored exactly as the report scores it.

    >>> ranks_of_targets(torch.tensor([[0.1, 0.9, 0.5]]), torch.tensor([2]), exclude=None)
    tensor([2.], dtype=torch.float64)
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.batch_users import earlier_marked


def ranks_of_targets(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None) -> torch.Tensor:
    """1-based rank of each target among the non-excluded candidates (pessimistic on ties).

    scores: (B, N) over the known items; targets: (B,) item index, ``>= N`` for an item
    not known yet; exclude: (B, N) bool, True where an item is not a candidate.
    Ties count against the target (it ranks below every equal score), so a model
    cannot gain from constant scores.
    """
    B, N = scores.shape
    scores = torch.nan_to_num(scores.float(), nan=float("-inf"), neginf=float("-inf"))  # filtered stays filtered
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    known = targets < N
    t_idx = targets.clamp(max=N - 1).unsqueeze(1)  # (B, 1)
    t_score = scores.gather(1, t_idx)  # (B, 1)
    ahead = (scores >= t_score).sum(1, dtype=torch.int32) - 1  # ties count against the target; minus itself
    excluded = (torch.isinf(t_score) & (t_score < 0)).squeeze(1)
    return torch.where(known & ~excluded, ahead.double() + 1, torch.full((B,), float("inf"), dtype=torch.float64))


def grid_ndcg(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(G, B, N) scores of ``G`` candidate settings for the same ``B`` events → (G, B) float64
    NDCG@k of each setting on each event: how calibration and tuning pick a setting in one pass."""
    G = scores.shape[0]
    ranks = ranks_of_targets(scores.flatten(0, 1), targets.repeat(G), None).view(G, -1)
    return torch.where(ranks <= k, 1 / torch.log2(ranks + 1), 0.0)  # misses rank inf


def grid_ndcg_sums(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> torch.Tensor:
    """`grid_ndcg` summed over the events: (G,)."""
    return grid_ndcg(scores, targets, k).sum(1)


class SeenItems:
    """Which items each user interacted with, as a dense (users, items) bool matrix.

    Dense is the fastest mask for full ranking at this scale (ML-1M: 20 MB); it costs
    users × items bytes, so logs of 10⁵ × 10⁵ need a sparse variant.
    """

    def __init__(self, n_users: int, n_items: int):
        self.mask = torch.zeros(n_users, n_items, dtype=torch.bool)

    def add(self, users: np.ndarray, items: np.ndarray) -> None:
        self.mask[torch.from_numpy(users), torch.from_numpy(items)] = True

    def rows(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        return self.mask[users, :n_items]

    def before_each(self, users: torch.Tensor, items: torch.Tensor, n_items: int,
                    marks: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n_items): what each event's user had before it, this batch's earlier events included
        (``marks``: only those of its events, e.g. the positive ones)."""
        mask = self.rows(users, n_items).clone()
        j, k = earlier_marked(users, marks)
        known = items[k] < n_items  # an item first seen in this batch is no candidate anyway
        mask[j[known], items[k][known]] = True
        return mask


class ShownItems:
    """When each user was last shown each item (an impression), as a dense (users, items) int32
    matrix of seconds since ``t0``: the replay's filter of ignored impressions for models that
    read no kinds. Allocated only for logs with impressions (4 bytes per user-item pair)."""

    NEVER = -(2**31)

    def __init__(self, n_users: int, n_items: int, t0: int):
        self.at = torch.full((n_users, n_items), self.NEVER, dtype=torch.int32)
        self.t0 = t0

    def add(self, users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> None:
        self.at[torch.from_numpy(users), torch.from_numpy(items)] = torch.from_numpy(ts - self.t0).to(torch.int32)

    def before_each(self, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor, shown: torch.Tensor,
                    n_items: int, window_s: float) -> torch.Tensor:
        """(B, n_items): the items each event's user was shown less than ``window_s`` before it,
        this batch's earlier impressions (``shown``) included."""
        now = (ts - self.t0).unsqueeze(1)
        at = self.at[users, :n_items]
        mask = (at > self.NEVER) & (now - at < window_s)
        j, k = earlier_marked(users, shown, ts, window_s)
        known = items[k] < n_items
        mask[j[known], items[k][known]] = True
        return mask
