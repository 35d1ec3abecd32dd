"""A micro-batch's events seen per user: what each event's user did earlier in the batch.

Replay v2 (EVAL_PROTOCOL.md) ranks every event from its user's state after all their
earlier events, those earlier in the same batch included; every model that keeps
per-user state answers that with these three tensors, never a per-event Python loop.

    >>> users = torch.tensor([7, 3, 7, 7])
    >>> user_positions(users).pos
    tensor([0, 0, 1, 2])
    >>> earlier_same_user(users)[3]      # event 3 follows events 0 and 2 of user 7
    tensor([ True, False,  True, False])

Shapes: ``B`` events (time-ordered), ``U`` distinct users, ``L`` items per sequence.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class UserPositions(NamedTuple):
    uniq: torch.Tensor  # (U,) distinct users, ascending
    row: torch.Tensor  # (B,) each event's index into uniq
    pos: torch.Tensor  # (B,) 0-based position of the event among its user's events in the batch
    counts: torch.Tensor  # (U,) events per user


def user_positions(users: torch.Tensor) -> UserPositions:
    uniq, row, counts = torch.unique(users, return_inverse=True, return_counts=True)
    order = torch.argsort(row, stable=True)  # grouped by user, time order kept inside
    pos = torch.empty_like(row)
    pos[order] = torch.arange(len(row), device=users.device) - (torch.cumsum(counts, 0) - counts)[row[order]]
    return UserPositions(uniq, row, pos, counts)


def earlier_same_user(users: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: ``[j, k]`` is True when event ``k`` is an earlier event of event ``j``'s user."""
    return torch.tril(users.unsqueeze(1) == users.unsqueeze(0), diagonal=-1)


def earlier_marked(users: torch.Tensor, marks: torch.Tensor | None = None, ts: torch.Tensor | None = None,
                   window_s: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(j, k) index pairs: event ``k`` is an earlier event of event ``j``'s user, one of those
    ``marks`` picks (None: any), and with ``window_s``, less than that many seconds before it."""
    pairs = earlier_same_user(users)
    if marks is not None:
        pairs = pairs & marks.unsqueeze(0)
    if window_s is not None:
        pairs = pairs & ((ts.unsqueeze(1) - ts.unsqueeze(0)) < window_s)
    return pairs.nonzero(as_tuple=True)


def sequences_before(start: torch.Tensor, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """(B, L) each event's user's latest ``L`` items *before* the event, oldest first.

    start: (B, L) the event's user's latest items at the batch start (oldest first, padded
    on the left); items: (B,) the batch's items (already in the sequence's encoding)."""
    L = start.shape[1]
    p = user_positions(users)
    in_batch = torch.zeros(len(p.uniq), int(p.counts.max()), dtype=items.dtype, device=items.device)
    in_batch[p.row, p.pos] = items  # (U, P) each user's batch items, oldest first
    joined = torch.cat([start, in_batch[p.row]], dim=1)  # (B, L + P)
    return joined.gather(1, p.pos.unsqueeze(1) + torch.arange(L, device=items.device))
