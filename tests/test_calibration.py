"""Calibrating the population/personal mix on the history's tail ranks exactly as the replay does."""

import numpy as np
import pytest
import torch

from offline_eval.metrics import summarize
from offline_eval.protocol import EncodedLog, ProtocolConfig, encode
from offline_eval.replay import replay_model
from recsys.calibration import MIXTURE_MULTIPLIERS, MULTIPLIERS, Mix, choose, mixes, score_tail, split_history
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel, population_defaults, write_log
from offline_eval.nested import NestedReplay
from recsys.train import TrainConfig, train_nested


def _replay_ndcg(model: NestedModel, fit_part, tail, mix: Mix) -> float:
    """NDCG@10 of the protocol's own replay over ``tail``, with this mix set on the model."""
    weight = model.pop_weight.detach().clone()
    with torch.no_grad():
        model.pop_weight.mul_(mix.multiplier)
        model.fade.fill_(mix.fade)
        model.pop_share.fill_(mix.share)
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
        model.pop_share.zero_()
    return summarize(ranks)["ndcg@10"]


def test_the_tail_scores_every_mix_exactly_as_the_replay_does():
    history = encode(load_dataset("synthetic", n_users=300, n_items=400, n_events=12_000, seed=3)).history()
    fit_part, tail = split_history(history, 0.25)
    cfg = NestedConfig(n_items=history.n_items_known, **population_defaults(history.n_events, history.ts))
    model, _ = train_nested(fit_part, cfg, TrainConfig(epochs=1, progress=False, calibration_tail=0))
    grid = dict(multipliers=(0.5, 4.0), fades=(0.0, 2.0), shares=(0.25, 0.75), mixture_multipliers=(1.0, 4.0))

    order, ndcg, _, _ = score_tail(model, fit_part, tail, score_every=1, **grid)

    by_replay = {mix: _replay_ndcg(model, fit_part, tail, mix) for mix in mixes(**grid)}
    assert order == mixes(**grid)
    for mix, on_tail in zip(order, ndcg.mean(1).tolist()):
        assert round(on_tail, 6) == by_replay[mix], mix  # the report rounds to 6 digits
    assert len(set(by_replay.values())) > 1  # the mixes really rank differently
    for form in (lambda mix: mix.share == 0, lambda mix: mix.share > 0):  # both forms are in the race
        assert len({v for mix, v in by_replay.items() if form(mix)}) > 1
    assert float(model.fade) == 0.0 and float(model.pop_share) == 0.0  # calibrating leaves the model as it was


def test_near_ties_in_ndcg_go_to_the_likelier_mix_and_clear_wins_stand():
    grid = [Mix(1.0, 0.0, 0.0), Mix(2.0, 0.0, 0.5), Mix(4.0, 0.0, 0.0)]
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2_000, generator=g, dtype=torch.float64)
    noise = torch.randn(2_000, generator=g, dtype=torch.float64)
    noise -= noise.mean()  # the gaps below are exactly as stated; the standard error is 0.01 / √2000 ≈ 0.0002
    likelihood = torch.tensor([[-9.0], [-7.0], [-8.0]], dtype=torch.float64).expand(-1, 500)
    # The mixed one trails the best by under two standard errors: the likelier one wins.
    for gap in (0.0001, 0.0003):
        near = torch.stack([base, base + 0.01 * noise - gap, base - 0.05])
        assert choose(grid, near, likelihood) == grid[1]
    # It trails by more than two standard errors: the better ranking stands, however likely the other.
    for gap in (0.0007, 0.01):
        far = torch.stack([base, base + 0.01 * noise - gap, base - 0.05])
        assert choose(grid, far, likelihood) == grid[0]


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
    share = float(calibrated.pop_share)
    assert any(abs(ratio - k) < 1e-5 for k in (MIXTURE_MULTIPLIERS if share else MULTIPLIERS)), ratio
    assert any(abs(ratio - m.multiplier) < 1e-5 and m.share == share for m in mixes())
    assert torch.equal(calibrated.item_table(), plain.item_table())
    # The state handed back is the one a fresh write of the whole history gives.
    fresh = write_log(calibrated, calibrated.init_state(history.n_users_known, history.n_items_known), history, 4096)
    for name, value in fresh.tensors().items():
        assert torch.allclose(state.tensors()[name], value, atol=1e-5), name
