"""`recsys train`: the model artifact the worker and the exporter start from."""

from __future__ import annotations

from pathlib import Path

from offline_eval.protocol import ProtocolConfig, encode
from recsys.dataset import HISTORY_FRACTION
from recsys.nested_model import NestedModel
from recsys.train import TrainConfig, distributed_rank, train_nested


def train_artifact(ds, out, cfg: TrainConfig = TrainConfig(), history_fraction: float = HISTORY_FRACTION) -> NestedModel:
    """`recsys train`: train on the first ``history_fraction`` of the log (the protocol's
    history; the rest is left for the stream) and save weights + item ids to ``out``."""
    log = encode(ds, ProtocolConfig(history_fraction=history_fraction))
    history = log.history()
    model, _ = train_nested(history, cfg=cfg)
    if distributed_rank()[0] == 0:  # the replicas are identical: one writes
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        model.save(out, item_ids=log.item_ids[:history.n_items_known])
    return model
