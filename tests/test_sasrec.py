"""The static SASRec baseline: it learns sequences on history, reads each user's
latest items at replay (revealed stream events included), and never changes its weights."""

from dataclasses import replace

import numpy as np
import polars as pl
import torch

from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.metrics import summarize
from offline_eval.replay import replay_model
from offline_eval.baselines import PopStatic
from recsys.dataset import Dataset
from offline_eval.sasrec import SASRecConfig, SASRecStatic

SMALL = SASRecConfig(dim=32, heads=2, layers=1, max_len=8, dropout=0.0, epochs=30, batch_size=64, lr=5e-3)


def walk_log(n_users=300, n_items=40, steps=16, seed=0) -> Dataset:
    """Every user walks the item cycle s, s+1, s+2, … from a random start: the next item is
    fully determined by the last one, while every item is equally popular."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, n_users)
    users = np.repeat(np.arange(n_users), steps)
    items = (starts[:, None] + np.arange(steps)).reshape(-1) % n_items
    # Users interleave in time; each user's own steps stay in order.
    ts = (rng.integers(0, 1_000, n_users)[:, None] + 100 * np.arange(steps)).reshape(-1)
    return Dataset("walk", pl.DataFrame({"user_id": users.astype(str), "item_id": items.astype(str), "ts": ts}))


def test_it_learns_the_walk_that_popularity_cannot_see():
    log = encode(walk_log())
    cfg = ProtocolConfig(batch_size=64)
    sasrec = summarize(replay_model(SASRecStatic(SMALL), log, cfg, progress=False).ranks)
    pop = summarize(replay_model(PopStatic(), log, cfg, progress=False).ranks)
    assert sasrec["hr@10"] > 0.9, sasrec
    assert sasrec["hr@10"] > 2 * pop["hr@10"], (sasrec, pop)


def test_replay_never_changes_its_weights():
    log = encode(walk_log(n_users=80))
    model = SASRecStatic(SMALL)
    model.fit(log.history())
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    replay_model(model, log, ProtocolConfig(batch_size=32), progress=False, fitted=True)
    after = model.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_revealed_events_enter_the_users_sequences_in_order():
    log = encode(walk_log(n_users=50))
    model = SASRecStatic(SMALL)
    model.fit(log.history())
    stream = log.slice(log.n_history, log.n_events)
    model.update(stream)
    for user in np.unique(stream.users)[:10]:
        latest = stream.items[stream.users == user][-SMALL.max_len:]
        assert model.seq[user, -len(latest):].tolist() == (latest + 1).tolist()


def test_an_item_first_seen_online_is_padding_and_ranks_last():
    log = encode(walk_log(n_users=50))
    model = SASRecStatic(SMALL)
    model.fit(log.history())
    n = model.n_items
    user = int(log.users[0])
    model.update(replace(log.slice(0, 1), items=np.array([n + 3])))
    assert model.seq[user, -1] == 0
    scores = model.score(torch.tensor([user]), n + 5)
    assert scores.shape == (1, n + 5)
    assert scores[0, n:].max() < scores[0, :n].min()


def test_one_batch_and_event_by_event_build_the_same_sequences():
    log = encode(walk_log(n_users=30))  # 16 events per user, sequences of 8: the oldest drop out
    whole, one_by_one = SASRecStatic(SMALL), SASRecStatic(SMALL)
    whole.n_items = one_by_one.n_items = log.n_items_known
    whole.update(log)
    for i in range(log.n_events):
        one_by_one.update(log.slice(i, i + 1))
    n = log.n_users_known  # past it: spare rows of amortised growth
    assert torch.equal(whole.seq[:n], one_by_one.seq[:n])
    assert (whole.seq[:n] > 0).all()  # every user has at least max_len events: no padding left
