"""`oracle`: the synthetic log's ceiling. The generator knows each event's true
distribution (recsys/synthetic.py): with probability ``p_session`` an item of the user's
current session cluster, ``p_long`` of a cluster drawn from their long-term taste,
``p_trend`` one of the window's trending items, otherwise any item by popularity; within
a cluster, items born by then, weighted by popularity. The oracle ranks every item by
that probability, so a model's NDCG@10 as a fraction of the oracle's says how much of
the learnable signal it has found.

    >>> oracle = Oracle(dataset.extra, log)     # only for `load_dataset("synthetic")`
"""

from __future__ import annotations

import numpy as np
import torch

from offline_eval.protocol import EncodedLog


class Oracle:
    def __init__(self, truth: dict, log: EncodedLog):
        self.truth = truth
        # Replay item index → generator index (items are 1-based ids there).
        self.gen_item = torch.from_numpy(log.item_ids.astype(np.int64) - 1)
        self.gen_user = torch.from_numpy(log.user_ids.astype(np.int64) - 1)
        self.session = torch.from_numpy(truth["session_cluster"])  # (events,) in log order
        self.position = 0  # log position of the next batch

    def fit(self, history: EncodedLog) -> None:
        self.position = history.n_events

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        raise NotImplementedError("the oracle knows each event, not each user: replay it with fresh users (v2)")

    def score_fresh(self, batch: EncodedLog, n_items: int) -> torch.Tensor:
        lo = self.position
        session = self.session[lo:lo + batch.n_events]
        return true_probabilities(self.truth, torch.from_numpy(batch.ts), self.gen_user[torch.from_numpy(batch.users)],
                                  session, self.gen_item[:n_items]).float()

    def update(self, batch: EncodedLog) -> None:
        self.position += batch.n_events


def true_probabilities(truth: dict, ts: torch.Tensor, users: torch.Tensor, session: torch.Tensor,
                       items: torch.Tensor) -> torch.Tensor:
    """(B,) event times, generator user indices and session clusters, (N,) generator item
    indices → (B, N) float64: the probability the generator gives each item."""
    cfg, K = truth["config"], truth["config"]["n_clusters"]
    cluster, pop, birth = (torch.from_numpy(truth[k]) for k in ("item_cluster", "item_pop", "item_birth"))
    trending = torch.from_numpy(truth["trending"] - 1)  # (windows, per window) generator indices
    t = (ts.double() - cfg["start_ts"]) / cfg["span_s"]  # (B,) fraction of the span
    born = birth[items].unsqueeze(0) <= t.unsqueeze(1)  # (B, N)
    w = pop[items] * born  # (B, N) popularity of the items born by then
    c = cluster[items]  # (N,)
    # Each cluster's total weight among all *generator* items born by then (unknown ones too).
    all_born = birth.unsqueeze(0) <= t.unsqueeze(1)  # (B, I)
    totals = torch.zeros(len(t), K, dtype=w.dtype).index_add_(1, cluster, pop * all_born)
    in_cluster = w / totals[:, c].clamp(min=1e-12)  # (B, N) P(item | its cluster)
    taste = torch.from_numpy(truth["user_taste"])[users]  # (B, K)
    p = (cfg["p_session"] * (c.unsqueeze(0) == session.unsqueeze(1)) + cfg["p_long"] * taste[:, c]) * in_cluster
    window = (t * cfg["n_trend_windows"]).long().clamp(max=cfg["n_trend_windows"] - 1)
    trend = (trending[window].unsqueeze(2) == items.view(1, 1, -1)).any(1)  # (B, N)
    p += cfg["p_trend"] * trend / cfg["trending_per_window"]
    p_pop = 1 - cfg["p_session"] - cfg["p_long"] - cfg["p_trend"]
    return p + p_pop * w / (pop * all_born).sum(1, keepdim=True)
