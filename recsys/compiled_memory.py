"""The user-fast memory's per-event recurrence compiled for the CPU (Numba).

`NestedModel.update` runs the memory's write rule once per step over all of that step's
users. On a CPU each step costs four small tensor ops of ~10 µs of dispatch each, and
ML-1M's users rate in bursts: a 256-event micro-batch holds ~110 steps, so that loop was
~45 % of the update. Here one compiled call walks each user row's events in order
instead, the row's memory and momentum (2 × m × m numbers) staying in the core's cache.

It computes exactly `NestedModel.memory_step` and the memory's read before each step
(the eager loop stays the reference, used in training, where gradients flow, and where
Numba is absent); `tests/test_nested_model.py` checks that the two agree.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

try:
    import numba
except ImportError:  # the eager loop is used
    numba = None

log = logging.getLogger("recsys.model")
ENABLED = os.environ.get("RECSYS_COMPILED_MEMORY", "1") != "0"


def usable(M: torch.Tensor) -> bool:
    """Whether the compiled walk can run this update: a CPU tensor of float32 or float64."""
    return ENABLED and numba is not None and M.device.type == "cpu" and M.dtype in (torch.float32, torch.float64)


def recurrence(M: torch.Tensor, S: torch.Tensor, terms: dict[str, torch.Tensor], q: torch.Tensor | None,
               step_start: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
    """Apply every user-fast step of a micro-batch in place on the gathered rows.

    M, S: (U, m, m) contiguous; terms: step-major per event (B, …) as `NestedModel.event_terms`
    makes them; q: (B, m) step-major read queries, or None; step_start: (T,) first event of
    each step; counts: (U,) events per row. → (B, m) each event's memory read before its
    own write (step-major), or None without ``q``."""
    B, m = terms["k"].shape[0], M.shape[1]
    flat = [terms[name].reshape(B, -1).contiguous().numpy() for name in ("k", "neg_v", "theta_k")]
    retain, eta = (terms[name].reshape(B).contiguous().numpy() for name in ("retain", "eta"))
    reads = M.new_empty(B if q is not None else 0, m)
    queries = q.contiguous().numpy() if q is not None else reads.numpy()
    _walk(M.numpy(), S.numpy(), *flat, retain, eta, queries, reads.numpy(),
          step_start.numpy(), counts.numpy(), q is not None)
    return reads if q is not None else None


if numba is not None:

    @numba.njit(cache=True, nogil=True)
    def _walk(M, S, k, neg_v, theta_k, retain, eta, q, reads, step_start, counts, read):
        # Users are independent: each row's events in their order, the row's M and S hot.
        # Row a of M sees only its own error: S_a ← η·S_a − e_a·θk, M_a ← (1 − α)·M_a + S_a.
        m = M.shape[1]
        for r in range(M.shape[0]):
            for t in range(counts[r]):
                e = step_start[t] + r
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
