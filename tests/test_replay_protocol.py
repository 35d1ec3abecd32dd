"""The replay protocol on tiny logs whose ranks are worked out by hand in the comments."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from offline_eval.metrics import summarize
from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from offline_eval.report import ReplayConfig, model_report, run_replay
from offline_eval.baselines import PopOnline, PopStatic
from recsys.dataset import Dataset
from recsys.datasets import DEFAULT_ML1M, load_dataset
from recsys.ranking import ranks_of_targets


def _log(rows) -> Dataset:
    users, items = zip(*rows)
    return Dataset("hand", pl.DataFrame({"user_id": list(users), "item_id": list(items),
                                         "ts": list(range(len(rows)))}))


# 8 history events: counts A=4, B=3, C=1; then the stream: u1 buys C, u5 (new) buys D (new).
HAND = _log([(1, "A"), (1, "B"), (2, "A"), (3, "A"), (2, "C"), (3, "B"), (4, "B"), (4, "A"),
             (1, "C"), (5, "D")])


def test_split_is_by_global_time_at_eighty_percent():
    log = encode(HAND)
    assert log.n_history == 8 and log.n_events == 10
    assert list(log.item_ids) == ["A", "B", "C", "D"]  # dense ids by first appearance


def test_every_metric_on_the_hand_log():
    log = encode(HAND)
    result = replay_model(PopStatic(), log, ProtocolConfig(batch_size=2), progress=False)
    # u1 has seen A and B, so C is the only candidate: rank 1. D is unknown: a miss.
    assert result.ranks.tolist() == [1.0, math.inf]
    m = model_report(result, log, ProtocolConfig(batch_size=2))
    assert m["overall"]["hr@10"] == 0.5 and m["overall"]["ndcg@10"] == 0.5 and m["overall"]["mrr"] == 0.5
    assert m["warm"]["events"] == 1 and m["warm"]["hr@10"] == 1.0  # u1 is in history
    assert m["cold"]["events"] == 1 and m["cold"]["hr@10"] == 0.0  # u5 is not
    # u1's list is [C] (A, B filtered), u5's is [A, B, C]: 3 of the 4 items known at the end.
    assert m["overall"]["coverage@10"] == 0.75
    assert len(m["slices"]) == 10


def test_seen_filter_off_ranks_seen_items_too():
    log = encode(HAND)
    result = replay_model(PopStatic(), log, ProtocolConfig(batch_size=2, seen_filter=False), progress=False)
    # Candidates A(4) B(3) C(1): C is third. NDCG = 1/log2(4) = 0.5, MRR = 1/3.
    assert result.ranks[0] == 3.0
    s = summarize(result.ranks[:1])
    assert s["ndcg@10"] == 0.5 and s["mrr"] == pytest.approx(1 / 3, abs=1e-6)


def test_no_peeking_inside_a_batch():
    # Stream: u5 then u6 both take the new item C.
    log = encode(_log([(1, "A"), (1, "B"), (2, "A"), (2, "B"), (3, "A"), (3, "B"), (4, "A"), (4, "B"),
                       (5, "C"), (6, "C")]))
    together = replay_model(PopOnline(), log, ProtocolConfig(batch_size=2), progress=False)
    assert together.ranks.tolist() == [math.inf, math.inf]  # C unknown before the batch: both miss
    one_by_one = replay_model(PopOnline(), log, ProtocolConfig(batch_size=1), progress=False)
    # After u5's event is revealed, C is known with count 1, behind A(4) and B(4): rank 3.
    assert one_by_one.ranks.tolist() == [math.inf, 3.0]


def test_filtered_items_never_count_as_recommended():
    # Only u1 in the stream; seen A and B must not count towards coverage.
    log = encode(_log([(1, "A"), (1, "B"), (2, "A"), (2, "C"), (3, "A"), (3, "B"), (4, "A"), (4, "B"),
                       (1, "C"), (1, "C")]))
    result = replay_model(PopStatic(), log, ProtocolConfig(batch_size=2), progress=False)
    assert result.covered.tolist() == [False, False, True]


def test_ties_count_against_the_target():
    scores = torch.tensor([[1.0, 1.0, 0.5], [1.0, 1.0, 0.5]])
    ranks = ranks_of_targets(scores, torch.tensor([1, 5]), exclude=None)
    assert ranks.tolist() == [2.0, math.inf]  # tie with item 0 → rank 2; item 5 unknown → miss


def test_report_has_the_protocol_shape(tmp_path):
    ds = load_dataset("synthetic", n_users=200, n_items=300, n_events=6_000, seed=2)
    report = run_replay(ds, ReplayConfig(models=("pop_static", "pop_online"), out=tmp_path, progress=False))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["dataset"]["stream_events"] == 6_000 - 4_800
    for name in ("pop_static", "pop_online"):
        m = on_disk["models"][name]
        assert set(m["cold"]) == set(m["overall"]) - {"coverage@10", "ndcg@10_se"}
        assert 0 < m["overall"]["ndcg@10_se"] < m["overall"]["ndcg@10"]
        assert len(m["slices"]) == 10 and m["replay_events_per_second"] > 0
    assert on_disk["best"].startswith("Best: pop_online") and "cold:" in on_disk["cold_warm"]
    assert on_disk["dataset"]["span"][0] <= on_disk["dataset"]["stream_starts"] <= on_disk["dataset"]["span"][1]
    assert {"python", "torch", "torchrec"} <= set(report["versions"])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("report.md", "ndcg_slices.png", "cold_warm.png"))


def test_unknown_model_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="available: pop_static"):
        ReplayConfig(models=("pop_static", "clairvoyant"))


@pytest.mark.skipif(not DEFAULT_ML1M.exists(), reason="shared/data/ml-1m is not beside the checkout")
def test_ml1m_matches_the_independent_check_values_of_both_versions():
    log = encode(load_dataset("ml-1m"))
    assert (log.n_events, log.n_history) == (999_611, 799_688)
    stream_users = log.users[log.n_history:]
    assert (~np.isin(stream_users, log.users[: log.n_history])).sum() == 95_458

    def check(model, freshness):
        s = summarize(replay_model(model, log, ProtocolConfig(user_freshness=freshness), progress=False).ranks)
        return round(s["hr@10"], 4), round(s["ndcg@10"], 4), round(s["mrr"], 4)

    assert check(PopStatic(), "event") == (round(0.043547, 4), round(0.021469, 4), round(0.022448, 4))
    assert check(PopOnline(), "event") == (round(0.044012, 4), round(0.021941, 4), round(0.023000, 4))
    assert check(PopStatic(), "batch") == (round(0.037644, 4), round(0.017873, 4), round(0.019236, 4))
    assert check(PopOnline(), "batch") == (round(0.038045, 4), round(0.018428, 4), round(0.019912, 4))


# -- version 2: fresh users ------------------------------------------------------------------

# History: u1 A B, u2 A C, u3 A B C, u4 B. Stream, one batch: u1 takes C, then D; u2 takes B.
BURST = _log([(1, "A"), (1, "B"), (2, "A"), (2, "C"), (3, "A"), (3, "B"), (3, "C"), (4, "B"),
              (1, "C"), (1, "D")])


class FollowsLast:
    """Scores each item by how often it followed the user's latest item: the smallest model
    whose ranking depends on the user's own latest event."""

    def __init__(self):
        self.knn = None

    def fit(self, history):
        from offline_eval.baselines import ItemKNNConfig, ItemKNNOnline

        self.knn = ItemKNNOnline(ItemKNNConfig(recent=1, window=1, pop_weight=0.0))
        self.knn.fit(history)

    def score(self, users, n_items):
        return self.knn.score(users, n_items)

    def score_fresh(self, batch, n_items):
        return self.knn.score_fresh(batch, n_items)

    def update(self, batch):
        self.knn.update(batch)


