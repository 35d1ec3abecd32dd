"""Offline training of the slow level, which meta-learns the fast levels' update rule.

Users' history sequences are unrolled through the same `NestedModel.write` the online
path uses: for each event, predict it from the state before it (softmax over all
items), then write it. Gradients flow through the writes inside a chunk of
``unroll`` steps (truncated backprop); the state carries across chunks detached.
The loss lives here, not in the model, so the exported graph holds no training code.

Shapes: ``U`` users in a training batch, ``L`` padded sequence length, ``N`` items.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recsys.calibration import association_link, calibrate, split_history
from recsys.nested import FastState, NestedConfig, NestedModel, population_defaults, score_items, slow, write_log
from recsys.nested.user_fast import memory_step
from recsys.nested.user_mid import mid_step


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    users_per_batch: int = 64
    unroll: int = 16  # steps of backprop through the fast writes
    # Train on each user's latest events: bounds the cost of heavy users. Chosen on the
    # histories' own 80/20 replays (NDCG@10, 128 → 256): ML-1M 0.1607 → 0.1640 (seed 0) and
    # 0.1599 → 0.1705 (seed 1), synthetic 0.0703 → 0.0708, Steam 0.0514 → 0.0518 (its users
    # are short: within its seeds' spread, 0.0514–0.0533).
    max_len: int = 256
    lr: float = 1e-2
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    absorb_batch: int = 4096  # micro-batch for writing the history into the fast state
    # The latest share of the history held out to calibrate the population level's weight
    # (recsys/calibration.py); 0 keeps the weight meta-training learned.
    calibration_tail: float = 0.1
    # Once the mix is set on the tail, train the slow level again on the whole history, so
    # it knows the tail's events and the items they introduce (the stream's newest), and
    # apply the mix to it. Chosen on the histories' own 80/20 replays (NDCG@10 without →
    # with): ML-1M 0.1551 → 0.1610, Steam 0.0463 → 0.0473, synthetic 0.0646 → 0.0638.
    # Costs a second training.
    refit: bool = True
    # Under torchrun: split the item table across the processes (TorchRec model parallel)
    # instead of replicating it; the dense parameters stay data parallel.
    shard: bool = False


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN or inf loss); the half-trained model is dropped."""


def population_snapshots(model: NestedModel, items: np.ndarray, ts: np.ndarray, n_items: int) -> torch.Tensor:
    """(chunks + 1, N): the population level's read counts as they stand before each chunk of
    ``c_pop`` events, by the model's own online step (`NestedModel.update_population`)."""
    C = model.cfg.c_pop
    level = model.init_state(0, n_items)
    snaps = [model.population_counts(level.pop)]
    for lo in range(0, len(items), C):
        part, part_ts = (torch.from_numpy(a[lo:lo + C]).to(level.pop.device) for a in (items, ts))
        level = model.update_population(level, part, part_ts, donate=True)
        snaps.append(model.population_counts(level.pop)[:n_items])
    return torch.stack(snaps)


def untrained_rows(history, n_items: int) -> torch.Tensor:
    """The table rows of items without an event in ``history``."""
    return torch.from_numpy(np.setdiff1d(np.arange(n_items), history.items))


def user_sequences(history, max_len: int) -> list[np.ndarray]:
    """Each user's latest ``max_len`` event positions in time order, longest first (less padding)."""
    order = np.lexsort((np.arange(len(history.users)), history.users))
    users_sorted = history.users[order]
    cuts = np.flatnonzero(np.diff(users_sorted)) + 1
    seqs = [s[-max_len:] for s in np.split(order, cuts)]
    return sorted(seqs, key=len, reverse=True)


