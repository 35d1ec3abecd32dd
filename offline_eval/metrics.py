"""Ranking metrics of the replay protocol, computed from one rank per stream event.

A rank is 1-based among the candidates; ``inf`` marks a miss (unknown item, or the
target was filtered out).

    >>> summarize(np.array([1.0, 3.0, np.inf]), ks=(10,))
    {'events': 3, 'hr@10': 0.666667, 'ndcg@10': 0.5, 'mrr': 0.444444}
"""

from __future__ import annotations

import numpy as np
import torch


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
    ahead = (scores >= t_score).sum(1) - 1  # ties count against the target; minus the target itself
    excluded = (torch.isinf(t_score) & (t_score < 0)).squeeze(1)
    return torch.where(known & ~excluded, ahead.double() + 1, torch.full((B,), float("inf"), dtype=torch.float64))


def grid_ndcg_sums(scores: torch.Tensor, targets: torch.Tensor, k: int = 10) -> torch.Tensor:
    """(G, B, N) scores of ``G`` candidate settings for the same ``B`` events → (G,) float64 sum of
    each setting's NDCG@k: how calibration and tuning pick a setting in one pass."""
    G = scores.shape[0]
    ranks = ranks_of_targets(scores.flatten(0, 1), targets.repeat(G), None).view(G, -1)
    return torch.where(ranks <= k, 1 / torch.log2(ranks + 1), 0.0).sum(1)  # misses rank inf


def summarize(ranks: np.ndarray, ks=(10, 20, 50), digits: int = 6) -> dict:
    n = len(ranks)
    out: dict = {"events": int(n)}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = _mean(hit, n)
        out[f"ndcg@{k}"] = _mean(np.where(hit, 1.0 / np.log2(np.where(hit, ranks, 1) + 1), 0.0), n)
    out["mrr"] = _mean(1.0 / ranks, n)
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in out.items()}


def _mean(x: np.ndarray, n: int) -> float:
    return float(np.sum(x) / n) if n else 0.0
