"""The Feast feature definitions: entities, sources, and two feature views.

Paths are relative to the feature repo (the folder holding `feature_store.yaml`),
where `recsys features apply` writes the parquet sources from the history.
"""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bytes, Float32, Int64, String


# Keys are strings, as in the `Event` schema: product ids are often UUIDs; integer ids
# (MovieLens) are their decimal strings.
# A user of the product; join key `user_id`.
user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
# A catalogue item; join key `item_id`.
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

# Per-item attributes from the history log and the catalogue.
item_attributes_source = FileSource(name="item_attributes_source", path="data/item_attributes.parquet",
                                    timestamp_field="event_timestamp")
# Fresh user state, pushed by the stream worker per micro-batch; the parquet is its batch log.
user_state_push = PushSource(name="user_state_push", batch_source=FileSource(
    name="user_state_log", path="data/user_state.parquet", timestamp_field="event_timestamp"))

# What the item is: activity in history, and the catalogue's own attributes as one JSON object
# (any columns: genres and year for MovieLens, price or category for a shop); served beside each
# recommended item. (What a user did and what is popular now are the model's fast levels:
# the user_state view below, not batch features.)
item_attributes = FeatureView(
    name="item_attributes", entities=[item], ttl=timedelta(days=365 * 30), source=item_attributes_source,
    schema=[Field(name="item_id", dtype=String), Field(name="history_events", dtype=Int64),
            Field(name="first_ts", dtype=Int64), Field(name="attributes", dtype=String)])
# The user's fast-level state as a vector, as fresh as the last pushed micro-batch.
user_state = FeatureView(
    name="user_state", entities=[user], ttl=timedelta(days=365 * 30), source=user_state_push,
    schema=[Field(name="user_id", dtype=String), Field(name="vector", dtype=Array(Float32)),
            Field(name="events", dtype=Int64), Field(name="recent_items", dtype=Array(Int64)),
            Field(name="last_ts", dtype=Int64),
            Field(name="fast_state", dtype=Bytes)])  # an evicted user's whole row (stream worker's user TTL)

ALL = [user, item, item_attributes_source, user_state_push, item_attributes, user_state]