def train_nested(history, model_cfg: NestedConfig | None = None, cfg: TrainConfig = TrainConfig()
                 ) -> tuple[NestedModel, FastState]:
    """Meta-train on the history but its latest ``calibration_tail``, then set the mix of the
    population and personal levels (weight multiplier, fade) on that tail, and, where the model
    has an association level (``model_cfg.assoc_half_lives_s``), how its votes enter the score (`calibration.association_link`);
    with ``refit``, train again on the whole history and give that model the mix. Returns
    the model and the fast state after the whole history.

    A history with kinds of feedback (``history.weight``): the slow level and the mix learn
    from its positive events; the fast state is then written from every event, each by its
    kind (a "no" masked for its user, a purchase counted as more than a view)."""
    if getattr(history, "weight", None) is not None:
        model, _ = train_nested(history.revealed("positives"), model_cfg, cfg)
        with torch.no_grad():
            state = model.init_state(history.n_users_known, history.n_items_known, device=cfg.device)
            return model, write_log(model, state, history, cfg.absorb_batch)
    model_cfg = model_cfg or NestedConfig(n_items=history.n_items_known,
                                          **population_defaults(history.n_events, history.ts))
    if not model_cfg.use_fast or cfg.calibration_tail <= 0:
        return _train_and_write(history, model_cfg, cfg)
    fit_part, tail = split_history(history, cfg.calibration_tail)
    model = _meta_train(fit_part, model_cfg, cfg)
    if cfg.progress and distributed_rank()[0] == 0:
        print(f"calibrating the mix of the levels on the history's latest {cfg.calibration_tail:.0%} …", flush=True)
    t0 = time.perf_counter()
    mix, state = calibrate(model.cpu(), fit_part, tail, absorb_batch=cfg.absorb_batch)
    seconds = time.perf_counter() - t0
    link = None
    if model_cfg.association:  # on the tail, with the mix as served: a copy of the fit part's model
        probe = copy.deepcopy(model)
        _set_mix(probe, mix)
        link = association_link(probe, fit_part, tail, absorb_batch=cfg.absorb_batch)
        if cfg.progress and distributed_rank()[0] == 0:
            print(f"association level on the tail: weight {link.weight:g}, popularity discount {link.discount:g}, "
                  f"fast share {link.fast_share:g}")
    if cfg.refit:
        model, state = _train_and_write(history, model_cfg, cfg)
    model.to(cfg.device)
    _set_mix(model, mix)
    if link is not None:
        with torch.no_grad():
            model.assoc_weight.fill_(link.weight)
            model.assoc_discount.fill_(link.discount)
            model.assoc_fast_share.fill_(link.fast_share)
    if cfg.progress and distributed_rank()[0] == 0:
        form = f"mixed, population share {mix.share:g}" if mix.share else "additive"
        print(f"calibrated on the history's latest {cfg.calibration_tail:.0%} in {seconds:.0f}s: {form}, "
              f"population weight ×{mix.multiplier:g} → {model.pop_weight.item():.3f}, fade {mix.fade:g}")
    return model, state.to(cfg.device)


@torch.no_grad()
def _set_mix(model: NestedModel, mix) -> None:
    model.pop_weight.mul_(mix.multiplier)
    model.fade.fill_(mix.fade)
    model.pop_share.fill_(mix.share)


def _train_and_write(history, model_cfg: NestedConfig, cfg: TrainConfig) -> tuple[NestedModel, FastState]:
    """Meta-train on ``history``, then write it into a fresh fast state."""
    model = _meta_train(history, model_cfg, cfg)
    with torch.no_grad():
        return model, write_log(model, model.init_state(history.n_users_known, history.n_items_known), history,
                                cfg.absorb_batch)