def test_a_users_second_event_in_a_batch_is_ranked_from_a_state_that_includes_the_first():
    log = encode(BURST)
    # "What followed the latest item": A→B (u1, u3), A→C (u2), B→C (u3). u1's latest is B
    # before the batch: C (followed B once) ranks 1st of the unseen {C}. For u1's 2nd event D
    # is unknown at the batch start: a miss either way. So look at the seen filter and state:
    fresh = replay_model(FollowsLast(), log, ProtocolConfig(batch_size=2), progress=False)
    stale = replay_model(FollowsLast(), log, ProtocolConfig(batch_size=2, user_freshness="batch"), progress=False)
    assert fresh.ranks.tolist() == [1.0, math.inf] == stale.ranks.tolist()

    # u1 takes C then B again after a history of A only: fresh, C is seen before the 2nd event.
    log = encode(_log([(1, "A"), (2, "A"), (2, "C"), (2, "B"), (3, "A"), (3, "C"), (3, "B"), (4, "A"),
                       (1, "C"), (1, "B")]))
    # Follows: A→C (u2, u3), C→B (u2, u3); none A→B. u1's 2nd event (B):
    #   v1: latest item A → B scores 0 behind C (2): rank 2.
    #   v2: latest item C (the batch's first event) → B scores 2, and C is filtered as seen: rank 1.
    fresh = replay_model(FollowsLast(), log, ProtocolConfig(batch_size=2), progress=False)
    stale = replay_model(FollowsLast(), log, ProtocolConfig(batch_size=2, user_freshness="batch"), progress=False)
    assert stale.ranks.tolist() == [1.0, 2.0]
    assert fresh.ranks.tolist() == [1.0, 1.0]


