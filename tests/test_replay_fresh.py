"""Replay v2 ("fresh users") for every model: each event is ranked from its user's state
after all their earlier events, as a live system with sub-second freshness serves it."""

import numpy as np
import pytest
import torch

from offline_eval.hybrid import Hybrid
from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from offline_eval.baselines import DecayedPop, ItemKNNOnline, PopOnline, PopStatic
from recsys.batch_users import earlier_same_user, sequences_before, user_positions
from recsys.datasets import load_dataset
from offline_eval.mf import mf_online, mf_static
from recsys.nested import NestedConfig, NestedModel
from offline_eval.sasrec import SASRecConfig, SASRecStatic
from offline_eval.nested import NestedReplay
from recsys.train import TrainConfig

QUICK = TrainConfig(progress=False, epochs=1)
MODELS = {
    "pop_static": PopStatic,
    "pop_online": PopOnline,
    "pop_online_decay": lambda: DecayedPop(half_life_s=86400.0),
    "itemknn_online": ItemKNNOnline,
    "hybrid": Hybrid,
    "mf_static": lambda: mf_static(epochs=1),
    "mf_online": lambda: mf_online(epochs=1),
    "sasrec_static": lambda: SASRecStatic(SASRecConfig(epochs=1, dim=16, max_len=10)),
    "nested": lambda: NestedReplay(train_cfg=QUICK),
    "nested_slow_only": lambda: NestedReplay(use_fast=False, train_cfg=QUICK),
}


@pytest.fixture(scope="module")
def log():
    return encode(load_dataset("synthetic", n_users=80, n_items=120, n_events=2_000, seed=4))


@pytest.mark.parametrize("name", MODELS)
def test_with_one_event_per_batch_both_versions_rank_alike(name, log):
    ranks = {}
    for freshness in ("event", "batch"):
        torch.manual_seed(0)
        ranks[freshness] = replay_model(MODELS[name](), log, ProtocolConfig(batch_size=1, user_freshness=freshness),
                                        progress=False).ranks
    np.testing.assert_array_equal(ranks["event"], ranks["batch"])
    assert np.isfinite(ranks["event"]).any()


def test_bursts_rank_better_fresh_for_models_that_read_the_user():
    # The synthetic log's users stay in a session cluster: a fresh state sees the session.
    log = encode(load_dataset("synthetic", n_users=150, n_items=300, n_events=8_000, seed=6))

    def ndcg(model, freshness):
        r = replay_model(model, log, ProtocolConfig(batch_size=256, user_freshness=freshness), progress=False).ranks
        return float(np.where(r <= 10, 1 / np.log2(r + 1), 0).mean())

    assert ndcg(ItemKNNOnline(), "event") > 1.05 * ndcg(ItemKNNOnline(), "batch")


def test_sequences_before_each_event_include_the_users_earlier_batch_events():
    start = torch.tensor([[0, 1, 2], [0, 0, 9]])[[0, 1, 0, 0]]  # user 7's row, user 3's, 7's, 7's
    users, items = torch.tensor([7, 3, 7, 7]), torch.tensor([10, 11, 12, 13])
    assert sequences_before(start, users, items).tolist() == [[0, 1, 2], [0, 0, 9], [1, 2, 10], [2, 10, 12]]
    assert user_positions(users).pos.tolist() == [0, 0, 1, 2]
    assert earlier_same_user(users)[3].tolist() == [True, False, True, False]


def test_the_nested_reads_equal_the_state_after_the_users_earlier_events_one_by_one():
    torch.manual_seed(0)
    model = NestedModel(NestedConfig(n_items=30, dim=8, mem_dim=4, c_mid=3, c_pop=5, pop_half_life=10.0)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(1)
    users = torch.from_numpy(rng.integers(0, 5, 40))
    items = torch.from_numpy(rng.integers(0, 33, 40))  # a few past the table: cold items
    ts = torch.from_numpy(np.sort(rng.integers(1_000, 100_000, 40)))
    state = model.update(model.init_state(5, 33), users[:10], items[:10], ts[:10])  # a history

    _, reads = model.update_reading(state, users[10:], items[10:], ts[10:])
    one_by_one = state
    for j in range(10, 40):
        u = users[j:j + 1]
        expect = model.read_users(one_by_one, u)[0]
        torch.testing.assert_close(reads.z[j - 10], expect, rtol=1e-10, atol=1e-12)
        assert reads.last_ts[j - 10] == one_by_one.last_ts[u][0]
        one_by_one = model.update(one_by_one, u, items[j:j + 1], ts[j:j + 1])
    # Reading changes nothing: the state after update_reading is update's.
    after_read, _ = model.update_reading(state, users[10:], items[10:], ts[10:])
    after = model.update(state, users[10:], items[10:], ts[10:])
    for name, value in after.tensors().items():
        torch.testing.assert_close(getattr(after_read, name), value)


def test_the_oracle_knows_the_synthetic_logs_true_distribution_and_tops_every_model():
    from offline_eval.report import ReplayConfig, run_replay

    ds = load_dataset("synthetic", n_users=200, n_items=300, n_events=10_000, seed=8)
    report = run_replay(ds, ReplayConfig(models=("pop_online_decay", "itemknn_online", "oracle"), progress=False))
    ndcg = {name: m["overall"]["ndcg@10"] for name, m in report["models"].items()}
    assert ndcg["oracle"] > max(ndcg["pop_online_decay"], ndcg["itemknn_online"])
    assert report["models"]["oracle"]["oracle_fraction"] == 1.0
    assert 0 < report["models"]["itemknn_online"]["oracle_fraction"] < 1
    with pytest.raises(ValueError, match="ground truth"):
        run_replay(_no_truth(), ReplayConfig(models=("oracle",), progress=False))


def _no_truth():
    import polars as pl

    from recsys.dataset import Dataset

    return Dataset("plain", pl.DataFrame({"user_id": [1, 2, 1], "item_id": [1, 2, 2], "ts": [1, 2, 3]}))
