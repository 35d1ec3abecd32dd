"""What a user turned down: items they gave negative feedback on, masked for them from then
on, and items they were shown and ignored, kept out of their lists for a while
(`recsys.feedback`).

Both are part of the user's row (`FastState.negative`, `FastState.shown`), so they travel
wherever the row does: checkpoints, eviction to the online store and back, a rebalance to
another worker. Serving masks them with the user's latest items (`ServingView.users`); the
replay and the worker's own scores mask them here.

    >>> mark(state, "negative", users, items)          # the batch's negative events, in time order
    >>> scores = masked(scores, state.negative_items(users))
"""

from __future__ import annotations

import torch

from recsys.batch_users import earlier_same_user, user_positions


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
    earlier = earlier_same_user(users)
    recent = (ts.unsqueeze(1) - ts.unsqueeze(0)) < window_s  # [j, k]: event k less than the window before j
    turned_down = (weight < 0).unsqueeze(0) | ((weight == 0).unsqueeze(0) & recent)
    j, k = (earlier & turned_down).nonzero(as_tuple=True)
    known = items[k] < scores.shape[1]
    return scores.index_put_((j[known], items[k][known]), torch.tensor(float("-inf"), dtype=scores.dtype))
