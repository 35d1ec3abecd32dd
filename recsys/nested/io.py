"""Model files (safetensors + a JSON config, no pickle) and applying a whole log."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from recsys.nested.config import NestedConfig


def save_weights(model, path, item_ids=None) -> None:
    """Weights, config and (for serving and the stream worker) the external item id of each
    table row, so events can name items as the product does."""
    from safetensors.torch import save_file

    metadata = {"config": json.dumps(asdict(model.cfg))}
    if item_ids is not None:
        metadata["item_ids"] = json.dumps([str(i) for i in item_ids])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)


def read_weights(path) -> tuple[NestedConfig, dict[str, torch.Tensor]]:
    """A model file's config and weights; buffers added since a file was saved get the values
    that file's model had (no mixture, no association level)."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    dtype = weights["user0"].dtype
    weights.setdefault("pop_share", torch.zeros((), dtype=dtype))
    weights.setdefault("assoc_weight", torch.zeros((), dtype=dtype))
    weights.setdefault("assoc_discount", torch.tensor(0.5, dtype=dtype))
    weights.setdefault("assoc_fast_share", torch.tensor(0.5, dtype=dtype))  # its two speeds were averaged
    return model_config(path), weights


def model_config(path) -> NestedConfig:
    """A model file's config, read from its metadata (no weights loaded). A file saved before
    ``pop_read`` was calibrated reading the whole ``pop_half_life``: it keeps reading that."""
    return NestedConfig(**{"pop_read": 1.0} | json.loads(_metadata(path)["config"]))


def load_item_ids(path) -> list[str]:
    """The external item ids of a model file's table rows (row order)."""
    meta = _metadata(path)
    if "item_ids" not in meta:
        raise ValueError(f"{path} holds no item ids: save it with `recsys train`")
    return json.loads(meta["item_ids"])


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file at {path}: train one with `recsys train --out {path}`")
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def write_log(model, state, log, batch_size: int):
    """Apply a whole time-ordered log (anything with ``users``, ``items``, ``ts`` arrays, and a
    ``weight`` one where it has kinds of feedback) in micro-batches of ``batch_size``; ``state``
    is donated."""
    weight = getattr(log, "weight", None)
    for lo in range(0, len(log.users), batch_size):
        part = (torch.from_numpy(a[lo:lo + batch_size]) for a in (log.users, log.items, log.ts))
        w = None if weight is None else torch.from_numpy(weight[lo:lo + batch_size])
        state = model.update(state, *part, donate=True, weight=w)
    return state
