"""A micro-batch's events laid out for the user levels, and the one walk over them.

The events are laid out step-major (step t holds the t-th event of every user that has one)
with users ordered by event count, so each step's users are a prefix of the rows and its
events a contiguous slice. `walk` then runs the user-fast and user-mid levels over every
user's events in order, on one of three back-ends that give the same result (tested in
float32 and float64): one Triton kernel on CUDA (`recsys/fused_update.py`), one compiled walk
on the CPU (`recsys/compiled_memory.py`, Numba), or the eager per-step loop (training, where
gradients flow, and the fallback).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from recsys import compiled_memory, fused_update
from recsys.nested.user_fast import memory_steps
from recsys.nested.user_mid import chunk_ends, mid_chunks


class Layout(NamedTuple):
    uniq: torch.Tensor  # (U,) the batch's users, busiest first
    counts: torch.Tensor  # (U,) their events in the batch
    row: torch.Tensor  # (B,) each event's row (its user's index in uniq)
    pos: torch.Tensor  # (B,) each event's position among its user's events
    active: torch.Tensor  # (T,) users with an event at each step (CPU)
    step_start: torch.Tensor  # (T,) where each step's slice begins
    sm: torch.Tensor  # (B,) event indices, step-major
    srow: torch.Tensor  # (B,) step-major rows
    spos: torch.Tensor  # (B,) step-major positions


def step_major(users: torch.Tensor) -> Layout:
    dev = users.device
    uniq, inv, counts = torch.unique(users, return_inverse=True, return_counts=True)  # (U,), (B,), (U,)
    by_count = torch.argsort(counts, descending=True, stable=True)
    row_of = torch.empty_like(by_count)
    row_of[by_count] = torch.arange(len(uniq), device=dev)
    uniq, counts, row = uniq[by_count], counts[by_count], row_of[inv]
    order = torch.argsort(row, stable=True)  # events grouped by row, time order kept inside
    pos = torch.empty_like(row)
    pos[order] = torch.arange(len(row), device=dev) - (torch.cumsum(counts, 0) - counts)[row[order]]
    # Users still active at each step, from one host copy of the counts (one device sync).
    active = torch.bincount(counts.cpu() - 1).flip(0).cumsum(0).flip(0)
    step_start = torch.tensor((active.cumsum(0) - active).tolist(), device=dev)
    sm = torch.argsort(pos * len(uniq) + row)
    return Layout(uniq, counts, row, pos, active, step_start, sm, row[sm], pos[sm])


def walk(M, S, mid, acc, cnt, terms, q, lay: Layout, c_mid: int, rates, dims: tuple[int, int]):
    """Both user levels over the batch, every row's events in order. M and S (the batch's
    rows) are written in place; ``q``: (B, m) step-major read queries, or None when nothing
    is read. → (mid, acc after the batch, the memory's read before each event, each event's
    mid before it); the last two None where nothing is read."""
    if q is None and fused_update.usable(M, *dims):  # CUDA: one kernel for all steps
        ends = chunk_ends(cnt[lay.srow] + lay.spos + 1, c_mid, M.dtype)
        fused_update.recurrence(M, S, mid, acc, terms, ends, lay.step_start, lay.counts, rates)
        return mid, acc, None, None
    if compiled_memory.usable(M):  # CPU: one compiled walk over each row's events, both user levels
        read_before, mid_before = compiled_memory.recurrence(M, S, mid, acc, terms, q, lay.step_start, lay.counts,
                                                             cnt, c_mid, rates)
        return mid, acc, read_before, mid_before
    sizes = lay.active.tolist()
    mid_before, mid, acc = mid_chunks(mid, acc, terms["mid_target"], lay.srow, lay.spos, cnt, lay.counts,
                                      len(sizes), rates, c_mid)
    return mid, acc, memory_steps(M, S, terms, q, sizes), mid_before
