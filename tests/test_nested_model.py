"""The nested model's state semantics: batching never changes the result."""

import copy
import json
import math
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys import compiled_memory, fused_update
from recsys.nested import slow
from recsys.nested import (NestedConfig, NestedModel, decay_add, decay_to, load_state, read_speeds, save_state,
                                 sum_levels)

CFG = NestedConfig(n_items=30, dim=8, mem_dim=4, c_mid=3, c_pop=5, pop_half_life=10.0)


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    m = NestedModel(CFG).double()
    with torch.no_grad():  # non-trivial slow weights, so every level moves
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return m


def _events(seed: int, n: int = 40, n_users: int = 6):
    rng = np.random.default_rng(seed)
    users = torch.from_numpy(rng.integers(0, n_users, n))
    items = torch.from_numpy(rng.integers(0, CFG.n_items, n))
    ts = torch.from_numpy(np.sort(rng.integers(1_000, 100_000, n)))
    return users, items, ts


def _apply(model, users, items, ts, cuts):
    state = model.init_state(n_users=1, n_items=CFG.n_items)
    bounds = [0, *sorted(cuts), len(users)]
    for lo, hi in zip(bounds, bounds[1:]):
        if hi > lo:
            state = model.update(state, users[lo:hi], items[lo:hi], ts[lo:hi])
    return state


def _assert_same(a, b):
    """Equal in every row either holds; capacity (amortised growth) may differ, and the
    spare rows of the larger one must still be empty."""
    for name, x in a.tensors().items():
        y = b.tensors()[name]
        if x.dim() == 0:
            assert torch.equal(x, y), name
            continue
        n = min(len(x), len(y))
        assert torch.allclose(x[:n], y[:n], atol=1e-12, rtol=0), name
        for spare in (x[n:], y[n:]):
            assert torch.all((spare == 0) | (spare == -1)), name


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 39), max_size=6))
def test_micro_batch_equals_one_by_one(model64, seed, cuts):
    users, items, ts = _events(seed)
    one_by_one = _apply(model64, users, items, ts, cuts=list(range(1, len(users))))
    batched = _apply(model64, users, items, ts, cuts=cuts)
    _assert_same(one_by_one, batched)


@settings(deadline=None)  # its first example pays the model's warm-up: no timing guess in a test
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 39), max_size=6))
def test_a_time_decayed_population_is_the_same_for_any_batching(model64, seed, cuts):
    by_time = copy.deepcopy(model64)
    by_time.cfg = replace(CFG, pop_half_life_s=20_000.0)
    users, items, ts = _events(seed)
    _assert_same(_apply(by_time, users, items, ts, cuts=list(range(1, len(users)))),
                 _apply(by_time, users, items, ts, cuts=cuts))


@given(seed=st.integers(0, 10_000), parts=st.integers(2, 5))
def test_partial_time_decayed_levels_of_any_split_add_up_to_the_whole(seed, parts):
    """A worker group's partitions each hold a partial level; brought to one time, they sum
    to the level of the whole stream, whatever the split (the serving side's sum)."""
    rng = np.random.default_rng(seed)
    items = torch.from_numpy(rng.integers(0, 30, 200))
    ts = torch.from_numpy(np.sort(rng.integers(1_000, 500_000, 200)))
    part = torch.from_numpy(rng.integers(0, parts, 200))
    empty = torch.zeros(30, dtype=torch.float64), torch.tensor(-1)
    whole, clock = decay_add(*empty, items, ts, 50_000.0)
    partial = [decay_add(*empty, items[part == k], ts[part == k], 50_000.0) for k in range(parts) if (part == k).any()]
    summed = sum(decay_to(pop, pop_ts, clock, 50_000.0) for pop, pop_ts in partial)
    assert torch.allclose(summed, whole, rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 10_000), parts=st.integers(2, 5))
