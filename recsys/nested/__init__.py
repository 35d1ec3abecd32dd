"""The nested model: config, state, one module per level, the walk, the score, the model file.

    >>> from recsys.nested import NestedConfig, NestedModel
    >>> model = NestedModel(NestedConfig(n_items=1000))
"""

from recsys.nested.config import NestedConfig
from recsys.nested.io import load_item_ids, model_config, write_log
from recsys.nested.model import NestedModel
from recsys.nested.population import (POPULATION_CLOCK, consolidate, decay_add, decay_to, population_defaults,
                                      population_term, read_speeds, sum_levels)
from recsys.nested.score import mixture, score_items, trust
from recsys.nested.state import POPULATION_FIELDS, USER_FIELDS, FastState, Reads, load_state, save_state
from recsys.nested.view import LevelView, ServingView, UserRowsView

__all__ = ["NestedConfig", "NestedModel", "FastState", "Reads", "USER_FIELDS", "POPULATION_FIELDS", "POPULATION_CLOCK",
           "ServingView", "UserRowsView", "LevelView", "consolidate", "decay_add", "decay_to", "load_item_ids", "load_state", "mixture", "model_config",
           "population_defaults", "population_term", "read_speeds", "save_state", "score_items", "sum_levels",
           "trust", "write_log"]