def _meta_train(history, model_cfg: NestedConfig, cfg: TrainConfig) -> NestedModel:
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = NestedModel(model_cfg).to(cfg.device)
    if cfg.shard:
        shard_item_table(model, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # the sharded table's optimizer is its own
    snaps = population_snapshots(model, history.items, history.ts, model_cfg.n_items)
    items_t = torch.from_numpy(history.items).to(cfg.device)
    ts_t = torch.from_numpy(history.ts).to(cfg.device)
    seqs = user_sequences(history, cfg.max_len)
    batches = [seqs[i:i + cfg.users_per_batch] for i in range(0, len(seqs), cfg.users_per_batch)]

    rank, world = distributed_rank()
    if world > 1:  # every rank takes its share of each batch's users: the same steps everywhere
        batches = [b for b in batches if len(b) >= world]
    for epoch in range(cfg.epochs):
        t0, total, n = time.perf_counter(), 0.0, 0
        bar = tqdm(rng.permutation(len(batches)), desc=f"train nested {epoch + 1}/{cfg.epochs}",
                   disable=not cfg.progress or rank > 0, mininterval=1.0)
        for b in bar:
            # Random user-mid counter phases, so training sees every phase (CMS); drawn for
            # the whole batch so that every rank's generator stays in step.
            phases = rng.integers(0, model_cfg.c_mid, len(batches[b]))
            loss_sum, count = train_batch(model, opt, batches[b][rank::world], items_t, ts_t, snaps, cfg,
                                           phases[rank::world], length=len(batches[b][0]))
            if not math.isfinite(loss_sum):  # a NaN model is never saved, served or cached
                raise NonFiniteLoss(f"training loss became {loss_sum} in epoch {epoch + 1} (lr {cfg.lr:g}): "
                                    f"nothing was saved; lower --lr, or check the log's timestamps and ids")
            total, n = total + loss_sum, n + count
            bar.set_postfix(loss=f"{total / max(n, 1):.3f}", refresh=False)
        if cfg.progress and rank == 0:
            print(f"epoch {epoch + 1}: loss {total / max(n, 1):.4f} in {time.perf_counter() - t0:.0f}s")
    model = unshard(model) if cfg.shard else model
    slow.forget_items(model, untrained_rows(history, model_cfg.n_items))
    return model.eval()


def shard_item_table(model: NestedModel, cfg: TrainConfig) -> None:
    """TorchRec model parallel: the item table becomes a `DistributedModelParallel` module
    whose rows (GPUs) or columns (CPUs: fbgemm's CPU kernels shard no rows) are split across
    the ranks; lookups and their gradients travel by all-to-all. Its optimizer runs fused
    in the backward (Adagrad: the fused CPU kernels have no Adam). Every rank starts from
    the same seeded table, copied into its shard."""
    import torch.distributed as dist
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    rank, world = distributed_rank()
    if world < 2:
        raise ValueError("sharding the item table needs several processes: launch with torchrun --nproc_per_node N")
    device = torch.device(cfg.device)
    initial = model.item_table().detach().clone()
    apply_optimizer_in_backward(torch.optim.Adagrad, model.tables.parameters(), {"lr": 5 * cfg.lr})
    constraints = None if device.type == "cuda" else {"item": ParameterConstraints(
        sharding_types=["column_wise"], min_partition=max(1, model.cfg.dim // world))}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device.type),
                                       constraints=constraints)
    sharder = EmbeddingBagCollectionSharder()
    plan = planner.collective_plan(model.tables, [sharder], dist.GroupMember.WORLD)
    model.tables = DistributedModelParallel(model.tables, device=device, plan=plan, sharders=[sharder],
                                            init_data_parallel=False)
    model.sharded = True
    for shard in model.tables.state_dict()["embedding_bags.item.weight"].local_shards():
        (r, c), (h, w) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        shard.tensor.detach().copy_(initial[r:r + h, c:c + w])
        print(f"rank {rank}/{world}: item table shard rows {r}:{r + h} columns {c}:{c + w}")


def unshard(model: NestedModel) -> NestedModel:
    """The same model with the whole table in one plain module (every rank gathers it), to
    save, calibrate and serve."""
    with torch.no_grad():
        table = model.item_table().detach().float()
    plain = NestedModel(model.cfg).to(table.device)
    # Named tensors, not state_dict(): the wrapped table's hooks leave the top-level ones out of it.
    dense = {k: v for k, v in [*model.named_parameters(), *model.named_buffers()] if not k.startswith("tables.")}
    plain.load_state_dict(dense | {"tables.embedding_bags.item.weight": table})
    return plain


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun with a process group; (0, 1) otherwise."""
    import torch.distributed as dist

    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def _average_gradients(model: NestedModel, world: int) -> None:
    """Data parallel: every rank applies the mean gradient, so the replicas stay identical."""
    import torch.distributed as dist

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def train_batch(model: NestedModel, opt, seqs, items_t, ts_t, snaps, cfg: TrainConfig, phases, length=None):
    """Unroll one batch of user sequences; with ``opt=None`` only measure the loss.
    ``length``: unroll this many steps (the whole batch's longest, when ranks share it)."""
    dev = items_t.device
    U, L = len(seqs), length or len(seqs[0])
    idx = torch.full((U, L), -1, dtype=torch.long, device=dev)
    for r, s in enumerate(seqs):
        idx[r, :len(s)] = torch.from_numpy(s).to(dev)
    valid = idx >= 0
    items = torch.where(valid, items_t[idx.clamp(min=0)], 0)
    ts = torch.where(valid, ts_t[idx.clamp(min=0)], 0)
    chunk_of = idx.clamp(min=0) // model.cfg.c_pop  # (U, L) population chunk of each event

    # Each position's latest sequence_items items before it (-1: none), as the state's `recent` holds them.
    K = max(model.cfg.sequence_items, 1)
    before = torch.cat([torch.full((U, K), -1, dtype=torch.long, device=dev), torch.where(valid, items, -1)], 1)
    before = before.unfold(1, K, 1)[:, :L]  # (U, L, K)

    state = model.init_state(U, model.cfg.n_items, device=dev)
    M, S, mid, acc = state.M, state.S, state.mid, state.acc
    cnt = torch.from_numpy(phases).to(dev)
    last, last_ts = state.last, state.last_ts
    loss_sum, count = 0.0, 0
    for lo in range(0, L, cfg.unroll):
        M, S, mid, acc, last = (t.detach() for t in (M, S, mid, acc, last))
        E, b = model.all_items(model.cfg.n_items)
        X = model.item_vectors(items[:, lo:lo + cfg.unroll])  # (U, t, D)
        losses = []
        prev_ts = torch.cat([last_ts.unsqueeze(1), ts[:, lo:lo + cfg.unroll][:, :-1]], 1)
        dt = torch.where(prev_ts >= 0, (ts[:, lo:lo + cfg.unroll] - prev_ts).clamp(min=0), 0)
        terms = model.event_terms(X, dt)  # (U, t, …)
        seq = model.sequence_read(before[:, lo:lo + cfg.unroll])  # (U, t, D) or None
        rates = model.mid_rates_now()
        for t in range(X.shape[1]):
            j = lo + t
            keep = valid[:, j]
            z = model.user_vectors(M, last, mid, None if seq is None else seq[:, t])  # state before event j
            logits = score_items(z, E, b, model.pop_term(snaps[chunk_of[:, j]]))  # (U, N)
            losses.append(F.cross_entropy(logits, items[:, j], reduction="none") * keep)
            term = {name: v[:, t] for name, v in terms.items()}
            ends = model.chunk_ends(cnt + 1)
            new = (*memory_step(M, S, term), *mid_step(mid, acc, term["mid_target"], ends, rates))
            M, S, mid, acc = (torch.where(keep.view(-1, *[1] * (o.dim() - 1)), nw, o)
                              for nw, o in zip(new, (M, S, mid, acc)))
            cnt = cnt + keep
            last = torch.where(keep.unsqueeze(1), X[:, t], last)
            last_ts = torch.where(keep, ts[:, j], last_ts)
        n_valid = int(valid[:, lo:lo + cfg.unroll].sum())
        loss = torch.stack(losses).sum() / max(n_valid, 1)
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if (world := distributed_rank()[1]) > 1:
                _average_gradients(model, world)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
        loss_sum, count = loss_sum + float(loss.detach()) * n_valid, count + n_valid
    return loss_sum, count


def sequence_loss(model: NestedModel, history, cfg: TrainConfig = TrainConfig(progress=False)) -> float:
    """Mean next-item cross-entropy of the model over the users' history sequences (no update)."""
    snaps = population_snapshots(model, history.items, history.ts, model.cfg.n_items)
    items_t, ts_t = torch.from_numpy(history.items), torch.from_numpy(history.ts)
    seqs = user_sequences(history, cfg.max_len)
    rng = np.random.default_rng(cfg.seed)
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(seqs), cfg.users_per_batch):
            batch = seqs[i:i + cfg.users_per_batch]
            phases = rng.integers(0, model.cfg.c_mid, len(batch))
            s, n = train_batch(model, None, batch, items_t, ts_t, snaps, cfg, phases)
            total, count = total + s, count + n
    return total / max(count, 1)
