import polars as pl
import pytest

from recsys.datasets import DEFAULT_ML1M, load_dataset, load_log
from recsys.log_contract import ReadConfig
from recsys.synthetic import SyntheticConfig, generate

needs_ml1m = pytest.mark.skipif(not DEFAULT_ML1M.exists(), reason="shared/data/ml-1m is not beside the checkout")


@needs_ml1m
def test_movielens_counts_and_order():
    ds = load_dataset("ml-1m")
    inter = ds.interactions
    assert inter.height == 999_611
    assert inter["user_id"].n_unique() == 6_040
    assert inter["item_id"].n_unique() == 3_416
    assert inter["ts"].is_sorted()
    assert ds.sha256 == "5c8cb52af741aa698915d4be97458f9c8ea4dec5a57aad81fba482d53de9e871"
    assert ds.users.height == 6_040 and {"gender", "age", "occupation", "zip1"} <= set(ds.users.columns)
    assert ds.items.height == 3_883 and ds.items["year"].null_count() == 0


def test_generic_log_with_column_mapping_and_string_ids(tmp_path):
    path = tmp_path / "log.csv"
    pl.DataFrame({"who": ["b", "a", "b"], "what": ["x", "y", "x"], "when": [30, 10, 20]}).write_csv(path)
    ds = load_log(path, ReadConfig(columns={"user_id": "who", "item_id": "what", "ts": "when"}))
    assert ds.interactions["ts"].to_list() == [10, 20, 30]
    assert ds.interactions["user_id"].to_list() == ["a", "b", "b"]  # the log's own ids, time-ordered


def test_synthetic_is_deterministic_per_seed():
    cfg = SyntheticConfig(n_users=200, n_items=300, n_events=5_000, seed=7)
    a, b = generate(cfg), generate(cfg)
    assert a.interactions.equals(b.interactions) and a.sha256 == b.sha256
    c = generate(SyntheticConfig(n_users=200, n_items=300, n_events=5_000, seed=8))
    assert not a.interactions.equals(c.interactions)


def test_synthetic_has_its_ground_truth_structure():
    ds = generate(SyntheticConfig(n_users=500, n_items=2000, n_events=40_000, seed=1))
    inter = ds.interactions
    assert inter["ts"].is_sorted()
    assert inter.select(pl.struct("user_id", "item_id").is_unique().all()).item()  # implicit feedback
    # Late arrivals: some users and items are first seen in the second half of the log.
    first_seen = inter.group_by("user_id").agg(pl.col("ts").min())
    assert (first_seen["ts"] > inter["ts"].median()).sum() > 20
    # Users follow their taste clusters far more often than chance (1 / n_clusters).
    cluster = ds.extra["item_cluster"][inter["item_id"].to_numpy() - 1]
    taste = ds.extra["user_taste"][inter["user_id"].to_numpy() - 1]
    top_cluster = taste.argmax(1)
    assert (cluster == top_cluster).mean() > 2 / taste.shape[1]
