"""`recsys train`: the model artifact the worker and the exporter start from."""

from __future__ import annotations

import time
from pathlib import Path

from offline_eval.nested import NestedReplay
from offline_eval.protocol import ProtocolConfig, encode
from recsys.dataset import HISTORY_FRACTION
from recsys.train import TrainConfig, distributed_rank


def train_artifact(ds, out, cfg: TrainConfig = TrainConfig(),
                   history_fraction: float = HISTORY_FRACTION) -> NestedReplay:
    """`recsys train`: train on the first ``history_fraction`` of the log (the protocol's
    history; the rest is left for the stream) and save the weights with the log's own item
    ids to ``out``. Returns the fit as the replay's `nested` model (its fast state holds the
    history), so a replay of the same log can use it instead of training again."""
    log = encode(ds, ProtocolConfig(history_fraction=history_fraction))
    history = log.history()
    nested = NestedReplay(train_cfg=cfg)
    t0 = time.perf_counter()
    nested.fit(history)
    nested.fit_seconds = time.perf_counter() - t0
    if distributed_rank()[0] == 0:  # the replicas are identical: one writes
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        nested.model.save(out, item_ids=log.item_ids[:history.n_items_known])
    return nested
