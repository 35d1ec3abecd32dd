"""Tables that grow online: users and items first seen on the stream get rows without a restart."""

from __future__ import annotations

import torch


def grow(t: torch.Tensor, n: int, dim: int = 0, fill: float = 0) -> torch.Tensor:
    """``t`` extended along ``dim`` to at least ``n`` (new rows = ``fill``); cold start for tables."""
    if t.shape[dim] >= n:
        return t
    shape = list(t.shape)
    shape[dim] = max(n, int(t.shape[dim] * 1.5))  # amortised growth
    out = torch.full(shape, fill, dtype=t.dtype, device=t.device)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out
