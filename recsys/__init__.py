"""The model package, the ground floor: no Kafka, Feast, HTTP or replay.

The nested model (`nested_model`: levels, update, score; `association`: the association
level; `partials`: the population level's numpy arithmetic), its training (`train`) and the
mix of its levels (`calibration`), the log contract (`log_contract`, `datasets`), and the
baselines the replay compares it with (`baselines`, `mf`, `sasrec`).
"""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "NestedConfig": "recsys.nested_model", "NestedModel": "recsys.nested_model", "FastState": "recsys.nested_model",
    "score_items": "recsys.nested_model",
    "TrainConfig": "recsys.train", "train_nested": "recsys.train",
    "ReadConfig": "recsys.log_contract", "Dataset": "recsys.dataset", "load_dataset": "recsys.datasets",
})
