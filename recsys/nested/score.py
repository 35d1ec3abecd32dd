"""The nested model's one score, and the two forms its levels mix in (additive or mixed)."""

from __future__ import annotations

import torch


def trust(absent_s: torch.Tensor, fade: torch.Tensor) -> torch.Tensor:
    """(B,) seconds since each user's latest event → (B,) weight of their personal score:
    tastes read from old events say less about today than what everyone watches now.
    The one formula for replay, the stream worker and the exported serving graph."""
    return 1 / (1 + fade * torch.log1p(absent_s.clamp(min=0) / 86400))


def score_items(z: torch.Tensor, E: torch.Tensor, b: torch.Tensor, population: torch.Tensor,
                weight: torch.Tensor | None = None, share: torch.Tensor | None = None,
                association: torch.Tensor | None = None) -> torch.Tensor:
    """The nested model's one score: (…, D) user vectors, (N, D) item embeddings and (N,)
    biases of the slow level, the population term (broadcast to (…, N)), ``trust`` weights
    (…,) of the personal part (None: 1), the population expert's ``share`` of the mixture
    (None: the additive ``weight · ⟨z, e_i⟩ + b_i + population_i``), and the association
    level's weighted votes (…, N) for what follows the user's latest items, part of the
    personal expert (None: none). Replay, calibration (over a grid of mixes at once),
    training, the stream's push and the exported serving graph all score with it."""
    if weight is not None:  # scaling the (…, D) vectors, not the (…, N) affinities: one pass less
        z = z * weight.unsqueeze(-1)
    personal = z @ E.T + b
    if association is not None:
        personal = personal + association
    if share is None:
        return personal + population
    return mixture(personal, population, share)


def mixture(personal: torch.Tensor, population: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """log(π · softmax(population) + (1 − π) · softmax(personal)) over the items (last dim),
    π = ``share``; the inputs broadcast (calibration scores a grid of mixes at once).

    Additive, the population term's scale sets how far a user's levels can move an item: where
    popularity is steep (trends, a few hits), a fresh session changes the order only among
    items of equal popularity. Mixed, each expert brings its own most likely items: the
    synthetic log's generator draws events this way (a session's cluster, trending items,
    popularity)."""
    a = torch.log_softmax(population, -1) + torch.log(share)
    b = torch.log_softmax(personal, -1) + torch.log1p(-share)
    if torch.onnx.is_in_onnx_export():  # logaddexp, in ops ONNX has
        return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.logaddexp(a, b)  # one pass: calibration mixes a grid of (G, B, N) at once
