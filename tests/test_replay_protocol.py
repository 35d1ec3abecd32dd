"""The replay protocol on tiny logs whose ranks are worked out by hand in the comments."""

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from offline_eval.metrics import ranks_of_targets, summarize
from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from offline_eval.report import ReplayConfig, model_report, run_replay
from recsys.baselines import PopOnline, PopStatic
from recsys.datasets import DEFAULT_ML1M, Dataset, load_dataset


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
        assert set(m["cold"]) == set(m["overall"]) - {"coverage@10"}
        assert len(m["slices"]) == 10 and m["replay_events_per_second"] > 0
    assert {"python", "torch", "torchrec"} <= set(report["versions"])
    assert all((tmp_path / f).stat().st_size > 0 for f in ("report.md", "ndcg_slices.png", "cold_warm.png"))


def test_unknown_model_names_are_refused_with_the_list():
    with pytest.raises(ValueError, match="available: pop_static"):
        ReplayConfig(models=("pop_static", "oracle"))


@pytest.mark.skipif(not DEFAULT_ML1M.exists(), reason="shared/data/ml-1m is not beside the checkout")
def test_ml1m_matches_the_independent_check_values():
    log = encode(load_dataset("ml-1m"))
    assert (log.n_events, log.n_history) == (999_611, 799_688)
    stream_users = log.users[log.n_history:]
    assert (~np.isin(stream_users, log.users[: log.n_history])).sum() == 95_458
    static = summarize(replay_model(PopStatic(), log, ProtocolConfig(), progress=False).ranks)
    online = summarize(replay_model(PopOnline(), log, ProtocolConfig(), progress=False).ranks)
    assert (round(static["hr@10"], 4), round(static["ndcg@10"], 4), round(static["mrr"], 4)) == (0.0376, 0.0179, 0.0192)
    assert (round(online["hr@10"], 4), round(online["ndcg@10"], 4)) == (0.0380, 0.0184)
