"""The population association level: what follows what, learned online from every event."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from recsys import association
from recsys.association import AssociationConfig

DAY = 86400.0
CFG = AssociationConfig(slots=4, window=2, position_decay=0.5, half_lives_s=(DAY, 64 * DAY))


def _log(users, items, ts):
    return SimpleNamespace(users=np.array(users, dtype=np.int64), items=np.array(items, dtype=np.int64),
                           ts=np.array(ts, dtype=np.int64))


def test_what_follows_a_users_latest_item_gets_the_best_vote():
    # Three users take 0 then 1; one takes 0 then 2: after 0, 1 is what follows.
    log = _log([0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 0, 1, 0, 1, 0, 2], [0, 1, 2, 3, 4, 5, 6, 7])
    level, _ = association.absorb(association.empty(5, CFG), log, CFG)
    votes = association.read(level, torch.tensor([[-1, 0]]), 5, CFG)
    assert votes[0].argmax() == 1 and votes[0, 1] == 1.0
    assert 0 < votes[0, 2] < 1 and votes[0, 3] == 0 and votes[0, 4] == 0


def test_a_micro_batch_gives_the_level_event_by_event_does_and_leaves_its_input_alone():
    rng = np.random.default_rng(0)
    n = 400
    log = _log(rng.integers(0, 30, n), rng.integers(0, 12, n), np.sort(rng.integers(0, 20 * int(DAY), n)))
    cfg = AssociationConfig(slots=12, window=3, half_lives_s=(DAY, 8 * DAY))  # room for every successor
    start = association.empty(12, cfg)
    together, _ = association.absorb(start, log, cfg, batch_size=64)
    one_by_one, _ = association.absorb(start, log, cfg, batch_size=1)
    assert int(start.clock) == -1 and (start.ids == -1).all()  # a value: add made new ones
    recent = torch.tensor([[3, 5, 7], [-1, -1, 2], [11, 0, 4]])
    torch.testing.assert_close(association.read(together, recent, 12, cfg),
                               association.read(one_by_one, recent, 12, cfg))
    torch.testing.assert_close(together.out, one_by_one.out)


def test_partials_of_two_halves_of_a_stream_add_up_to_the_whole():
    # Users split by partition, as a worker group splits them: weights decay by event time,
    # so each half's level, brought to the same clock, sums to the level of the whole stream.
    rng = np.random.default_rng(1)
    n = 600
    log = _log(rng.integers(0, 40, n), rng.integers(0, 10, n), np.sort(rng.integers(0, 10 * int(DAY), n)))
    cfg = AssociationConfig(slots=10, window=2, half_lives_s=(DAY, 16 * DAY))
    whole, _ = association.absorb(association.empty(10, cfg), log, cfg)
    halves = []
    for part in (0, 1):
        keep = log.users % 2 == part
        level, _ = association.absorb(association.empty(10, cfg), _log(log.users[keep], log.items[keep],
                                                                        log.ts[keep]), cfg)
        halves.append(association.add(level, torch.tensor([[-1, -1]]), torch.tensor([0]),
                                      torch.tensor([int(whole.clock)]), cfg))  # brought to the whole's clock
    torch.testing.assert_close(halves[0].out + halves[1].out, whole.out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(halves[0].into + halves[1].into, whole.into, atol=1e-5, rtol=1e-5)

    def pairs(level):
        dense = torch.zeros(10, 10, 2)
        rows = torch.arange(10).unsqueeze(1).expand_as(level.ids)
        kept = level.ids >= 0
        dense[rows[kept], level.ids[kept]] = level.weights[kept]
        return dense

    torch.testing.assert_close(pairs(halves[0]) + pairs(halves[1]), pairs(whole), atol=1e-5, rtol=1e-5)


def test_memory_is_bounded_and_keeps_each_items_strongest_successors():
    # Item 0 is followed by 1..6, item k by k+1 k times more often than by 1: four slots keep 3..6.
    users, items = [], []
    u = 0
    for successor in range(1, 7):
        for _ in range(successor):
            users += [u, u]
            items += [0, successor]
            u += 1
    log = _log(users, items, list(range(len(items))))
    level, _ = association.absorb(association.empty(7, CFG), log, CFG, batch_size=5)
    assert level.ids.shape == (7, CFG.slots)
    assert sorted(level.ids[0].tolist()) == [3, 4, 5, 6]
    assert level.out[0, 1] == pytest.approx(21.0, rel=1e-3)  # every pair counted in the total, kept or not


def test_an_item_new_on_the_stream_gets_associations_from_its_first_events():
    log = _log([0, 0, 1, 1], [0, 1, 0, 1], [0, 1, 2, 3])
    level, recent = association.absorb(association.empty(2, CFG), log, CFG)
    level = association.add(level, torch.tensor([[-1, 1]]), torch.tensor([9]), torch.tensor([4]), CFG)
    assert level.n_items == 10
    assert association.read(level, torch.tensor([[0, 1]]), 10, CFG)[0].argmax() == 9


def test_the_fast_speeds_share_moves_the_vote_towards_what_follows_now():
    # Long ago 0 → 1 (many times); lately 0 → 2 (a few): the slow speed votes 1, the fast 2.
    old = [(u, i, t) for u in range(20) for i, t in ((0, 0), (1, 1))]
    new = [(100 + u, i, t) for u in range(3) for i, t in ((0, int(60 * DAY)), (2, int(60 * DAY) + 1))]
    users, items, ts = zip(*(old + new))
    level, _ = association.absorb(association.empty(3, CFG), _log(users, items, ts), CFG)
    recent = torch.tensor([[-1, 0]])
    assert association.read(level, recent, 3, CFG, fast_share=0.0)[0].argmax() == 1
    assert association.read(level, recent, 3, CFG, fast_share=1.0)[0].argmax() == 2


def test_a_config_out_of_range_says_what_is_wrong():
    with pytest.raises(ValueError, match="fast_share"):
        AssociationConfig(fast_share=1.5, half_lives_s=(DAY,))
    with pytest.raises(ValueError, match="half-lives"):
        association.empty(3, AssociationConfig())


def test_the_nested_replay_calibrates_the_level_on_the_history_and_reads_it_online():
    from offline_eval.nested import NestedReplay
    from offline_eval.protocol import ProtocolConfig, encode
    from offline_eval.replay import replay_model
    from recsys.calibration import ASSOCIATION_WEIGHTS, DISCOUNTS, FAST_SHARES
    from recsys.datasets import load_dataset
    from recsys.train import TrainConfig

    log = encode(load_dataset("synthetic", n_users=200, n_items=150, n_events=6_000, seed=5))
    model = NestedReplay(train_cfg=TrainConfig(progress=False, epochs=1))  # the default has the level
    result = replay_model(model, log, ProtocolConfig(batch_size=256), progress=False)
    fit = model.describe()
    assert fit["association_weight"] in ASSOCIATION_WEIGHTS and fit["association_discount"] in DISCOUNTS
    assert fit["association_fast_share"] in FAST_SHARES
    assert model.model.association_config().fast_share == fit["association_fast_share"]  # read as calibrated
    assert int(model.state.association().clock) == int(log.ts[-1])  # the level learned from the whole stream
    assert np.isfinite(result.ranks).sum() > 0


def _part(log, p):
    mine = log.users % 2 == p
    return _log(log.users[mine], log.items[mine], log.ts[mine])


def test_serving_tails_the_partitions_changelog_and_the_graph_votes_as_the_model_does(broker, tmp_path):
    """Two partitions' partial levels, sent as a worker sends them (whole, then changed rows
    at a later clock), tailed by serving and read through the exported graph: the vote of the
    one level of the whole stream."""
    import uuid

    import onnxruntime as ort

    from serving.association import AssociationTables
    from serving.export import AssociationRead, Scorer, write_graph
    from streaming.association_log import AssociationLog

    rng = np.random.default_rng(3)
    n_items, n = 30, 600
    cfg = AssociationConfig(slots=30, window=3, half_lives_s=(DAY, 16 * DAY), popularity_discount=0.25,
                            fast_share=0.25)  # room for every successor: partials add up exactly
    log = _log(rng.integers(0, 40, n), rng.integers(0, n_items, n), np.sort(rng.integers(0, 30 * int(DAY), n)))
    half = n // 2
    first, second = (_log(log.users[s], log.items[s], log.ts[s]) for s in (slice(0, half), slice(half, n)))
    whole, _ = association.absorb(association.empty(n_items, cfg), log, cfg)

    topic = f"assoc-{uuid.uuid4().hex[:8]}"
    changelog = AssociationLog(broker.bootstrap_servers, topic, every_s=0.0)
    parts, recent = {}, {}
    for p in (0, 1):  # users split by parity, as a keyed topic splits them
        level, recent[p] = association.absorb(association.empty(n_items, cfg), _part(first, p), cfg)
        parts[p] = SimpleNamespace(association=lambda level=level: level)
        changelog.take_over(p)
    changelog.send(parts, force=True)  # each partition's whole level as of the first half
    for p in (0, 1):
        batch = _part(second, p)
        level, _ = association.absorb(parts[p].association(), batch, cfg, recent=recent[p])
        parts[p] = SimpleNamespace(association=lambda level=level: level)
        changelog.touched(p, torch.cat([torch.arange(n_items), torch.tensor([-1])]))  # rows it changed; -1: none
    changelog.send(parts, force=True)
    changelog.flush()

    tables = AssociationTables(broker.bootstrap_servers, topic, list(cfg.half_lives_s), cfg.window, cfg.position_decay)
    assert tables.refresh() > 0
    scorer = Scorer(torch.randn(n_items, 8), torch.zeros(n_items), torch.tensor(0.0),
                    association=AssociationRead(torch.tensor(2.0), torch.tensor(cfg.popularity_discount),
                                                association.speed_shares(2, cfg.fast_share)))
    session = ort.InferenceSession(str(write_graph(scorer, tmp_path / "assoc.onnx")), providers=["CPUExecutionProvider"])
    user = torch.randn(1, 8)
    for latest in ([3], [7, 1, 12], [0, 5, 9, 22]):
        entries = tables.entries(latest, n_items)
        inputs = {"user": user.numpy(), "absent_s": np.zeros(1, np.float32), "population": np.zeros(n_items, np.float32),
                  "exclude": np.zeros((1, n_items), bool), "extra": np.zeros(0, np.float32)} | entries
        got = session.run(None, inputs)[0]
        want_votes = association.read(whole, torch.tensor([latest]), n_items, cfg)
        assert float(want_votes.max()) == 1.0  # something follows: the vote moves the scores
        want = torch.topk(user @ scorer.E.T + scorer.b + 2.0 * want_votes, n_items).values
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    tables.close()
    changelog.close()