def test_a_population_at_several_speeds_reads_the_same_from_any_split(seed, parts):
    """Each speed is time-decayed, so the partitions' partial levels sum to the whole at
    every speed, and the read, applied to the sum (as serving does), is the whole's read."""
    rng = np.random.default_rng(seed)
    items = torch.from_numpy(rng.integers(0, 30, 300))
    ts = torch.from_numpy(np.sort(rng.integers(1_000, 900_000, 300)))
    part = torch.from_numpy(rng.integers(0, parts, 300))
    half_lives = (10_000.0, 40_000.0, 160_000.0)
    empty = torch.zeros(30, 3, dtype=torch.float64), torch.tensor(-1)
    whole = decay_add(*empty, items, ts, half_lives)
    partial = [decay_add(*empty, items[part == k], ts[part == k], half_lives) for k in range(parts) if (part == k).any()]
    summed, clock = sum_levels(partial, half_lives)
    assert clock == int(whole[1]) and torch.allclose(summed, whole[0], rtol=1e-12, atol=1e-12)
    assert torch.allclose(read_speeds(summed, 20.0), read_speeds(whole[0], 20.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("events_per_day", [50, 400, 3200])
def test_the_population_read_keeps_its_memory_in_events_whatever_the_rate(events_per_day):
    """A model whose history ran at 400 events a day (half-life: the 1 day its latest 400
    events took) serves a stream 8× slower or faster: the level it reads still holds
    about 400 events' worth of counts, as an event-counted level would (a steady stream's
    mass: 400 / ln 2); a single speed would hold 8× too little or too much."""
    cfg = NestedConfig(n_items=10, pop_half_life=400.0, pop_read=1.0, pop_half_life_s=86400.0)
    model = NestedModel(cfg).double()
    n = 40 * events_per_day  # 40 days: every speed up to 16 half-lives is near steady
    ts = torch.arange(n, dtype=torch.int64) * 86400 // events_per_day
    state = model.update_population(model.init_state(0, cfg.n_items), torch.arange(n) % cfg.n_items, ts)
    read = float(model.population_counts(state.pop).sum())
    assert abs(math.log(read / (400 / math.log(2)))) < math.log(1.25), read
    single = float(state.pop[:, cfg.pop_speeds.index(1.0)].sum())  # the history's own speed
    assert events_per_day == 400 or abs(math.log(single / read)) > math.log(4), (single, read)


@pytest.mark.parametrize("pop_half_life_s", [None, 3_600.0])  # the event clock writes its chunk in place
def test_an_update_leaves_its_input_state_as_it_was_unless_donated(model64, pop_half_life_s):
    model = NestedModel(replace(CFG, pop_half_life_s=pop_half_life_s)).double()
    users, items, ts = _events(seed=3)
    before = model.update(model.init_state(6, CFG.n_items), users[:20], items[:20], ts[:20])
    kept = {name: t.clone() for name, t in before.tensors().items()}

    after = model.update(before, users[20:], items[20:], ts[20:])
    _, reads = model.update_reading(before, users[20:], items[20:], ts[20:])
    for name, t in before.tensors().items():
        assert torch.equal(t, kept[name]), f"update wrote into its input's {name}"
    assert not torch.equal(after.M, before.M)  # the events did move the state

    donated = model.update(before, users[20:], items[20:], ts[20:], donate=True)  # `before` is spent now
    _assert_same(donated, after)


def test_every_level_moves(model64):
    users, items, ts = _events(1)
    before = model64.init_state(n_users=6, n_items=CFG.n_items)
    after = _apply(model64, users, items, ts, cuts=[])
    for name in ("M", "S", "mid", "last", "pop"):
        assert not torch.equal(getattr(before, name), getattr(after, name)[: len(getattr(before, name))]), name
    assert int(after.pop_events) == len(users) and int(after.cnt.sum()) == len(users)


def test_unseen_users_and_items_get_state_online(model64):
    state = model64.init_state(n_users=2, n_items=CFG.n_items)
    new_user, new_item = torch.tensor([7]), torch.tensor([CFG.n_items + 4])  # beyond both tables
    state = model64.update(state, new_user, new_item, torch.tensor([5_000]))
    assert state.M.shape[0] >= 8 and state.pop.shape[0] >= CFG.n_items + 5
    assert state.pop_acc[CFG.n_items + 4] == 1.0
    scores = model64.score(state, torch.tensor([7, 1]), CFG.n_items + 5)  # user 1: never seen, population answer
    assert scores.shape == (2, CFG.n_items + 5) and torch.isfinite(scores).all()


def test_an_item_new_to_the_model_scores_as_the_average_item(model64):
    """A new item has no embedding yet: for any user it sits where the average item does,
    not below every item the user's vector points at (Steam: 23 % of the stream's events
    are on games newer than the history)."""
    state = model64.update(model64.init_state(3, CFG.n_items), *_events(3, n_users=3))
    state = model64.grow_state(state, 3, CFG.n_items + 1)
    users = torch.tensor([0, 1, 2])
    scores = model64.score(state, users, CFG.n_items + 1)  # the last: past the table
    E, b = model64.all_items(CFG.n_items)
    counts = model64.population_counts(state.pop)
    affinity = scores[:, :CFG.n_items] - b - model64.pop_term(counts[:CFG.n_items])
    cold = scores[:, -1] - b.mean() - model64.pop_term(counts[CFG.n_items:CFG.n_items + 1])
    assert torch.allclose(cold, affinity.mean(1), atol=1e-9)  # the table's mean affinity, user by user
    assert torch.allclose(E.mean(0), torch.zeros(CFG.dim, dtype=E.dtype), atol=1e-12)


def test_rows_training_never_saw_become_cold():
    model = NestedModel(CFG).double()
    slow.forget_items(model, torch.tensor([3, 7]))
    E, b = model.all_items(CFG.n_items + 1)  # row CFG.n_items: past the table
    for row in (3, 7):
        assert torch.allclose(E[row], E[CFG.n_items], atol=1e-12) and torch.isclose(b[row], b[CFG.n_items])
        assert not model.successors.embedding_bags["next"].weight[row].any()
    assert not torch.allclose(E[4], E[CFG.n_items])


def test_recent_items_keep_each_users_latest_in_order(model64):
    R = model64.cfg.recent_items
    users = torch.tensor([0, 1, 0] + [1] * (R + 2))
    items = torch.arange(len(users))
    state = model64.update(model64.init_state(2, CFG.n_items), users, items % CFG.n_items, torch.arange(len(users)))
    assert state.recent[0].tolist() == [-1] * (R - 2) + [0, 2]  # user 0: two items, oldest first
    assert state.recent[1].tolist() == ((items[users == 1] % CFG.n_items)[-R:]).tolist()  # user 1: the latest R


def test_slow_only_ablation_ignores_the_fast_state(model64):
    users, items, ts = _events(2)
    state = _apply(model64, users, items, ts, cuts=[])
    slow = NestedModel(NestedConfig(**{**CFG.__dict__, "use_fast": False})).double()
    slow.load_state_dict(model64.state_dict())
    a = slow.score(state, torch.tensor([0, 1]), CFG.n_items)
    assert torch.equal(a[0], a[1])  # every user gets the population answer


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_compiled_cpu_walk_gives_the_eager_loops_state_and_reads(dtype, tol, monkeypatch):
    torch.manual_seed(2)
    model = NestedModel(replace(CFG, mem_dim=6)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    users, items, ts = _events(5, n=300, n_users=20)
    assert compiled_memory.usable(model.user0.new_zeros(1, 1, 1))
    results = {}
    for compiled in (True, False):
        monkeypatch.setattr(compiled_memory, "ENABLED", compiled)
        state = model.update(model.init_state(20, CFG.n_items), users[:100], items[:100], ts[:100])
        results[compiled] = model.update_reading(state, users[100:], items[100:], ts[100:])
    (walked, walked_reads), (eager, eager_reads) = results[True], results[False]
    for name, x in eager.tensors().items():
        assert torch.allclose(walked.tensors()[name], x, rtol=tol, atol=tol), name
    assert torch.allclose(walked_reads.z, eager_reads.z, rtol=tol, atol=tol)
    assert eager.M.abs().max() > 0.1  # the memory moved: the comparison compares something


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [True, False], ids=["triton", "eager"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_cuda_gives_the_cpu_result(fused, dtype, tol, monkeypatch):
    monkeypatch.setattr(fused_update, "ENABLED", fused)
    torch.manual_seed(1)
    model = NestedModel(replace(CFG, dim=16, mem_dim=16)).to(dtype)  # the kernel wants powers of two
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    users, items, ts = _events(4, n=600, n_users=50)
    cuda_model = copy.deepcopy(model).cuda()
    assert fused_update.usable(cuda_model.user0.new_zeros(1, 1, 1), 16, 16) == fused
    on_cpu = _apply(model, users, items, ts, cuts=[100, 356])
    on_cuda = _apply(cuda_model, users.cuda(), items.cuda(), ts.cuda(), cuts=[100, 356])
    assert on_cuda.M.is_cuda
    for name, x in on_cpu.tensors().items():
        y = on_cuda.tensors()[name].cpu()
        assert torch.allclose(x, y[: len(x)] if x.dim() else y, rtol=tol, atol=tol), name
    who = torch.arange(50)
    a, b = model.score(on_cpu, who, CFG.n_items), cuda_model.score(on_cuda, who.cuda(), CFG.n_items).cpu()
    assert torch.allclose(a, b, rtol=tol, atol=tol)
    assert torch.equal(a.topk(5).indices, b.topk(5).indices)


def test_checkpoint_round_trips_exactly(model64, tmp_path):
    model64.save(tmp_path / "model.safetensors")
    loaded = NestedModel.load(tmp_path / "model.safetensors")
    assert loaded.cfg == CFG
    for k, v in model64.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    users, items, ts = _events(3)
    state = _apply(model64, users, items, ts, cuts=[10])
    save_state(state, tmp_path / "state.safetensors")
    _assert_same(state, load_state(tmp_path / "state.safetensors"))
    assert torch.equal(model64.score(state, users[:3], CFG.n_items), loaded.score(state, users[:3], CFG.n_items))


def test_a_model_saved_before_the_read_share_keeps_its_memory(model64, tmp_path):
    """Files from before ``pop_read`` were calibrated reading the whole half-life."""
    from safetensors.torch import save_file

    config = asdict(CFG)
    del config["pop_read"]
    save_file({k: v.contiguous() for k, v in model64.state_dict().items()}, str(tmp_path / "old.safetensors"),
              metadata={"config": json.dumps(config)})
    assert CFG.pop_read == 0.25 and NestedModel.load(tmp_path / "old.safetensors").cfg.pop_read == 1.0


def test_meta_training_lowers_the_next_item_loss():
    from offline_eval.protocol import encode
    from recsys.datasets import load_dataset
    from recsys.nested import population_defaults
    from recsys.train import TrainConfig, sequence_loss, train_nested

    history = encode(load_dataset("synthetic", n_users=200, n_items=300, n_events=8_000, seed=5)).history()
    cfg = NestedConfig(n_items=history.n_items_known, **population_defaults(history.n_events, history.ts))
    torch.manual_seed(0)
    untrained = NestedModel(cfg)
    trained, _ = train_nested(history, cfg, TrainConfig(epochs=2, progress=False, calibration_tail=0))
    before, after = sequence_loss(untrained, history), sequence_loss(trained, history)
    assert after < before - 0.03, (before, after)  # measured: 5.42 → 5.35


def test_the_training_unroll_applies_exactly_the_online_update_rule():
    """Meta-training learns the rule the stream worker applies: the unroll's loss over a batch
    of user sequences equals the loss of the same events, each scored from the state that
    `NestedModel.update` reached one event at a time — step for step, in float64."""
    import torch.nn.functional as F

    from offline_eval.protocol import ProtocolConfig, encode
    from recsys.datasets import load_dataset
    from recsys.nested import population_defaults
    from recsys.train import TrainConfig, train_batch, user_sequences, population_snapshots

    history = encode(load_dataset("synthetic", n_users=40, n_items=80, n_events=1_500, seed=2),
                     ProtocolConfig()).history()
    torch.manual_seed(0)
    cfg = NestedConfig(n_items=history.n_items_known, c_mid=3, **population_defaults(history.n_events, history.ts))
    model = NestedModel(cfg).double().eval()
    for p in model.parameters():  # away from the initial values, where some levels are exactly zero
        p.data.add_(torch.randn_like(p) * 0.05)
    train = TrainConfig(progress=False, unroll=4, max_len=10_000)
    snaps = population_snapshots(model, history.items, history.ts, cfg.n_items)
    items_t, ts_t = torch.from_numpy(history.items), torch.from_numpy(history.ts)
    seqs = user_sequences(history, train.max_len)[:8]
    unrolled, n = train_batch(model, None, seqs, items_t, ts_t, snaps, train, np.zeros(len(seqs), dtype=np.int64))

    online = 0.0
    E, b = model.all_items(cfg.n_items)
    for seq in seqs:  # one user at a time, in their events' order
        state = model.init_state(1, cfg.n_items)
        for j in seq.tolist():
            with torch.no_grad():
                z = model.read_users(state, torch.tensor([0]))
                logits = z @ E.T + b + model.pop_term(snaps[j // cfg.c_pop])
                online += float(F.cross_entropy(logits, items_t[j:j + 1], reduction="sum"))
                state = model.update(state, torch.tensor([0]), items_t[j:j + 1], ts_t[j:j + 1])
    assert n == sum(len(s) for s in seqs)
    assert unrolled == pytest.approx(online, rel=1e-10)
