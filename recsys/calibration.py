"""Calibrate, on history, how the population level and the personal levels mix.

Meta-training fits the slow level on the same events its loss is measured on, so the
personal score (item embeddings, fast reads) looks more certain in training than it is on
events it has not seen, and the learned population weight comes out too small; and it
learns nothing of users who come back after a long absence. Two numbers set the mix: the
population weight's multiplier, and ``fade``, how fast a returning user's personal score
gives way (`recsys.nested_model.trust`). ML-1M, one fit, on the stream: NDCG@10 0.0182 as trained,
0.0222 with the population weight ×3, 0.0238 with ×3 and fade 0.3.

Both are chosen the way the replay scores, on a held-out tail of the *history* (never the
stream): the model is trained on the history before the tail, its fast state absorbs that
part, then the tail is replayed micro-batch by micro-batch as protocol v2 scores it (each
event from its user's state after their earlier events, global state as before the batch),
seen items filtered. Every pair of the grid is ranked from the same two score
parts, so the whole grid costs one pass. That pass has written the whole history into
the fast state, which is returned for the caller to start from.

    >>> fit_part, tail = split_history(history, 0.1)
    >>> multiplier, fade, state = calibrate(model, fit_part, tail)
"""

from __future__ import annotations

import numpy as np
import torch

from recsys.nested_model import FastState, NestedModel, score_items, trust, write_log
from recsys.ranking import SeenItems, grid_ndcg_sums

# Geometric, wide enough for "popularity barely matters" and "popularity is nearly all".
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0, 8.0)
FADES = (0.0, 0.5, 2.0, 8.0, 32.0)


def split_history(history, tail_fraction: float):
    """(fit part, calibration tail) by time: the tail is the latest ``tail_fraction``."""
    cut = history.n_events - int(round(tail_fraction * history.n_events))
    return history.slice(0, cut), history.slice(cut, history.n_events)


@torch.no_grad()
def calibrate(model: NestedModel, fit_part, tail, batch_size: int = 256, absorb_batch: int = 4096,
              score_every: int = 2, multipliers=MULTIPLIERS, fades=FADES) -> tuple[float, float, FastState]:
    """(population weight multiplier, fade) with the best NDCG@10 on ``tail`` replayed after
    ``fit_part`` (ties go to the pair nearest the trained model: ×1, no fade), and the fast
    state after both. Every batch is applied; one in ``score_every`` is scored (the grid is
    the costly part)."""
    n_users = max(fit_part.n_users_known, tail.n_users_known)
    n_items = max(fit_part.n_items_known, tail.n_items_known)
    state = write_log(model, model.init_state(n_users, n_items), fit_part, absorb_batch)
    seen = SeenItems(n_users, n_items)
    seen.add(fit_part.users, fit_part.items)

    grid = torch.cartesian_prod(torch.tensor(multipliers), torch.tensor(fades)).to(model.user0.dtype)  # (G, 2)
    k, f = grid[:, 0].view(-1, 1, 1), grid[:, 1].view(-1, 1)
    gain = torch.zeros(len(grid), dtype=torch.float64)
    known_upto = np.maximum.accumulate(np.concatenate([[fit_part.n_items_known - 1], tail.items])) + 1
    for b, lo in enumerate(range(0, tail.n_events, batch_size)):
        users, items, ts = (torch.from_numpy(a[lo:lo + batch_size]) for a in (tail.users, tail.items, tail.ts))
        if b % score_every:
            state = model.update(state, users, items, ts)
        else:  # protocol v2: each event from its user's state after their earlier events (replay's score_fresh)
            n_known = int(known_upto[lo])
            clock, pop = state.clock(), model.population_counts(state.pop)[:n_known]
            state, reads = model.update_reading(state, users, items, ts)
            absent = clock - reads.last_ts
            E, bias = model.all_items(n_known)
            weight = trust(absent.to(E.dtype).view(1, -1), f)  # (G, B): every fade of the grid at once
            scores = score_items(reads.z, E, bias, k * model.pop_term(pop), weight)  # (G, B, N)
            scores = torch.where(seen.before_each(users, items, n_known), float("-inf"), scores)
            gain += grid_ndcg_sums(scores, items)
        seen.add(users.numpy(), items.numpy())
    distance = grid[:, 0].log().abs() + grid[:, 1]
    best = max(range(len(grid)), key=lambda i: (round(float(gain[i]), 6), -float(distance[i])))
    return float(grid[best, 0]), float(grid[best, 1]), state
