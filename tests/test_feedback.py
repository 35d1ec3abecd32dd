"""Kinds of feedback: a "no" is never served back, an impression teaches nothing, and a log
with kinds replays over its positive events."""

import numpy as np
import polars as pl
import pytest
import torch

from offline_eval.protocol import encode
from offline_eval.report import ReplayConfig, run_replay
from recsys.datasets import load_dataset
from recsys.feedback import FEEDBACK
from recsys.nested import NestedConfig, NestedModel, load_state, save_state
from recsys.train import TrainConfig


@pytest.fixture(scope="module")
def model():
    return NestedModel(NestedConfig(n_items=30, pop_half_life_s=3600.0)).eval()


def test_a_dislike_masks_the_item_for_that_user_only_and_teaches_no_level(model):
    state = model.init_state(2, 30)
    users, items = torch.tensor([0, 0, 1]), torch.tensor([4, 7, 7])
    ts = torch.tensor([100, 101, 102])
    weight = torch.tensor([1.0, FEEDBACK.weight("dislike"), 1.0])
    after = model.update(state, users, items, ts, weight=weight)
    scores = model.score(after, torch.tensor([0, 1]), 30)
    assert scores[0, 7] == float("-inf") and torch.isfinite(scores[1, 7])
    assert after.events(torch.tensor([0])).item() == 1  # the "no" is not an interaction
    assert 7 not in after.latest_items(torch.tensor([0])).tolist()[0]
    # The population counts the two positive events and not the dislike of item 7 by user 0.
    only_positive = model.update(state, users[[0, 2]], items[[0, 2]], ts[[0, 2]])
    assert torch.allclose(after.level_counts(), only_positive.level_counts())


def test_an_ignored_impression_teaches_no_level_and_holds_the_item_back_for_a_day(model):
    state = model.init_state(1, 30)
    state = model.update(state, torch.tensor([0]), torch.tensor([3]), torch.tensor([100]), donate=True)
    after = model.update(state, torch.tensor([0]), torch.tensor([9]), torch.tensor([500]),
                         weight=torch.tensor([FEEDBACK.weight("impression")]))
    assert torch.equal(after.level_counts(), state.level_counts())
    assert torch.equal(after.M, state.M) and torch.equal(after.recent, state.recent)
    assert model.score(after, torch.tensor([0]), 30)[0, 9] == float("-inf")
    a_day_on = model.update(after, torch.tensor([0]), torch.tensor([4]), torch.tensor([500 + 86_400]))
    assert torch.isfinite(model.score(a_day_on, torch.tensor([0]), 30)[0, 9])  # back once the window is past
    window = model.cfg.impression_window_s
    assert 9 in after.masked_items(torch.tensor([0]), window).tolist()[0]  # what serving masks
    assert 9 not in a_day_on.masked_items(torch.tensor([0]), window).tolist()[0]


def test_what_a_user_said_no_to_is_part_of_their_row_and_survives_a_save(model, tmp_path):
    state = model.update(model.init_state(1, 30), torch.tensor([0]), torch.tensor([5]), torch.tensor([100]),
                         weight=torch.tensor([-1.0]))
    save_state(state, tmp_path / "state.safetensors")
    back = load_state(tmp_path / "state.safetensors")
    assert model.score(back, torch.tensor([0]), 30)[0, 5] == float("-inf")
    fields, items = back.split_items(back.user_rows(torch.tensor([0])))
    rejoined = back.join_items(fields, items)
    assert rejoined["negative"][0, -1].item() == 5
    # A row stored before kinds of feedback (its latest items alone) comes back with none turned down.
    old = back.join_items(fields, items[:, :model.cfg.recent_items])
    assert (old["negative"] == -1).all() and (old["shown"] == -1).all() and (old["shown_ts"] == -1).all()


def test_a_log_without_kinds_replays_as_before():
    ds = load_dataset("synthetic", n_events=3000, n_users=100, n_items=200)
    assert encode(ds).weight is None
    views = ds.interactions.with_columns(event_type=pl.lit("purchase"))  # one positive kind: still plain
    assert encode(type(ds)("plain", views)).weight is None


def test_on_a_log_with_kinds_the_nested_model_beats_itself_taking_every_event_for_a_view():
    ds = load_dataset("synthetic-kinds", n_events=30_000, n_users=500, n_items=750)
    kinds = ds.interactions["event_type"].value_counts()
    assert set(kinds["event_type"]) == {"view", "purchase", "dislike", "impression"}
    report = run_replay(ds, ReplayConfig(models=("itemknn_online", "nested", "nested_as_views"), progress=False,
                                         train=TrainConfig(progress=False, epochs=1)))
    m = report["models"]
    positives = int((encode(ds).weight[encode(ds).n_history:] > 0).sum())
    assert m["nested"]["overall"]["events"] == positives  # targets: the positive stream events alone
    assert m["nested"]["overall"]["ndcg@10"] > m["nested_as_views"]["overall"]["ndcg@10"]
    assert m["nested"]["negative_shown@10"] == 0.0  # never served back what a user said no to
    assert m["nested_as_views"]["negative_shown@10"] > 0.01  # the masking is what makes it 0
    assert m["itemknn_online"]["negatives_filtered_by_replay"] and not m["nested"]["negatives_filtered_by_replay"]


def test_a_rating_below_the_threshold_is_a_no():
    w = FEEDBACK.weights(np.array(["rating", "rating", "rating", "view"], dtype=object),
                         np.array([5.0, 1.0, np.nan, np.nan]))
    assert w.tolist() == [1.0, -1.0, 1.0, 1.0]
