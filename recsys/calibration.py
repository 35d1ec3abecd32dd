"""Calibrate, on history, how the population level and the personal levels mix.

Meta-training fits the slow level on the same events its loss is measured on, so the
personal score (item embeddings, fast reads) looks more certain in training than it is on
events it has not seen, and the learned population weight comes out too small; and it
learns nothing of users who come back after a long absence. Three numbers set the mix: the
population weight's multiplier, ``fade``, how fast a returning user's personal score
gives way (`recsys.nested.trust`), and the form: the additive score meta-training fits,
or the two parts as experts mixed in probability with the population's share π
(`recsys.nested.mixture`). ML-1M, one fit, on the stream: NDCG@10 0.0182 as trained,
0.0222 with the population weight ×3, 0.0238 with ×3 and fade 0.3. The form differs by
history (each history's own 80/20 replay, the best of each form): synthetic 0.0699 additive
vs 0.0708 mixed; Steam 0.0551 vs 0.0552; ML-1M 0.1635 vs 0.1584 — so the tail chooses.

Both are chosen the way the replay scores, on a held-out tail of the *history* (never the
stream): the model is trained on the history before the tail, its fast state absorbs that
part, then the tail is replayed micro-batch by micro-batch as protocol v2 scores it (each
event from its user's state after their earlier events, global state as before the batch),
seen items filtered. Every pair of the grid is ranked from the same two score
parts, so the whole grid costs one pass. That pass has written the whole history into
the fast state, which is returned for the caller to start from.

    >>> fit_part, tail = split_history(history, 0.1)
    >>> mix, state = calibrate(model, fit_part, tail)   # Mix(multiplier=4.0, fade=2.0, share=0.5)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from recsys import association
from recsys.nested import FastState, NestedModel, score_items, trust, write_log
from recsys.ranking import SeenItems, grid_ndcg

# Geometric, wide enough for "popularity barely matters" and "popularity is nearly all".
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
FADES = (0.0, 0.5, 2.0, 8.0, 32.0)
# The mixture's population share, and its population expert's steepness: a softmax of the
# term, so a multiplier sharpens it towards the few items everyone takes now.
SHARES = (0.25, 0.5, 0.75)
MIXTURE_MULTIPLIERS = (1.0, 2.0, 4.0)
# How far below the best NDCG@10 a mix may score, in standard errors of the gap, and still
# count as tied with it (`choose`).
TIE_SE = 2.0


# The association level's weight in the personal expert, its votes' popularity discount
# (0: P(j | i); ½: cosine-like) and its fast speed's share, chosen together on the tail once
# the mix is set. On the history's own replay the fast share was worth most on Steam (½),
# least on Amazon Toys (0–0.1): a setting of the log, not of the code.
ASSOCIATION_WEIGHTS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DISCOUNTS = (0.25, 0.5)
FAST_SHARES = (0.0, 0.1, 0.25, 0.5)


class Mix(NamedTuple):
    multiplier: float  # of the trained population weight
    fade: float
    share: float  # the population expert's share π; 0: the additive score


def mixes(multipliers=MULTIPLIERS, fades=FADES, shares=SHARES, mixture_multipliers=MIXTURE_MULTIPLIERS) -> list[Mix]:
    """The grid, in the order `calibrate` scores it: additive (multiplier-major, then fade),
    then mixed (share-major, then multiplier, then fade)."""
    return ([Mix(k, f, 0.0) for k in multipliers for f in fades]
            + [Mix(k, f, s) for s in shares for k in mixture_multipliers for f in fades])


def split_history(history, tail_fraction: float):
    """(fit part, calibration tail) by time: the tail is the latest ``tail_fraction``."""
    cut = history.n_events - int(round(tail_fraction * history.n_events))
    return history.slice(0, cut), history.slice(cut, history.n_events)


@torch.no_grad()
def calibrate(model: NestedModel, fit_part, tail, **options) -> tuple[Mix, FastState]:
    """The `Mix` chosen on ``tail`` replayed after ``fit_part`` (`choose`), and the fast state
    after both; ``options`` as `score_tail` takes them."""
    grid, ndcg, loglik, state = score_tail(model, fit_part, tail, **options)
    return choose(grid, ndcg, loglik), state


@torch.no_grad()
def score_tail(model: NestedModel, fit_part, tail, batch_size: int = 256, absorb_batch: int = 4096,
               score_every: int = 2, multipliers=MULTIPLIERS, fades=FADES, shares=SHARES,
               mixture_multipliers=MIXTURE_MULTIPLIERS) -> tuple[list[Mix], torch.Tensor, torch.Tensor, FastState]:
    """Every mix of the grid (`mixes`) on ``tail`` replayed after ``fit_part``, as protocol v2
    scores: (G, E) NDCG@10 per scored event, (G, E') the log-probability of each target that
    is a candidate, and the fast state after both. Every batch is applied; one in
    ``score_every`` is scored (the grid is the costly part)."""
    n_users = max(fit_part.n_users_known, tail.n_users_known)
    n_items = max(fit_part.n_items_known, tail.n_items_known)
    state = write_log(model, model.init_state(n_users, n_items), fit_part, absorb_batch)
    seen = SeenItems(n_users, n_items)
    seen.add(fit_part.users, fit_part.items)

    grid = mixes(multipliers, fades, shares, mixture_multipliers)
    dtype = model.user0.dtype
    k, f = torch.tensor(multipliers, dtype=dtype).view(-1, 1, 1, 1), torch.tensor(fades, dtype=dtype).view(-1, 1)
    k_mix = torch.tensor(mixture_multipliers, dtype=dtype).view(-1, 1, 1, 1)
    pi = torch.tensor(shares, dtype=dtype).view(-1, 1, 1, 1, 1)  # every share at once: one softmax per part
    ndcg, loglik = [], []  # per scored event, every mix: (G, B) per batch
    known_upto = np.maximum.accumulate(np.concatenate([[fit_part.n_items_known - 1], tail.items])) + 1
    for b, lo in enumerate(range(0, tail.n_events, batch_size)):
        users, items, ts = (torch.from_numpy(a[lo:lo + batch_size]) for a in (tail.users, tail.items, tail.ts))
        if b % score_every:
            state = model.update(state, users, items, ts, donate=True)
        else:  # protocol v2: each event from its user's state after their earlier events (replay's score_fresh)
            n_known = int(known_upto[lo])
            clock, pop = state.clock(), model.population_counts(state.pop)[:n_known]
            state, reads = model.update_reading(state, users, items, ts, donate=True)
            absent = clock - reads.last_ts
            E, bias = model.all_items(n_known)
            weight = trust(absent.to(E.dtype).view(1, -1), f)  # (F, B): every fade of the grid at once
            term, seen_now = model.pop_term(pop), seen.before_each(users, items, n_known)
            additive = score_items(reads.z, E, bias, k * term, weight).flatten(0, 1)  # (K·F, B, N)
            mixed = score_items(reads.z, E, bias, k_mix * term, weight, pi).flatten(0, 2)  # (S·K'·F, B, N)
            # Only targets that are candidates have a probability (not new, not seen before).
            known = (items < n_known) & ~seen_now[torch.arange(len(items)), items.clamp(max=n_known - 1)]
            target = items.clamp(max=n_known - 1).view(1, -1, 1)
            parts = []  # the two forms one at a time, each filtered in place: the grid is the costly part
            for scores in (additive, mixed):
                scores.masked_fill_(seen_now, float("-inf"))
                logp = torch.log_softmax(scores, -1).gather(2, target.expand(len(scores), -1, 1)).squeeze(2)
                parts.append((grid_ndcg(scores, items), logp[:, known].double()))
            ndcg.append(torch.cat([p[0] for p in parts]))  # (G, B) in `mixes` order
            loglik.append(torch.cat([p[1] for p in parts]))
        seen.add(users.numpy(), items.numpy())
    return grid, torch.cat(ndcg, 1), torch.cat(loglik, 1), state


def choose(grid: list[Mix], ndcg: torch.Tensor, loglik: torch.Tensor) -> Mix:
    """The mix to serve from (G, E) per-event NDCG@10 and (G, E') log-probabilities of the
    targets on the tail: among the mixes whose NDCG is within `TIE_SE` standard errors of the
    best one's (paired over the same events), the one that gives the targets the highest
    likelihood; then the one nearest the trained model (additive, ×1, no fade).

    NDCG@10 is what the replay scores, but a tail of a few thousand events cannot tell mixes
    apart to its last digit: on the synthetic history's tail the best additive and mixed mixes
    score 0.0707 and 0.0703, on Steam's they tie. Where the ranking metric cannot tell, the
    likelihood of the next event, a proper score of the whole distribution, can.

    Two standard errors, not one: the best of 70 means on the same few thousand events is
    the luckiest of them as much as the best, so one error left the choice on a knife edge.
    On the demo's synthetic history trained on 256 events per user, the mixture with the
    population share ¾ and expert ×2 sat inside one error, the likelier share ½ just outside
    it; which one served moved the demo's session from 2.15 to 3.16 of its group in the top
    10 (`bench/demo_reaction.py`). Within two errors the likelihood decides; ML-1M's and
    Steam's tails keep their additive form either way (fade 8 → 2 and 2 → ½, a few
    ten-thousandths of NDCG on the tail)."""
    mean = ndcg.mean(1)
    best = int(mean.argmax())
    se = (ndcg[best] - ndcg).std(1) / max(ndcg.shape[1], 2) ** 0.5
    tied = (mean[best] - mean <= TIE_SE * se).tolist()
    likelihood = loglik.mean(1)
    distance = [abs(np.log(m.multiplier)) + m.fade + m.share for m in grid]
    return grid[max((i for i in range(len(grid)) if tied[i]),
                    key=lambda i: (round(float(likelihood[i]), 6), -distance[i]))]


class Link(NamedTuple):
    """How the association level enters the score: its votes' weight, popularity discount and
    fast speed's share."""

    weight: float
    discount: float
    fast_share: float


@torch.no_grad()
def association_link(model: NestedModel, fit_part, tail, batch_size: int = 256,
                     absorb_batch: int = 4096, score_every: int = 2, weights=ASSOCIATION_WEIGHTS,
                     discounts=DISCOUNTS, fast_shares=FAST_SHARES) -> Link:
    """The association level's `Link`, on ``tail`` replayed after ``fit_part`` as `score_tail`
    replays it, with the model's mix as set: the best NDCG@10 of the grid; within `TIE_SE`
    standard errors of it, the smallest weight (the level must earn its place)."""
    n_users = max(fit_part.n_users_known, tail.n_users_known)
    n_items = max(fit_part.n_items_known, tail.n_items_known)
    state = write_log(model, model.init_state(n_users, n_items), fit_part, absorb_batch)
    cfg = model.association_config()
    seen = SeenItems(n_users, n_items)
    seen.add(fit_part.users, fit_part.items)
    read_grid = [(d, f) for d in discounts for f in fast_shares]
    grid = [Link(w, d, f) for d, f in read_grid for w in weights]
    lam = torch.tensor(weights, dtype=model.user0.dtype).view(-1, 1, 1)
    known_upto = np.maximum.accumulate(np.concatenate([[fit_part.n_items_known - 1], tail.items])) + 1
    ndcg = []
    for b, lo in enumerate(range(0, tail.n_events, batch_size)):
        users, items, ts = (torch.from_numpy(a[lo:lo + batch_size]) for a in (tail.users, tail.items, tail.ts))
        before = model.before_each(state, users, items)  # before the update writes the rows
        if b % score_every:
            state = model.update(state, users, items, ts, donate=True)
        else:
            n_known = int(known_upto[lo])
            clock, pop = state.clock(), model.population_counts(state.pop)[:n_known]
            level = state.association()  # as of the batch start: read before the update, which writes it in place
            reads_of_level = [association.read(level, before, n_known, cfg, discount=d, fast_share=f)
                              for d, f in read_grid]
            state, reads = model.update_reading(state, users, items, ts, donate=True)
            E, bias = model.all_items(n_known)
            weight = trust((clock - reads.last_ts).to(E.dtype), model.fade)
            seen_now = seen.before_each(users, items, n_known)
            per_read = []
            for votes in reads_of_level:
                votes = votes.to(E.dtype)
                scores = score_items(reads.z, E, bias, model.pop_term(pop), weight, model.mixture_share(),
                                     lam * votes)  # (G, B, N)
                scores.masked_fill_(seen_now, float("-inf"))
                per_read.append(grid_ndcg(scores, items))
            ndcg.append(torch.cat(per_read))
        seen.add(users.numpy(), items.numpy())
    ndcg = torch.cat(ndcg, 1)  # (G, E)
    mean = ndcg.mean(1)
    best = int(mean.argmax())
    se = (ndcg[best] - ndcg).std(1) / max(ndcg.shape[1], 2) ** 0.5
    tied = [i for i in range(len(grid)) if float(mean[best] - mean[i]) <= TIE_SE * float(se[i])]
    return grid[min(tied, key=lambda i: (grid[i].weight, -float(mean[i])))]
