"""Feast: the feature definitions, the repo template, the offline sources, and `FeatureRepo`,
the one class that talks to Feast (apply, materialize, push, get)."""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "FeatureRepo": "features.store", "population_key": "features.store", "is_population_key": "features.store",
    "write_sources": "features.sources",
})
