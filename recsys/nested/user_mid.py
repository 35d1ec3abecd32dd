"""The user-mid level (CMS): a taste adapter per user, moved once per chunk of ``c_mid`` of the
user's events by the mean gradient of the chunk."""

from __future__ import annotations

import torch


def chunk_ends(applied: torch.Tensor, c_mid: int, dtype) -> torch.Tensor:
    """(…,) the user's event count once an event is applied → (…, 1) 0/1: does that event
    close a user-mid chunk."""
    return (applied % c_mid == 0).unsqueeze(-1).to(dtype)


def mid_step(mid, acc, target, boundary, rates):
    """User-mid (CMS), one event per row: accumulate ∇½‖mid − target‖²; where the event
    closes the user's chunk of c_mid (``boundary``, (U, 1) 0/1), apply the mean gradient
    with decay and restart the accumulator: mid ← mid − b·(decay·mid + step·acc)."""
    step, decay = rates
    acc = acc + (mid - target)
    mid = torch.addcmul(mid, boundary, decay * mid + step * acc, value=-1)
    return mid, acc * (1 - boundary)


def mid_chunks(mid, acc, target, srow, spos, cnt, counts, steps: int, rates, c_mid: int):
    """User-mid over a whole batch (``mid_step`` for every event, in its users' order): the
    adapter changes only where a chunk of c_mid of the user's events closes, so this runs
    once per chunk instead of once per event. A chunk's accumulator is its carried
    ``acc`` plus Σ(mid − target) = n·mid − Σ target over its events.

    mid, acc, cnt, counts: per row (U, …); target, srow, spos: per event, step-major;
    ``steps``: the most events of any row. → each event's mid before it (B, D) step-major,
    and mid, acc after the batch."""
    c, (step, decay) = c_mid, rates
    U, D = mid.shape
    opened = cnt % c  # (U,) events already in each row's open chunk
    J = (c - 1 + steps - 1) // c + 1  # chunks a row can touch in this batch
    chunk = (opened[srow] + spos) // c  # (B,) each event's chunk, the open one is 0
    slot = srow * J + chunk
    sums = target.new_zeros(U * J, D).index_add_(0, slot, target).view(U, J, D)
    n = target.new_zeros(U * J).index_add_(0, slot, target.new_ones(len(slot))).view(U, J, 1)
    filled = (opened + counts).unsqueeze(1)  # (U, 1) events from the open chunk's start to the batch end
    last = (filled - 1) // c  # the row's latest chunk
    mids = [mid]
    for j in range(J):
        a = (acc if j == 0 else 0) + n[:, j] * mids[-1] - sums[:, j]
        closes = filled >= (j + 1) * c
        mids.append(torch.where(closes, mids[-1] - (decay * mids[-1] + step * a), mids[-1]))
        acc = torch.where(last == j, torch.where(closes, torch.zeros_like(a), a), acc)
    return torch.stack(mids, 1)[srow, chunk], mids[-1], acc
