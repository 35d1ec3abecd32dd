"""The model package, the ground floor: no Kafka, Feast, HTTP or replay.

The nested model (`nested/`: levels, update, score; `association`: the association
level; `partials`: the population level's numpy arithmetic), its training (`train`) and the
mix of its levels (`calibration`), the log contract (`log_contract`, `datasets`), and tables
that grow online (`rows`). The baselines the replay compares it with live in `offline_eval`.
"""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "NestedConfig": "recsys.nested", "NestedModel": "recsys.nested", "FastState": "recsys.nested",
    "score_items": "recsys.nested",
    "TrainConfig": "recsys.train", "train_nested": "recsys.train",
    "ReadConfig": "recsys.log_contract", "Dataset": "recsys.dataset", "load_dataset": "recsys.datasets",
})
