"""Replay a log through models, exactly as EVAL_PROTOCOL.md says.

Per stream micro-batch: every event is ranked against all known items, from its user's
state after every earlier event of theirs (version 2, "fresh users": this batch's earlier
events included) or from the batch start (version 1), seen items filtered out; then the
whole batch is revealed to the model. The models are the same objects the stream worker
drives: anything with ``fit(history)``, ``score(users, n_items)`` and ``update(events)``;
a model with per-user state adds ``score_fresh(batch, n_items)``.

    >>> result = replay_model(PopOnline(), log, ProtocolConfig(batch_size=256))
    >>> summarize(result.ranks)["ndcg@10"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from offline_eval.protocol import EncodedLog, ProtocolConfig
from recsys.ranking import SeenItems, ranks_of_targets


NEG_INF = torch.tensor(float("-inf"))


class ReplayModel(Protocol):
    def fit(self, history: EncodedLog) -> None: ...

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B,) user indices → (B, n_items) scores, from the state before the current batch."""

    def update(self, batch: EncodedLog) -> None:
        """Reveal a micro-batch of events (time-ordered) to the model."""


class FreshReplayModel(ReplayModel, Protocol):
    def score_fresh(self, batch: EncodedLog, n_items: int) -> torch.Tensor:
        """A batch's events → (B, n_items) scores, row ``j`` from the state of event ``j``'s user
        after their earlier events of this batch (global state as before the batch). The
        replay then calls ``update`` with the same ``batch`` object."""


def score_batch(model: ReplayModel, batch: EncodedLog, n_items: int, fresh: bool) -> torch.Tensor:
    """The replay's one call into a model: a row per event. A model without per-user state
    has no ``score_fresh``: its batch-start row is every event's row."""
    if fresh and hasattr(model, "score_fresh"):
        return model.score_fresh(batch, n_items)
    return model.score(torch.from_numpy(batch.users), n_items)


@dataclass
class ReplayResult:
    ranks: np.ndarray  # (stream events,) float64, inf = miss
    covered: np.ndarray  # (items,) bool: appeared in some top-10 list
    n_known_items: int  # known items at the end of the stream
    fit_seconds: float
    replay_seconds: float


def batch_bounds(log: EncodedLog, batch_size: int) -> list[tuple[int, int]]:
    starts = range(log.n_history, log.n_events, batch_size)
    return [(lo, min(lo + batch_size, log.n_events)) for lo in starts]


def replay_model(model: ReplayModel, log: EncodedLog, cfg: ProtocolConfig, name: str = "model",
                 progress: bool = True, fitted: bool = False) -> ReplayResult:
    t0 = time.perf_counter()
    if not fitted:
        model.fit(log.history())
    fit_seconds = time.perf_counter() - t0

    # Largest item index seen so far, +1: the known items before each position.
    known_upto = np.maximum.accumulate(log.items) + 1
    n_users, n_items = log.n_users_known, log.n_items_known
    seen = SeenItems(n_users, n_items)
    seen.add(log.users[: log.n_history], log.items[: log.n_history])
    covered = torch.zeros(n_items, dtype=torch.bool)
    ranks = np.empty(log.n_events - log.n_history)

    fresh = cfg.user_freshness == "event"
    t1 = time.perf_counter()
    bounds = batch_bounds(log, cfg.batch_size)
    for lo, hi in tqdm(bounds, desc=f"replay {name}", unit="batch", disable=not progress, mininterval=1.0):
        n_known = int(known_upto[lo - 1])
        batch = log.slice(lo, hi)
        users, targets = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
        with torch.no_grad():  # not inference_mode: models grow their tables (cold start) while scoring
            scores = score_batch(model, batch, n_known, fresh)  # (B, n_known)
            if cfg.seen_filter:  # masked once, for the ranks and the coverage (where beats masked_fill 2×)
                had = seen.before_each(users, targets, n_known) if fresh else seen.rows(users, n_known)
                scores = torch.where(had, NEG_INF, scores)
            ranks[lo - log.n_history: hi - log.n_history] = ranks_of_targets(scores, targets, None).numpy()
            top = scores.topk(min(10, n_known), dim=1)
            covered[top.indices[top.values > float("-inf")]] = True  # filtered items are not recommended
        model.update(batch)
        seen.add(log.users[lo:hi], log.items[lo:hi])
    replay_seconds = time.perf_counter() - t1
    return ReplayResult(ranks, covered.numpy(), n_items, fit_seconds, replay_seconds)
