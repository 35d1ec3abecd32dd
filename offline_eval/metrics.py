"""Ranking metrics of the replay protocol, computed from one rank per stream event.

A rank is 1-based among the candidates; ``inf`` marks a miss (unknown item, or the
target was filtered out).

    >>> summarize(np.array([1.0, 3.0, np.inf]), ks=(10,))
    {'events': 3, 'hr@10': 0.666667, 'ndcg@10': 0.5, 'mrr': 0.444444}
"""

from __future__ import annotations

import numpy as np


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
