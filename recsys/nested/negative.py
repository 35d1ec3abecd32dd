"""The user's "no": items a user gave negative feedback on (`recsys.feedback`), masked for
them from then on.

They are part of the user's row (`FastState.negative`, the latest ``negative_items`` of
them), so they travel wherever the row does: checkpoints, eviction to the online store and
back, a rebalance to another worker. Serving masks them with the user's latest items
(`ServingView.users`); the replay and the worker's own scores mask them here.

    >>> mark(state, users, items)                  # the batch's negative events, in time order
    >>> scores = masked(scores, state.negative[users])
"""

from __future__ import annotations

import torch

from recsys.batch_users import earlier_same_user, user_positions


def mark(state, users: torch.Tensor, items: torch.Tensor) -> None:
    """Append the negative events (users, items), time-ordered, to their users' rows, in place."""
    if not len(users):
        return
    p = user_positions(users)
    X = state.negative.shape[1]
    new = torch.full((len(p.uniq), int(p.counts.max())), -1, dtype=torch.int64, device=users.device)
    new[p.row, p.pos] = items
    # As the latest items do: the row's new items sit right after its old ones, the latest X kept.
    window = p.counts.unsqueeze(1) + torch.arange(X, device=users.device)
    state.negative.index_copy_(0, p.uniq, torch.cat([state.negative[p.uniq], new], 1).gather(1, window))


def masked(scores: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """(B, N) scores with each row's negative items (B, X; -1 empty) set to −inf, in place."""
    n = scores.shape[1]
    hit = (negative >= 0) & (negative < n)
    rows = torch.arange(len(negative), device=scores.device).unsqueeze(1).expand_as(negative)
    return scores.index_put_((rows[hit], negative[hit]), torch.tensor(float("-inf"), dtype=scores.dtype))


def masked_before_each(scores: torch.Tensor, negative: torch.Tensor, users: torch.Tensor, items: torch.Tensor,
                       is_negative: torch.Tensor) -> torch.Tensor:
    """`masked` for a batch's events ranked fresh (replay v2): row ``j`` also masks the negative
    events of its user earlier in the batch. ``negative``: the rows at the batch start."""
    scores = masked(scores, negative)
    j, k = (earlier_same_user(users) & is_negative.unsqueeze(0)).nonzero(as_tuple=True)
    known = items[k] < scores.shape[1]
    return scores.index_put_((j[known], items[k][known]), torch.tensor(float("-inf"), dtype=scores.dtype))