def test_an_events_own_item_and_later_events_never_move_its_rank():
    base = [(1, "A"), (2, "A"), (2, "C"), (2, "B"), (3, "A"), (3, "C"), (3, "B"), (4, "A"), (1, "C")]
    ranks = []
    for tail in ([(1, "B"), (1, "C")], [(1, "B"), (1, "D")], [(1, "B"), (2, "A")]):
        log = encode(_log(base + tail))
        result = replay_model(FollowsLast(), log, ProtocolConfig(batch_size=3), progress=False)
        ranks.append(result.ranks[:2].tolist())  # u1's C, then B: unchanged whatever follows them
    assert ranks[0] == ranks[1] == ranks[2]


def test_an_item_the_user_took_earlier_in_the_batch_is_a_miss_and_not_a_candidate():
    log = encode(_log([(1, "A"), (2, "A"), (2, "B"), (3, "B"), (3, "C"), (4, "C"), (4, "A"), (4, "B"),
                       (1, "B"), (1, "B")]))
    result = replay_model(PopStatic(), log, ProtocolConfig(batch_size=2), progress=False)
    assert result.ranks.tolist() == [1.0, math.inf]  # B again: u1 had it one event ago
    stale = replay_model(PopStatic(), log, ProtocolConfig(batch_size=2, user_freshness="batch"), progress=False)
    assert stale.ranks.tolist() == [1.0, 1.0]  # v1 filters only what u1 had before the batch


def test_the_report_records_the_protocol_version(tmp_path):
    ds = load_dataset("synthetic", n_users=100, n_items=120, n_events=3_000, seed=3)
    v2 = run_replay(ds, ReplayConfig(models=("pop_online",), progress=False))
    v1 = run_replay(ds, ReplayConfig(models=("pop_online",), progress=False,
                                     protocol=ProtocolConfig(user_freshness="batch")))
    assert (v2["protocol"]["version"], v2["protocol"]["user_freshness"]) == (2, "event")
    assert (v1["protocol"]["version"], v1["protocol"]["user_freshness"]) == (1, "batch")
    with pytest.raises(ValueError, match="user_freshness"):
        ProtocolConfig(user_freshness="sometimes")
