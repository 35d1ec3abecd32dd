"""The user-fast level: a matrix memory per user, written every event by the Titans delta rule
with momentum and forgetting, its step θ, decay α and momentum η gated by the item and the
time gap (`NestedModel.event_terms`). Read with the user's latest item as the query."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_read(M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(U, m, m) memories, (U, m) queries → (U, m) reads."""
    return torch.bmm(M, q.unsqueeze(-1)).squeeze(-1)


def memory_step(M, S, term, in_place: bool = False, err: torch.Tensor | None = None):
    """User-fast, one event per row (Titans delta rule with momentum and forgetting):
    S ← η·S − θ·∇½‖Mk − v‖² = η·S − (Mk − v)(θk)ᵀ, M ← (1 − α)·M + S.
    ``in_place``: written into M and S (views of the batch's rows; no autograd);
    ``err``: Mk − v, where the caller has it already."""
    if err is None:
        err = torch.baddbmm(term["neg_v"], M, term["k"])  # (U, m, 1) the memory's prediction error
    S = torch.baddbmm(term["eta"] * S, err, term["theta_k"], alpha=-1, out=S if in_place else None)
    return torch.addcmul(S, term["retain"], M, out=M if in_place else None), S


def memory_steps(M, S, terms, q, sizes: list[int]) -> torch.Tensor | None:
    """User-fast over a whole batch, eagerly: `memory_step` once per step over the first
    ``sizes[t]`` rows (the step's users), in place. q: (B, m) step-major read queries or
    None → (B, m) the memory's read before each event, or None."""
    names = ("k", "neg_v", "theta_k", "retain", "eta")
    if q is not None:  # one product gives each step's error and the memory's read before it: M·[k, q] − [v, 0]
        terms = terms | {"k": torch.cat([terms["k"], q.unsqueeze(-1)], -1), "neg_v": F.pad(terms["neg_v"], (0, 1))}
    products = torch.empty_like(terms["neg_v"])  # (B, m, 1 or 2) step-major, a slice per step
    rows = {}  # the first n rows of M and S, one pair of views per step size
    # Each step's slice of the terms, cut once: on a CPU the loop is op-bound.
    for n, out, *term in zip(sizes, products.split(sizes), *(terms[name].split(sizes) for name in names)):
        if n not in rows:
            rows[n] = M[:n], S[:n]
        torch.baddbmm(term[1], rows[n][0], term[0], out=out)
        memory_step(*rows[n], dict(zip(names, term)), in_place=True, err=out[..., :1])
    return products[..., 1] if q is not None else None
