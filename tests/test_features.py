"""A real Feast repo with a SQLite online store: apply, materialize, push, get, point-in-time."""

import json
from datetime import datetime, timezone

import numpy as np
import pandas as pd
import polars as pl
import pytest

from features.sources import write_sources
from features.store import FeatureRepo
from recsys.dataset import Dataset
from recsys.datasets import load_dataset


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    ds = load_dataset("synthetic", n_users=100, n_items=150, n_events=3_000, seed=9)
    repo = FeatureRepo.create(tmp_path_factory.mktemp("features"))
    counts = write_sources(ds, repo.path)
    history_items = set(ds.interactions.head(2_400)["item_id"])
    assert counts["item_attributes"] == len(history_items | set(ds.items["item_id"]))  # the history's and the catalogue's
    repo.apply()
    repo.materialize()
    return repo


def test_materialized_item_attributes_are_online(repo):
    attrs = pl.read_parquet(repo.path / "data" / "item_attributes.parquet").sort("item_id").head(3)
    got = repo.online(["item_attributes:history_events"], "item_id", attrs["item_id"])
    assert got["history_events"] == attrs["history_events"].to_list()
    described = repo.item_attributes(attrs["item_id"].to_list() + ["no-such-item"])
    assert [described[i] for i in attrs["item_id"]] == [json.loads(a) for a in attrs["attributes"]]
    assert all(described[i]["genres"][0].startswith("cluster-") for i in attrs["item_id"])  # the generator's catalogue
    assert "no-such-item" not in described  # an item without attributes gets none, not an error


def test_push_then_get_returns_the_pushed_vector(repo):
    vectors = np.random.default_rng(0).normal(size=(2, 64)).astype(np.float32)
    repo.push_user_state([5, 6], vectors, events=[3, 4], recent_items=[[10, 11], []], last_ts=[1_000, 2_000])
    got = repo.user_state([5, 6, 999_999])
    assert np.allclose(got["vector"][0], vectors[0]) and np.allclose(got["vector"][1], vectors[1])
    assert got["events"][:2] == [3, 4] and got["recent_items"][0] == [10, 11] and got["last_ts"][:2] == [1_000, 2_000]
    assert got["vector"][2] is None  # an unknown user gets no state, not an error


def test_historical_features_are_point_in_time_correct(tmp_path):
    # History = the first 4 events, so item 1's attributes (2 events) are stamped at T+2100,
    # its last history event: an event at T+1500 must not see them, one at T+9500 must.
    T = 1_700_000_000
    ds = Dataset("tiny", pl.DataFrame({"user_id": [1, 1, 2, 1, 2], "item_id": [1, 2, 1, 3, 2],
                                       "ts": [T + 1000, T + 2000, T + 2100, T + 9000, T + 9100]}))
    repo = FeatureRepo.create(tmp_path)
    write_sources(ds, repo.path)
    repo.apply()
    stamp = lambda s: datetime.fromtimestamp(T + s, timezone.utc)  # noqa: E731
    entity_df = pd.DataFrame({"item_id": [1, 1], "event_timestamp": [stamp(1500), stamp(9500)]})
    out = repo.historical(entity_df, ["item_attributes:history_events"]).sort_values("event_timestamp")
    values = out["history_events"].tolist()
    assert len(values) == 2 and pd.isna(values[0])  # the value stamped later (t=2100) is never joined to the earlier event
    assert values[1] == 2  # item 1 has 2 history events, visible after t=2100


def test_a_folder_without_a_repo_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="recsys features apply"):
        FeatureRepo(tmp_path)


def test_reads_go_on_while_the_stream_worker_writes(repo):
    import sqlite3

    repo.push_user_state(["reader"], [np.ones(64, dtype=np.float32)], events=[1])
    writer = sqlite3.connect(repo.path / "data" / "online.db", isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # a push mid-commit (the worker pushes every 0.1 s)
    try:
        assert repo.user_state(["reader"])["events"] == [1]  # WAL: a writer holds no reader off
    finally:
        writer.execute("ROLLBACK")
        writer.close()
