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
from recsys.nested.config import NestedConfig
from recsys.ranking import SeenItems, ShownItems, grid_ndcg_sums, ranks_of_targets


NEG_INF = torch.tensor(float("-inf"))
IMPRESSION_WINDOW_S = NestedConfig.impression_window_s  # kind-blind models get the nested model's rule


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
    ranks: np.ndarray  # (stream targets,) float64, inf = miss: one per positive stream event
    covered: np.ndarray  # (items,) bool: appeared in some top-10 list
    n_known_items: int  # known items at the end of the stream
    fit_seconds: float
    replay_seconds: float
    targets: np.ndarray | None = None  # (stream events,) bool: which were targets (None: all)
    # On a log with negative feedback: the share of served top 10s holding an item the user
    # had said no to, and whether the replay filtered them for the model (a kind-blind one).
    negative_shown: float | None = None
    negatives_filtered: bool = False


def batch_bounds(log: EncodedLog, batch_size: int) -> list[tuple[int, int]]:
    starts = range(log.n_history, log.n_events, batch_size)
    return [(lo, min(lo + batch_size, log.n_events)) for lo in starts]


def grid_gains(inner: EncodedLog, scores, update, batch_size: int = 256) -> torch.Tensor:
    """(G,) NDCG@10 sums of ``G`` settings over ``inner``'s stream, replayed as protocol v2 does
    (seen items filtered): how a baseline chooses a setting on the history's own replay.
    ``scores(batch, n_known)`` → (G, B, n_known) before the batch; ``update(batch)`` after it."""
    gain = None
    known_upto = np.maximum.accumulate(inner.items) + 1
    seen = SeenItems(inner.n_users_known, inner.n_items_known)
    seen.add(inner.users[:inner.n_history], inner.items[:inner.n_history])
    for lo, hi in batch_bounds(inner, batch_size):
        batch, n_known = inner.slice(lo, hi), int(known_upto[lo - 1])
        users, targets = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
        masked = torch.where(seen.before_each(users, targets, n_known), float("-inf"), scores(batch, n_known))
        sums = grid_ndcg_sums(masked, targets)
        gain = sums if gain is None else gain + sums
        update(batch)
        seen.add(batch.users, batch.items)
    return gain


def replay_model(model: ReplayModel, log: EncodedLog, cfg: ProtocolConfig, name: str = "model",
                 progress: bool = True, fitted: bool = False) -> ReplayResult:
    """On a log with kinds of feedback, the positive events are the targets; a model is shown
    what its ``feedback`` attribute asks for (`EncodedLog.revealed`: kind-blind models, the
    default, see the positive events alone, and the replay filters for them what each user
    said no to and was shown within the impression window, as a shop's filter would, by the
    nested model's own rule); the seen filter is over positive events."""
    feedback = getattr(model, "feedback", "positives")
    t0 = time.perf_counter()
    if not fitted:
        model.fit(log.history().revealed(feedback))
    fit_seconds = time.perf_counter() - t0

    # Largest item index seen so far, +1: the known items before each position.
    known_upto = np.maximum.accumulate(log.items) + 1
    n_users, n_items = log.n_users_known, log.n_items_known
    positive, kinds = log.targets(), log.weight is not None
    seen = SeenItems(n_users, n_items)
    seen.add(log.users[: log.n_history][positive[: log.n_history]], log.items[: log.n_history][positive[: log.n_history]])
    said_no = SeenItems(n_users, n_items) if kinds else None
    filters = kinds and feedback == "positives"
    shown = ShownItems(n_users, n_items, int(log.ts[0])) if filters and (log.weight == 0).any() else None
    if kinds:
        h = slice(0, log.n_history)
        no = log.weight[h] < 0
        said_no.add(log.users[h][no], log.items[h][no])
        if shown is not None:
            seen_only = log.weight[h] == 0
            shown.add(log.users[h][seen_only], log.items[h][seen_only], log.ts[h][seen_only])
    covered = torch.zeros(n_items, dtype=torch.bool)
    ranks = np.empty(int(positive[log.n_history:].sum()))
    served = served_no = done = 0

    fresh = cfg.user_freshness == "event"
    t1 = time.perf_counter()
    bounds = batch_bounds(log, cfg.batch_size)
    for lo, hi in tqdm(bounds, desc=f"replay {name}", unit="batch", disable=not progress, mininterval=1.0):
        n_known = int(known_upto[lo - 1])
        full = log.slice(lo, hi)
        positive_here = full.targets()
        t = torch.from_numpy(positive_here)
        batch = full.revealed(feedback)
        all_users, all_items = torch.from_numpy(full.users), torch.from_numpy(full.items)
        users, targets = all_users[t], all_items[t]
        with torch.no_grad():  # not inference_mode: models grow their tables (cold start) while scoring
            scores = score_batch(model, batch, n_known, fresh)  # (B, n_known)
            if len(scores) != len(users):  # shown every event: their targets' rows
                scores = scores[t]
            if cfg.seen_filter:  # masked once, for the ranks and the coverage (where beats masked_fill 2×)
                had = seen.before_each(all_users, all_items, n_known, t)[t] if fresh else seen.rows(users, n_known)
                scores = torch.where(had, NEG_INF, scores)
            if kinds:
                no = torch.from_numpy(full.weight < 0)
                refused = said_no.before_each(all_users, all_items, n_known, no)[t] if fresh else said_no.rows(users, n_known)
                if filters:
                    scores = torch.where(refused, NEG_INF, scores)
                if shown is not None:
                    held = shown.before_each(all_users, all_items, torch.from_numpy(full.ts),
                                             torch.from_numpy(full.weight == 0), n_known, IMPRESSION_WINDOW_S)[t]
                    scores = torch.where(held, NEG_INF, scores)
            ranks[done: done + len(users)] = ranks_of_targets(scores, targets, None).numpy()
            done += len(users)
            top = scores.topk(min(10, n_known), dim=1)
            listed = top.values > float("-inf")
            covered[top.indices[listed]] = True  # filtered items are not recommended
            if kinds:
                served += len(users)
                served_no += int((refused.gather(1, top.indices) & listed).any(1).sum())
        model.update(batch)
        seen.add(full.users[positive_here], full.items[positive_here])
        if kinds:
            said_no.add(full.users[full.weight < 0], full.items[full.weight < 0])
        if shown is not None:
            seen_only = full.weight == 0
            shown.add(full.users[seen_only], full.items[seen_only], full.ts[seen_only])
    replay_seconds = time.perf_counter() - t1
    return ReplayResult(ranks, covered.numpy(), n_items, fit_seconds, replay_seconds,
                        positive[log.n_history:] if kinds else None,
                        served_no / max(served, 1) if kinds else None, filters)
