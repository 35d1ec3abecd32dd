"""What a user turned down: items they gave negative feedback on, masked for them from then
on, and items they were shown and ignored, kept out of their lists for a while
(`recsys.feedback`).

Both are part of the user's row (`FastState.negative`, `FastState.shown`), so they travel
wherever the row does: checkpoints, eviction to the online store and back, a rebalance to
another worker. Serving masks them with the user's latest items (`ServingView.users`); the
replay and the worker's own scores mask them here.

    >>> mark(state, "negative", users, items)          # the batch's negative events, in time order
    >>> scores = masked(scores, state.turned_down(users, now, cfg.impression_window_s))
"""

from __future__ import annotations

import torch

from recsys.batch_users import earlier_marked, user_positions
from recsys.nested.state import Reads


def mark(state, ring: str, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor | None = None) -> None:
    """Append events (users, items), time-ordered, to their users' ``ring`` (``"negative"`` or
    ``"shown"``, whose times ``ts`` go to ``shown_ts``), in place, the latest kept."""
    if not len(users):
        return
    p = user_positions(users)
    width = getattr(state, ring).shape[1]
    # As the latest items do: a row's new entries sit right after its old ones, the latest kept.
    window = p.counts.unsqueeze(1) + torch.arange(width, device=users.device)
    columns = {ring: items} | ({f"{ring}_ts": ts} if ts is not None else {})
    for name, values in columns.items():
        new = torch.full((len(p.uniq), int(p.counts.max())), -1, dtype=torch.int64, device=users.device)
        new[p.row, p.pos] = values
        field = getattr(state, name)
        field.index_copy_(0, p.uniq, torch.cat([field[p.uniq], new], 1).gather(1, window))


def masked(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, N) scores with each row's ``items`` (B, K; -1 empty) set to −inf, in place."""
    n = scores.shape[1]
    hit = (items >= 0) & (items < n)
    rows = torch.arange(len(items), device=scores.device).unsqueeze(1).expand_as(items)
    return scores.index_put_((rows[hit], items[hit]), torch.tensor(float("-inf"), dtype=scores.dtype))


def masked_before_each(scores: torch.Tensor, held: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                       ts: torch.Tensor, weight: torch.Tensor | None, window_s: float) -> torch.Tensor:
    """`masked` for a batch's events ranked fresh (replay v2): ``held`` (B, K) what each event's
    user had turned down at the batch start; row ``j`` also masks their negative events earlier
    in the batch, and their impressions less than ``window_s`` before it."""
    scores = masked(scores, held)
    if weight is None:
        return scores
    for j, k in (earlier_marked(users, weight < 0), earlier_marked(users, weight == 0, ts, window_s)):
        known = items[k] < scores.shape[1]
        scores.index_put_((j[known], items[k][known]), torch.tensor(float("-inf"), dtype=scores.dtype))
    return scores


def route(model, state, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor, weight: torch.Tensor | None,
          read: bool, population: bool = True):
    """A batch of every kind (`recsys.feedback`) into the levels, writing into ``state``: a negative
    event joins its user's negative items, an impression their shown ones, and neither teaches a
    level; the positive ones go through the model's recurrence (`NestedModel._recur`), the
    population counting each its weight. With ``read``, one `Reads` row per event (the
    non-positive events', no one's target, are placeholders). Without ``weight``: the
    recurrence alone, as before kinds."""
    if weight is None:
        return model._recur(state, users, items, ts, read, population)
    state = model.grow_state(state, int(users.max()) + 1, int(items.max()) + 1)
    no, shown = weight < 0, weight == 0
    mark(state, "negative", users[no], items[no])
    mark(state, "shown", users[shown], items[shown], ts[shown])
    yes = (weight > 0).nonzero().flatten()
    reads = None
    if len(yes):
        state, reads = model._recur(state, users[yes], items[yes], ts[yes], read, population, weight[yes])
    if read:
        z = model.user0.detach().expand(len(users), -1).clone()
        last_ts = torch.full_like(ts, -1)
        if reads is not None:
            z.index_copy_(0, yes, reads.z)
            last_ts.index_copy_(0, yes, reads.last_ts)
        reads = Reads(z=z, last_ts=last_ts)
    return state, reads
