"""The session-based kNN baseline (V-SKNN style): neighbours who took the session's items vote
for what else they took."""

from types import SimpleNamespace

import numpy as np
import torch

from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from offline_eval.sknn import SKNNConfig, SKNNOnline
from recsys.datasets import load_dataset


def _log(users, items):
    users, items = np.array(users, dtype=np.int64), np.array(items, dtype=np.int64)
    return SimpleNamespace(users=users, items=items, n_events=len(users))


def test_neighbours_who_took_the_session_vote_for_what_else_they_took():
    # Users 0-2 took 1, 2 then 3; user 3 took 1, 5; user 4 has taken 1 and 2: 3 comes next, not 5.
    log = _log([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 4], [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 5, 1, 2])
    sknn = SKNNOnline(SKNNConfig(takers=10, votes=5), session=2, neighbours=3)
    sknn.update(log)
    scores = sknn.score(torch.tensor([4]), 6)[0]
    assert int(scores.argmax()) == 3 and scores[3] > scores[5] > scores[0]


def test_a_neighbour_shares_only_the_session_items_it_took_among_their_latest_takers():
    sknn = SKNNOnline(SKNNConfig(takers=2, votes=5), session=3, neighbours=5)
    sknn.update(_log([0, 1, 2, 3], [7, 7, 7, 7]))  # item 7 keeps its latest two takers: 2 and 3
    ids, sims = sknn._neighbours(torch.tensor([[-1, -1, 7]]), torch.tensor([9]), 5)
    assert sorted(ids[0][ids[0] >= 0].tolist()) == [2, 3]
    assert torch.allclose(sims[0][ids[0] >= 0], torch.tensor([1.0, 1.0]))  # the latest session item weighs 1


def test_the_replay_chooses_its_session_and_neighbours_on_the_history():
    log = encode(load_dataset("synthetic", n_users=150, n_items=120, n_events=5_000, seed=2))
    sknn = SKNNOnline(SKNNConfig(sessions=(2, 5), neighbours=(10, 40)))
    result = replay_model(sknn, log, ProtocolConfig(batch_size=128), progress=False)
    assert (sknn.session, sknn.neighbours) in [(m, k) for m in (2, 5) for k in (10, 40)]
    assert "chosen on the history" in sknn.describe()["summary"]
    assert np.isfinite(result.ranks).mean() > 0.9  # nearly every event gets a rank from its neighbours or the prior
