"""The slow level's reads: item embeddings and successor vectors from the TorchRec tables, and
the items' scoring embeddings (the slow level's parameters live on `NestedModel`)."""

from __future__ import annotations

import torch


def item_vectors(model, items: torch.Tensor, table: str = "item") -> torch.Tensor:
    """(…,) item ids → (…, D) via a TorchRec table (``item``: embeddings, ``next``: successor
    vectors); ids past the table, and -1, are cold (zeros)."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    flat = items.reshape(-1)
    known = (flat >= 0) & (flat < model.cfg.n_items)
    if not (torch.is_grad_enabled() or model.sharded):  # online: the same rows, without a jagged bag per call
        bags = model.tables.embedding_bags if table == "item" else model.successors.embedding_bags
        weight = bags[table].weight
        rows = weight[flat.clamp(0, model.cfg.n_items - 1)].masked_fill(~known.unsqueeze(1), 0)
        return rows.float().to(model.user0.dtype).reshape(*items.shape, model.cfg.dim)  # float32, as TorchRec pools
    lengths = known.to(torch.int64)
    # Offsets by plain torch: fbgemm's cumsum kernel is not in every build (CPU-only fbgemm on a GPU host).
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    kjt = KeyedJaggedTensor(keys=[table], values=flat[known], lengths=lengths, offsets=offsets)
    pooled = (model.tables if table == "item" else model.successors)(kjt)[table]  # an empty bag pools to zeros
    # TorchRec pools in float32; the fast levels run in the model's dtype (float64 in tests).
    return pooled.to(model.user0.dtype).reshape(*items.shape, model.cfg.dim)


def scoring_items(model, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scoring embeddings and biases of the first ``n_items`` items, centred on the
    table's mean embedding; items newer than the table have a zero embedding and the
    mean trained bias. Cold start: nothing is known of a new item yet, so it scores as
    the average item would, and the population level ranks it as it gains events.
    (Centring shifts each user's scores by one constant: the softmax and the ranking
    of the table's items do not change; without it a new item would rank below every
    item a user's vector points at, by the average item's affinity.)"""
    E, b = model.item_table(), model.item_bias
    E = E - E.mean(0)
    if n_items > model.cfg.n_items:
        extra = n_items - model.cfg.n_items
        E = torch.cat([E, E.new_zeros(extra, E.shape[1])])
        b = torch.cat([b, b.detach().mean().expand(extra)])
    return E[:n_items], b[:n_items]


@torch.no_grad()
def forget_items(model, rows: torch.Tensor) -> None:
    """Table rows that training never saw as an event (items first seen after its data):
    their embeddings learned only to lose every softmax, so they become cold, as an item
    past the table is: the mean embedding and bias of the others, no successor vector."""
    keep = torch.ones(model.cfg.n_items, dtype=torch.bool)
    keep[rows] = False
    if not len(rows) or not keep.any():
        return
    E = model.tables.embedding_bags["item"].weight
    E[rows] = E[keep].mean(0)
    model.item_bias[rows] = model.item_bias[keep].mean()
    if model.cfg.sequence_items:
        model.successors.embedding_bags["next"].weight[rows] = 0
