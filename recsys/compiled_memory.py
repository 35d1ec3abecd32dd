"""The user levels' per-event recurrence compiled for the CPU (Numba).

`NestedModel.update` runs the user-fast memory's write rule once per step over all of that
step's users, and the user-mid level once per chunk. On a CPU each step costs four small
tensor ops of ~10 µs of dispatch each, and ML-1M's users rate in bursts: a 256-event
micro-batch holds ~110 steps, so that loop was ~45 % of the update. Here one compiled call
walks each user row's events in order instead, the row's memory, momentum, adapter and
accumulator staying in the core's cache (as the Triton kernel does on CUDA).

It computes exactly `NestedModel.memory_step` and `NestedModel.mid_step`, and each event's
reads before its own write (the eager loop stays the reference, used in training, where
gradients flow, and where Numba is absent); `tests/test_nested_model.py` checks that the
two agree.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # the eager loop is used
    numba = None

ENABLED = os.environ.get("RECSYS_COMPILED_MEMORY", "1") != "0"


def usable(M: torch.Tensor) -> bool:
    """Whether the compiled walk can run this update: a CPU tensor of float32 or float64."""
    return ENABLED and numba is not None and M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64)


def recurrence(M: torch.Tensor, S: torch.Tensor, mid: torch.Tensor, acc: torch.Tensor, terms: dict[str, torch.Tensor],
               q: torch.Tensor | None, step_start: torch.Tensor, counts: torch.Tensor, cnt: torch.Tensor, c_mid: int,
               rates: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Apply every event of a micro-batch to the gathered user rows' fast levels, in place.

    M, S: (U, m, m) and mid, acc: (U, D), contiguous; terms: step-major per event (B, …) as
    `NestedModel.event_terms` makes them; q: (B, m) step-major read queries, or None;
    step_start: (T,) first event of each step; counts: (U,) events per row in this batch;
    cnt: (U,) events per row before it (where user-mid chunks close); rates: user-mid
    (step, decay). → with ``q``, each event's memory read and user-mid adapter before its
    own write, (B, m) and (B, D) step-major; (None, None) without."""
    B, m, D = terms["k"].shape[0], M.shape[1], mid.shape[1]
    flat = [terms[name].reshape(B, -1).contiguous().numpy() for name in ("k", "neg_v", "theta_k", "mid_target")]
    retain, eta = (terms[name].reshape(B).contiguous().numpy() for name in ("retain", "eta"))
    read = q is not None
    reads, mids = M.new_empty(B if read else 0, m), M.new_empty(B if read else 0, D)
    queries = q.contiguous().numpy() if read else reads.numpy()
    step, decay = (float(r) for r in rates)
    _walk(M.numpy(), S.numpy(), mid.numpy(), acc.numpy(), *flat, retain, eta, queries, reads.numpy(), mids.numpy(),
          step_start.numpy(), counts.numpy(), cnt.numpy(), c_mid, step, decay, read)
    return (reads, mids) if read else (None, None)


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _walk(M, S, mid, acc, k, neg_v, theta_k, target, retain, eta, q, reads, mids, step_start, counts, cnt,
              c_mid, step, decay, read):
        # Users are independent: each row's events in their order, the row's levels hot.
        m, D = M.shape[1], mid.shape[1]
        for r in range(M.shape[0]):
            for t in range(counts[r]):
                e = step_start[t] + r
                # User-fast (`NestedModel.memory_step`): row a of M sees only its own error,
                # S_a ← η·S_a − e_a·θk, M_a ← (1 − α)·M_a + S_a.
                for a in range(m):
                    err = np.float64(neg_v[e, a])
                    seen = 0.0
                    for b in range(m):
                        err += M[r, a, b] * k[e, b]
                        if read:
                            seen += M[r, a, b] * q[e, b]
                    if read:
                        reads[e, a] = seen
                    for b in range(m):
                        s = eta[e] * S[r, a, b] - err * theta_k[e, b]
                        S[r, a, b] = s
                        M[r, a, b] = retain[e] * M[r, a, b] + s
                # User-mid (`NestedModel.mid_step`): the gradient accumulates; a chunk's last
                # event applies it with decay and restarts the accumulator.
                closes = (cnt[r] + t + 1) % c_mid == 0
                for d in range(D):
                    if read:
                        mids[e, d] = mid[r, d]
                    g = acc[r, d] + (mid[r, d] - target[e, d])
                    if closes:
                        mid[r, d] -= decay * mid[r, d] + step * g
                        acc[r, d] = 0.0
                    else:
                        acc[r, d] = g
