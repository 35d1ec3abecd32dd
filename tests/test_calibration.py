"""Calibrating the population/personal mix on the history's tail ranks exactly as the replay does."""

import numpy as np
import pytest
import torch

from offline_eval.metrics import summarize
from offline_eval.protocol import EncodedLog, ProtocolConfig, encode
from offline_eval.replay import replay_model
from recsys.calibration import MULTIPLIERS, calibrate, split_history
from recsys.datasets import load_dataset
from recsys.nested_model import NestedConfig, NestedModel, population_defaults, write_log
from offline_eval.nested import NestedReplay
from recsys.train import TrainConfig, train_nested


def _replay_ndcg(model: NestedModel, fit_part, tail, multiplier: float, fade: float) -> float:
    """NDCG@10 of the protocol's own replay over ``tail``, with the mix set to this pair."""
    weight = model.pop_weight.detach().clone()
    with torch.no_grad():
        model.pop_weight.mul_(multiplier)
        model.fade.fill_(fade)
    replay = NestedReplay()
    replay.model = model
    replay.state = model.init_state(fit_part.n_users_known, fit_part.n_items_known)
    replay.update(fit_part)
    log = EncodedLog(np.concatenate([fit_part.users, tail.users]), np.concatenate([fit_part.items, tail.items]),
                     np.concatenate([fit_part.ts, tail.ts]), fit_part.n_events, fit_part.user_ids, fit_part.item_ids)
    ranks = replay_model(replay, log, ProtocolConfig(batch_size=256), progress=False, fitted=True).ranks
    with torch.no_grad():
        model.pop_weight.copy_(weight)
        model.fade.zero_()
    return summarize(ranks)["ndcg@10"]


def test_the_chosen_pair_is_the_one_the_replay_scores_best():
    history = encode(load_dataset("synthetic", n_users=300, n_items=400, n_events=12_000, seed=3)).history()
    fit_part, tail = split_history(history, 0.25)
    cfg = NestedConfig(n_items=history.n_items_known, **population_defaults(history.n_events, history.ts))
    model, _ = train_nested(fit_part, cfg, TrainConfig(epochs=1, progress=False, calibration_tail=0))
    grid = dict(multipliers=(0.5, 1.0, 4.0), fades=(0.0, 2.0))

    multiplier, fade, _ = calibrate(model, fit_part, tail, score_every=1, **grid)

    by_replay = {(k, f): _replay_ndcg(model, fit_part, tail, k, f) for k in grid["multipliers"] for f in grid["fades"]}
    assert by_replay[multiplier, fade] == max(by_replay.values()), by_replay
    assert len(set(by_replay.values())) > 1  # the pairs really rank differently
    assert float(model.fade) == 0.0  # calibrating leaves the model as it was


@pytest.mark.parametrize("refit", [False, True], ids=["tail-held-out", "refit"])
def test_training_sets_the_calibrated_mix_on_the_model(refit):
    history = encode(load_dataset("synthetic", n_users=200, n_items=300, n_events=8_000, seed=5)).history()
    cfg = NestedConfig(n_items=history.n_items_known, **population_defaults(history.n_events, history.ts))
    fit_part, _ = split_history(history, 0.1)
    # Refit: the slow level trained again on the whole history, the tail included.
    plain, _ = train_nested(history if refit else fit_part, cfg, TrainConfig(epochs=1, progress=False,
                                                                             calibration_tail=0))
    calibrated, state = train_nested(history, cfg, TrainConfig(epochs=1, progress=False, calibration_tail=0.1,
                                                               refit=refit))
    # Trained on the same events, then the mix set on the last 10%: the weights differ by the grid's factor.
    ratio = (calibrated.pop_weight / plain.pop_weight).item()
    assert any(abs(ratio - k) < 1e-5 for k in MULTIPLIERS), ratio
    assert torch.equal(calibrated.item_table(), plain.item_table())
    # The state handed back is the one a fresh write of the whole history gives.
    fresh = write_log(calibrated, calibrated.init_state(history.n_users_known, history.n_items_known), history, 4096)
    for name, value in fresh.tensors().items():
        assert torch.allclose(state.tensors()[name], value, atol=1e-5), name
