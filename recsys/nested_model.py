"""The nested user model: one slow level, three fast levels (HOPE / Nested Learning style).

| level | state | updated |
| --- | --- | --- |
| slow | item and successor tables (TorchRec), projections, gates — `NestedModel` parameters | offline (`recsys train`) |
| population-fast | decayed item counts `pop`, at several speeds | every event (by its time), or every `C_pop` global events |
| user-mid | taste adapter `mid` + gradient accumulator | every `C_mid` of the user's events |
| user-fast | matrix memory `M` + momentum `S` (Titans delta rule); the latest items `recent` | every event |

The user vector adds the user-mid adapter, the memory's read and the user's latest items
read through the successor table (what follows them, across everyone).

Meta-training scores ``trust(time away) · personal + pop_weight · log(1 + pop)``. Served, the
two parts can instead be two experts mixed in probability, ``π · softmax(population) +
(1 − π) · softmax(personal)`` (`mixture`): the list then holds what everyone takes now *and*
what this user's levels point at, instead of one ranking in which popularity's scale swamps a
fresh session. Which form, and its mix, is set on the history's tail after training
(`recsys/calibration.py`).

The fast state is a value (`FastState`), passed in and returned:

    >>> state = model.init_state(n_users=100, n_items=model.n_items)
    >>> state = model.update(state, users, items, ts)      # a micro-batch, time-ordered
    >>> scores = model.score(state, users[:4], n_items)    # (4, n_items)
    >>> state, reads = model.update_reading(state, users, items, ts)  # + each user just before each event

The update rule of the fast levels is the same code in meta-training (with
gradients), in replay and in the stream worker (without); only the user-mid level, which
changes once per chunk, is applied per chunk online (`mid_chunks`) and per event in
training (`mid_step`) — the same rule, held equal by a test in float64.

Shapes: ``B`` events, ``U`` users in a batch, ``T`` steps per user, ``N`` items,
``D`` embedding dim, ``m`` memory dim.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recsys import compiled_memory, fused_update, partials
from recsys.baselines import grow
from recsys.batch_users import sequences_before


@dataclass(frozen=True)
class NestedConfig:
    n_items: int = 1000  # items in the slow level's table (known at training time)
    dim: int = 64  # D
    mem_dim: int = 32  # m
    c_mid: int = 8  # user-mid level: update every c_mid of the user's events
    c_pop: int = 1000  # population level: update every c_pop global events
    pop_half_life: float = 8000.0  # population counts halve every this many events (time clock: the memory read)
    # Set: the population level decays by event time instead (counts halve every this many
    # seconds), so partial levels of any split of the stream (a worker group's partitions)
    # add up exactly to the whole; c_pop is then unused.
    pop_half_life_s: float | None = None
    # With a time clock, the level runs at several speeds (CMS): one count vector per half-life
    # pop_half_life_s × speed, all time-decayed (so splits still add up exactly). Reading takes
    # the speed whose counts hold about pop_read × pop_half_life events' worth (`population_counts`): the
    # memory stays near that many events when the stream's rate drifts from the history's
    # (ML-1M's stream thins 75× over its years, Steam's runs 1.3–2.4× faster than its history's end).
    pop_speeds: tuple[float, ...] = (1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    # The memory the score reads, as a share of pop_half_life events' worth. Chosen on the
    # histories' own 80/20 replays (NDCG@10, training seeds 0 / 1, read 1 → ¼): ML-1M
    # 0.1570 / 0.1611 → 0.1606 / 0.1598, Steam 0.0481 / 0.0477 → 0.0538 / 0.0538, synthetic
    # 0.0636 / 0.0640 → 0.0699 / 0.0703 (½, seed 0: ML-1M 0.1616, Steam 0.0509, synthetic
    # 0.0679; synthetic ⅛: 0.0667; all with speeds ⅛ … 64). What everyone does now says more
    # than what they did over the last 1 % of the history; the fastest speed (1/32) keeps the
    # ¼ read from clamping on a stream up to 8× faster than the history's end.
    pop_read: float = 0.25
    recent_items: int = 50  # the user's latest items, kept so serving can mask what was just seen
    # The user's latest items read through the slow level's successor table ("what follows
    # these, across everyone"): the fresh-user signal a live stream is about. 0: off.
    sequence_items: int = 8
    use_fast: bool = True  # False: the `nested_slow_only` ablation
    # False: the slow level learns no item bias and no population vector (both stay zero);
    # popularity comes from the population-fast level alone. A bias fit on the whole
    # history knows each item's later popularity at every training position, the model
    # learns to trust it, and it is stale on the stream: NDCG@10 synthetic 0.0457 → 0.0505,
    # ML-1M 0.0178 → 0.0182, and no collapse with more epochs (synthetic, 6: 0.0142 → 0.0512).
    static_popularity: bool = False
    # Ablations, each a level switched off (trained and replayed without it): the user-fast
    # memory, the user-mid adapter, the population level (its popularity then comes from a
    # learned static item bias, as in the slow-only ablation).
    user_fast: bool = True
    user_mid: bool = True
    population: bool = True

    def __post_init__(self) -> None:
        if min(self.n_items, self.dim, self.mem_dim, self.c_mid, self.c_pop) <= 0:
            raise ValueError(f"NestedConfig sizes must be positive: {self}")
        if not 0 <= self.sequence_items <= self.recent_items:
            raise ValueError(f"sequence_items must be in [0, recent_items={self.recent_items}]: {self}")
        object.__setattr__(self, "pop_speeds", tuple(float(s) for s in self.pop_speeds))  # JSON gives a list
        if not self.pop_speeds or list(self.pop_speeds) != sorted(set(self.pop_speeds)) or self.pop_speeds[0] <= 0:
            raise ValueError(f"pop_speeds must be positive and increasing: {self}")
        if self.pop_read <= 0:
            raise ValueError(f"pop_read must be positive: {self}")

    def pop_half_lives(self) -> tuple[float, ...] | None:
        """The time-decayed population speeds' half-lives in seconds; None: one level on the event clock."""
        if self.pop_half_life_s is None:
            return None
        return tuple(self.pop_half_life_s * s for s in self.pop_speeds)

    def pop_memory(self) -> float:
        """The events' worth of counts the population score reads (time clock, `read_speeds`)."""
        return self.pop_half_life * self.pop_read

    def pop_levels(self) -> int:
        """Count vectors the population level keeps per item (its speeds)."""
        return 1 if self.pop_half_life_s is None else len(self.pop_speeds)


USER_FIELDS = ("M", "S", "last", "last_ts", "mid", "acc", "cnt", "recent")  # one row per user
POPULATION_FIELDS = ("pop", "pop_acc", "pop_events", "pop_ts")  # shared by everyone


@dataclass
class FastState:
    """Everything the fast levels know; rows are users (internal index), plus the population."""

    M: torch.Tensor  # (U, m, m) user-fast associative memory
    S: torch.Tensor  # (U, m, m) its momentum ("surprise")
    last: torch.Tensor  # (U, D) embedding of the user's latest item (the query context)
    last_ts: torch.Tensor  # (U,) int64, -1 = no event yet
    mid: torch.Tensor  # (U, D) user-mid adapter
    acc: torch.Tensor  # (U, D) user-mid gradient accumulated over the current chunk
    cnt: torch.Tensor  # (U,) int64 events of the user applied in total
    recent: torch.Tensor  # (U, R) int64 the user's latest R item indices, oldest first, -1 = empty
    pop: torch.Tensor  # (N, speeds) population-fast decayed item counts (at the last chunk end)
    pop_acc: torch.Tensor  # (N, 1) counts of the current, unfinished population chunk (event clock only)
    pop_events: torch.Tensor  # () int64 global events applied
    pop_ts: torch.Tensor  # () int64 the level's clock: its latest event's time (-1: none yet)

    def to(self, device) -> FastState:
        return FastState(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def clone(self) -> FastState:
        return FastState(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def user_rows(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-user fields of ``rows`` (for checkpoints split by owner)."""
        return {name: getattr(self, name)[rows] for name in USER_FIELDS}

    def take(self, rows: torch.Tensor) -> FastState:
        """A copy holding only ``rows`` (as rows 0..len-1) and the population level: the model
        can run ahead on it without touching this state."""
        population = {name: getattr(self, name).clone() for name in POPULATION_FIELDS}
        return FastState(**self.user_rows(rows), **population)

    def with_user_rows(self, users: dict[str, torch.Tensor]) -> FastState:
        """This state's population level with exactly the given user rows."""
        return replace(self, **users)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def clock(self) -> torch.Tensor:
        """() the time of the latest event applied: the same offline and online."""
        return self.last_ts.max()

    def absent_s(self, users: torch.Tensor) -> torch.Tensor:
        """(B,) seconds from each user's latest event to the clock."""
        return self.clock() - self.last_ts[users]


class Reads(NamedTuple):
    """Each event's user just before the event, in event order."""

    z: torch.Tensor  # (B, D) user vector (the levels combined, as `user_vectors`)
    last_ts: torch.Tensor  # (B,) time of the user's previous event, -1 = none


class NestedModel(nn.Module):
    def __init__(self, cfg: NestedConfig):
        super().__init__()
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

        self.cfg = cfg
        D, m = cfg.dim, cfg.mem_dim
        # Slow level: item ids in a TorchRec table (shardable under torchrun for big catalogues).
        self.tables = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="item", embedding_dim=D, num_embeddings=cfg.n_items, feature_names=["item"],
            pooling=PoolingType.SUM)], device=torch.device("cpu"))
        nn.init.normal_(self.tables.embedding_bags["item"].weight, std=0.05)
        if cfg.sequence_items:  # each item's successor vector: a query for the items that follow it
            self.successors = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name="next", embedding_dim=D, num_embeddings=cfg.n_items, feature_names=["next"],
                pooling=PoolingType.SUM)], device=torch.device("cpu"))
            nn.init.normal_(self.successors.embedding_bags["next"].weight, std=0.05)
            # Per position, oldest first: the latest item starts loudest.
            self.sequence_weights = nn.Parameter(0.8 ** torch.arange(cfg.sequence_items - 1, -1, -1.0))
        self.sharded = False  # True once `recsys.train.shard_item_table` splits the table across processes
        self.item_bias = nn.Parameter(torch.zeros(cfg.n_items))
        self.user0 = nn.Parameter(torch.zeros(D))  # the population's user vector
        # User-fast: keys, values, queries and the data-dependent gates of the write rule.
        self.W_k = nn.Linear(D, m, bias=False)
        self.W_v = nn.Linear(D, m, bias=False)
        self.W_q = nn.Linear(D, m, bias=False)
        self.W_o = nn.Linear(m, D, bias=False)
        self.gates = nn.Linear(D + 1, 3)  # → step θ, decay α, momentum η
        with torch.no_grad():
            self.gates.bias.copy_(torch.tensor([0.0, -3.0, -2.0]))
        # User-mid: value projection and chunk-level rates.
        self.W_mid = nn.Linear(D, D, bias=False)
        self.mid_rates = nn.Parameter(torch.tensor([-1.0, -3.0]))  # → step, decay
        self.pop_weight = nn.Parameter(torch.tensor(1.0))  # starts as a log-popularity prior
        # How fast a returning user's personal score gives way to the population level, per
        # log-day of absence; 0 in meta-training, set on the history's tail (recsys/calibration.py).
        self.register_buffer("fade", torch.zeros(()))
        # The population expert's share π of the served mixture (`mixture`); 0: the additive
        # score meta-training fits. Set on the history's tail with the rest of the mix.
        self.register_buffer("pop_share", torch.zeros(()))
        # The association level's weight in the personal expert (`score_items`): 0 in
        # meta-training (the level is not the slow level's to learn), set on the history's tail.
        self.register_buffer("assoc_weight", torch.zeros(()))
        self.register_buffer("assoc_discount", torch.tensor(0.5))  # its votes' popularity discount (`association.read`)
        if cfg.use_fast and cfg.population and not cfg.static_popularity:  # else nothing else ranks by popularity
            self.item_bias.requires_grad_(False)
            self.user0.requires_grad_(False)

    # -- slow level -------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return self.cfg.n_items

    def item_table(self) -> torch.Tensor:
        """(N, D): the table's weight, or, split across processes, every row looked up (the
        softmax is over all items; gradients flow back to each row's shard)."""
        if self.sharded:
            return self.item_vectors(torch.arange(self.cfg.n_items, device=self.user0.device))
        return self.tables.embedding_bags["item"].weight

    def item_vectors(self, items: torch.Tensor, table: str = "item") -> torch.Tensor:
        """(…,) item ids → (…, D) via a TorchRec table (``item``: embeddings, ``next``: successor
        vectors); ids past the table, and -1, are cold (zeros)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        flat = items.reshape(-1)
        known = (flat >= 0) & (flat < self.cfg.n_items)
        if not (torch.is_grad_enabled() or self.sharded):  # online: the same rows, without a jagged bag per call
            bags = self.tables.embedding_bags if table == "item" else self.successors.embedding_bags
            weight = bags[table].weight
            rows = weight[flat.clamp(0, self.cfg.n_items - 1)].masked_fill(~known.unsqueeze(1), 0)
            return rows.float().to(self.user0.dtype).reshape(*items.shape, self.cfg.dim)  # float32, as TorchRec pools
        lengths = known.to(torch.int64)
        # Offsets by plain torch: fbgemm's cumsum kernel is not in every build (CPU-only fbgemm on a GPU host).
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        kjt = KeyedJaggedTensor(keys=[table], values=flat[known], lengths=lengths, offsets=offsets)
        pooled = (self.tables if table == "item" else self.successors)(kjt)[table]  # an empty bag pools to zeros
        # TorchRec pools in float32; the fast levels run in the model's dtype (float64 in tests).
        return pooled.to(self.user0.dtype).reshape(*items.shape, self.cfg.dim)

    def all_items(self, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scoring embeddings and biases of the first ``n_items`` items, centred on the
        table's mean embedding; items newer than the table have a zero embedding and the
        mean trained bias. Cold start: nothing is known of a new item yet, so it scores as
        the average item would, and the population level ranks it as it gains events.
        (Centring shifts each user's scores by one constant: the softmax and the ranking
        of the table's items do not change; without it a new item would rank below every
        item a user's vector points at, by the average item's affinity.)"""
        E, b = self.item_table(), self.item_bias
        E = E - E.mean(0)
        if n_items > self.cfg.n_items:
            extra = n_items - self.cfg.n_items
            E = torch.cat([E, E.new_zeros(extra, E.shape[1])])
            b = torch.cat([b, b.detach().mean().expand(extra)])
        return E[:n_items], b[:n_items]

    @torch.no_grad()
    def forget_items(self, rows: torch.Tensor) -> None:
        """Table rows that training never saw as an event (items first seen after its data):
        their embeddings learned only to lose every softmax, so they become cold, as an item
        past the table is: the mean embedding and bias of the others, no successor vector."""
        keep = torch.ones(self.cfg.n_items, dtype=torch.bool)
        keep[rows] = False
        if not len(rows) or not keep.any():
            return
        E = self.tables.embedding_bags["item"].weight
        E[rows] = E[keep].mean(0)
        self.item_bias[rows] = self.item_bias[keep].mean()
        if self.cfg.sequence_items:
            self.successors.embedding_bags["next"].weight[rows] = 0

    # -- state ------------------------------------------------------------------------------
    def init_state(self, n_users: int, n_items: int, device=None) -> FastState:
        D, m = self.cfg.dim, self.cfg.mem_dim
        device, dtype = device or self.user0.device, self.user0.dtype
        z = lambda *s, dtype=dtype: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
        return FastState(M=z(n_users, m, m), S=z(n_users, m, m), last=z(n_users, D),
                         last_ts=torch.full((n_users,), -1, dtype=torch.int64, device=device),
                         mid=z(n_users, D), acc=z(n_users, D), cnt=z(n_users, dtype=torch.int64),
                         recent=torch.full((n_users, self.cfg.recent_items), -1, dtype=torch.int64, device=device),
                         pop=z(n_items, self.cfg.pop_levels()), pop_acc=z(n_items, 1),
                         pop_events=z((), dtype=torch.int64),
                         pop_ts=torch.full((), -1, dtype=torch.int64, device=device))

    @staticmethod
    def grow_state(state: FastState, n_users: int, n_items: int) -> FastState:
        """New users and items get empty state rows, online, without a restart."""

        out = {}
        for f in fields(state):
            t = getattr(state, f.name)
            if f.name in ("pop", "pop_acc"):
                out[f.name] = grow(t, n_items)
            elif f.name in ("pop_events", "pop_ts"):
                out[f.name] = t
            else:
                out[f.name] = grow(t, n_users, fill=-1 if f.name in ("last_ts", "recent") else 0)
        return FastState(**out)

    # -- the fast levels: read and write ------------------------------------------------------
    def user_vectors(self, M, last, mid, seq=None) -> torch.Tensor:
        """Combine the levels into the query vector: population + user-mid + user-fast read
        (+ ``seq``, the user's latest items read through the successor table: `sequence_read`)."""
        if not self.cfg.use_fast:
            return self.user0.expand(len(M), -1)
        return self.combine(mid, self.memory_read(M, self.query(last)), seq)

    def query(self, last: torch.Tensor) -> torch.Tensor:
        """(…, D) the user's latest item → (…, m) the user-fast memory's query."""
        return F.normalize(self.W_q(last), dim=-1)

    @staticmethod
    def memory_read(M: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.bmm(M, q.unsqueeze(-1)).squeeze(-1)  # (U, m)

    def combine(self, mid: torch.Tensor, read: torch.Tensor, seq: torch.Tensor | None) -> torch.Tensor:
        """The levels' parts → (U, D) user vector."""
        z = self.user0
        if self.cfg.user_mid:
            z = z + mid
        if self.cfg.user_fast:
            z = z + self.W_o(read)
        return z if seq is None else z + seq

    def read_users(self, state: FastState, rows: torch.Tensor) -> torch.Tensor:
        """(U,) state rows → (U, D) their user vectors: what serving scores with."""
        return self.user_vectors(state.M[rows], state.last[rows], state.mid[rows], self.sequence_read(state.recent[rows]))

    def sequence_read(self, recent: torch.Tensor) -> torch.Tensor | None:
        """(…, R) the user's latest items, oldest first (-1: none) → (…, D) the weighted sum of
        the latest ``sequence_items`` ones' successor vectors; None when the model reads none."""
        K = self.cfg.sequence_items
        if not K or not self.cfg.use_fast:
            return None
        V = self.item_vectors(recent[..., -K:], table="next")  # (…, K, D)
        return torch.einsum("...kd,k->...d", V, self.sequence_weights)

    def pop_term(self, counts: torch.Tensor) -> torch.Tensor:
        """(N,) counts read from the level (`population_counts`) → (N,) the population term."""
        return population_term(counts, self.population_weight())

    def population_counts(self, pop: torch.Tensor) -> torch.Tensor:
        """(N, speeds) the level's counts (a state's ``pop``, or partitions' summed) → (N,) the
        counts its score reads (`read_speeds`)."""
        return read_speeds(pop, self.cfg.pop_memory())

    def population_weight(self) -> torch.Tensor:
        """() the population term's weight; 0 where the model has no population level."""
        active = self.cfg.use_fast and self.cfg.population
        return self.pop_weight if active else torch.zeros((), dtype=self.user0.dtype)

    def event_terms(self, x: torch.Tensor, dt: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything the write rules need from the events alone, for any batch shape at once,
        already in the shapes the per-event steps consume (so the recurrence launches as few
        kernels as it can: on a GPU the loop is launch-bound, on a CPU op-bound).

        x: (…, D) item embeddings; dt: (…,) seconds since the user's previous event."""
        g = torch.sigmoid(self.gates(torch.cat([x, torch.log1p(dt.to(x.dtype)).unsqueeze(-1) / 10], -1)))
        theta, alpha, eta = g[..., 0], g[..., 1], g[..., 2]  # (…,) step, decay, momentum
        k = F.normalize(self.W_k(x), dim=-1)  # (…, m)
        return {"k": k.unsqueeze(-1), "neg_v": -self.W_v(x).unsqueeze(-1),  # (…, m, 1)
                "theta_k": (theta.unsqueeze(-1) * k).unsqueeze(-2),  # (…, 1, m)
                "retain": (1 - alpha)[..., None, None], "eta": eta[..., None, None],  # (…, 1, 1)
                "mid_target": self.W_mid(x)}  # (…, D)

    @staticmethod
    def memory_step(M, S, term, in_place: bool = False, err: torch.Tensor | None = None):
        """User-fast, one event per row (Titans delta rule with momentum and forgetting):
        S ← η·S − θ·∇½‖Mk − v‖² = η·S − (Mk − v)(θk)ᵀ, M ← (1 − α)·M + S.
        ``in_place``: written into M and S (views of the batch's rows; no autograd);
        ``err``: Mk − v, where the caller has it already."""
        if err is None:
            err = torch.baddbmm(term["neg_v"], M, term["k"])  # (U, m, 1) the memory's prediction error
        S = torch.baddbmm(term["eta"] * S, err, term["theta_k"], alpha=-1, out=S if in_place else None)
        return torch.addcmul(S, term["retain"], M, out=M if in_place else None), S

    def memory_steps(self, M, S, terms, q, sizes: list[int]) -> torch.Tensor | None:
        """User-fast over a whole batch, eagerly: `memory_step` once per step over the first
        ``sizes[t]`` rows (the step's users), in place. q: (B, m) step-major read queries or
        None → (B, m) the memory's read before each event, or None."""
        names = ("k", "neg_v", "theta_k", "retain", "eta")
        if q is not None:  # one product gives each step's error and the memory's read before it: M·[k, q] − [v, 0]
            terms = terms | {"k": torch.cat([terms["k"], q.unsqueeze(-1)], -1), "neg_v": F.pad(terms["neg_v"], (0, 1))}
        products = torch.empty_like(terms["neg_v"])  # (B, m, 1 or 2) step-major, a slice per step
        rows = {}  # the first n rows of M and S, one pair of views per step size
        # Each step's slice of the terms, cut once: on a CPU the loop is op-bound.
        for n, out, *term in zip(sizes, products.split(sizes), *(terms[name].split(sizes) for name in names)):
            if n not in rows:
                rows[n] = M[:n], S[:n]
            torch.baddbmm(term[1], rows[n][0], term[0], out=out)
            self.memory_step(*rows[n], dict(zip(names, term)), in_place=True, err=out[..., :1])
        return products[..., 1] if q is not None else None

    def mid_rates_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User-mid (step / c_mid, decay): one chunk's step is the mean of its gradients."""
        step, decay = torch.sigmoid(self.mid_rates)
        return step / self.cfg.c_mid, decay

    @staticmethod
    def mid_step(mid, acc, target, boundary, rates):
        """User-mid (CMS), one event per row: accumulate ∇½‖mid − target‖²; where the event
        closes the user's chunk of c_mid (``boundary``, (U, 1) 0/1), apply the mean gradient
        with decay and restart the accumulator: mid ← mid − b·(decay·mid + step·acc)."""
        step, decay = rates
        acc = acc + (mid - target)
        mid = torch.addcmul(mid, boundary, decay * mid + step * acc, value=-1)
        return mid, acc * (1 - boundary)

    def mid_chunks(self, mid, acc, target, srow, spos, cnt, counts, steps: int, rates):
        """User-mid over a whole batch (``mid_step`` for every event, in its users' order): the
        adapter changes only where a chunk of c_mid of the user's events closes, so this runs
        once per chunk instead of once per event. A chunk's accumulator is its carried
        ``acc`` plus Σ(mid − target) = n·mid − Σ target over its events.

        mid, acc, cnt, counts: per row (U, …); target, srow, spos: per event, step-major;
        ``steps``: the most events of any row. → each event's mid before it (B, D) step-major,
        and mid, acc after the batch."""
        c, (step, decay) = self.cfg.c_mid, rates
        U, D = mid.shape
        opened = cnt % c  # (U,) events already in each row's open chunk
        J = (c - 1 + steps - 1) // c + 1  # chunks a row can touch in this batch
        chunk = (opened[srow] + spos) // c  # (B,) each event's chunk, the open one is 0
        slot = srow * J + chunk
        sums = target.new_zeros(U * J, D).index_add_(0, slot, target).view(U, J, D)
        n = target.new_zeros(U * J).index_add_(0, slot, target.new_ones(len(slot))).view(U, J, 1)
        filled = (opened + counts).unsqueeze(1)  # (U, 1) events from the open chunk's start to the batch end
        last = (filled - 1) // c  # the row's latest chunk
        mids = [mid]
        for j in range(J):
            a = (acc if j == 0 else 0) + n[:, j] * mids[-1] - sums[:, j]
            closes = filled >= (j + 1) * c
            mids.append(torch.where(closes, mids[-1] - (decay * mids[-1] + step * a), mids[-1]))
            acc = torch.where(last == j, torch.where(closes, torch.zeros_like(a), a), acc)
        return torch.stack(mids, 1)[srow, chunk], mids[-1], acc

    def chunk_ends(self, applied: torch.Tensor) -> torch.Tensor:
        """(…,) the user's event count once an event is applied → (…, 1) 0/1: does that event
        close a user-mid chunk."""
        return (applied % self.cfg.c_mid == 0).unsqueeze(-1).to(self.user0.dtype)

    # -- the online API -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, state: FastState, users: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B,) users → (B, n_items) scores from the current state."""
        return self.score_users(self.read_users(state, users), state.absent_s(users),
                                self.population_counts(state.pop), n_items)

    def score_users(self, z: torch.Tensor, absent_s: torch.Tensor, counts: torch.Tensor, n_items: int,
                    votes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) user vectors, (B,) seconds since each one's latest event, the population's
        read counts (`population_counts`) and, where the model reads the association level,
        its (B, n_items) votes (`recsys.association.read`) → (B, n_items) scores: the
        personal part fades with absence."""
        E, b = self.all_items(n_items)
        weight = trust(absent_s.to(z.dtype), self.fade) if self.cfg.use_fast else None
        association = self.assoc_weight * votes.to(z.dtype) if votes is not None and self.cfg.use_fast else None
        return score_items(z, E, b, self.pop_term(counts[:n_items]), weight, self.mixture_share(), association)

    def mixture_share(self) -> torch.Tensor | None:
        """() the population expert's share of the served mixture; None: the additive score."""
        return self.pop_share if float(self.pop_share) > 0 else None

    @torch.no_grad()
    def update(self, state: FastState, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
               population: bool = True, donate: bool = False) -> FastState:
        """The state after a time-ordered micro-batch of events; a user's events apply in their
        order. ``state`` is left as it was, unless ``donate``: then its tensors are reused for
        the result and the caller must not use it again (JAX's buffer donation; the worker,
        the replay and training donate, as a copy of every row per batch would cost more than
        the update). ``population=False``: the user levels only (a stream worker keeps one
        population level per partition, with `update_population`)."""
        return self._recur(state if donate else state.clone(), users, items, ts, read=False,
                           population=population)[0]

    @torch.no_grad()
    def update_reading(self, state: FastState, users: torch.Tensor, items: torch.Tensor,
                       ts: torch.Tensor, donate: bool = False) -> tuple[FastState, Reads]:
        """``update``, and what each event's user looked like just before it (their earlier
        events of the batch applied): the fresh-user query of replay v2 and of serving."""
        return self._recur(state if donate else state.clone(), users, items, ts, read=True)

    def _recur(self, state: FastState, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
               read: bool, population: bool = True) -> tuple[FastState, Reads | None]:
        """The recurrence behind ``update`` and ``update_reading``.

        Batched: the events are laid out step-major (step t holds the t-th event of every
        user that has one) with users ordered by event count, so each step's users are a
        prefix of the rows and its events a contiguous slice. Everything that depends on the
        events alone is computed once over the batch; the user-fast recurrence then runs
        once per step, over all of that step's users at once, and the user-mid level once
        per chunk of c_mid (`mid_chunks`)."""
        state = self.grow_state(state, int(users.max()) + 1, int(items.max()) + 1)
        dev = users.device
        uniq, inv, counts = torch.unique(users, return_inverse=True, return_counts=True)  # (U,), (B,), (U,)
        by_count = torch.argsort(counts, descending=True, stable=True)
        row_of = torch.empty_like(by_count)
        row_of[by_count] = torch.arange(len(uniq), device=dev)
        uniq, counts, row = uniq[by_count], counts[by_count], row_of[inv]  # row: (B,) each event's row
        order = torch.argsort(row, stable=True)  # events grouped by row, time order kept inside
        pos = torch.empty_like(row)
        pos[order] = torch.arange(len(row), device=dev) - (torch.cumsum(counts, 0) - counts)[row[order]]
        # Users still active at each step, from one host copy of the counts (one device sync).
        active = torch.bincount(counts.cpu() - 1).flip(0).cumsum(0).flip(0)
        starts = (active.cumsum(0) - active).tolist()  # where each step's slice begins
        step_start = torch.tensor(starts, device=dev)

        sm = torch.argsort(pos * len(uniq) + row)  # event indices, step-major
        srow, spos, s_items, s_ts = row[sm], pos[sm], items[sm], ts[sm]
        prev = step_start[(spos - 1).clamp(min=0)] + srow  # the user's previous event (when spos > 0)
        prev_ts = torch.where(spos > 0, s_ts[prev], state.last_ts[uniq][srow])
        dt = torch.where(prev_ts >= 0, (s_ts - prev_ts).clamp(min=0), 0)
        x = self.item_vectors(s_items)  # (B, D)
        terms = self.event_terms(x, dt)  # every projection and gate of the batch at once

        M, S = state.M[uniq], state.S[uniq]
        mid, acc, cnt = state.mid[uniq], state.acc[uniq], state.cnt[uniq]
        rates = self.mid_rates_now()
        if read:  # each event's query context: the user's previous item, and latest items
            last_before = torch.where((spos > 0).unsqueeze(1), x[prev], state.last[uniq][srow])
            seq = self.sequence_read(sequences_before(state.recent[users], users, items)[sm])
            q = self.query(last_before)  # (B, m) step-major
        else:
            q = None
        if not read and fused_update.usable(M, self.cfg.dim, self.cfg.mem_dim):  # CUDA: one kernel for all steps
            ends = self.chunk_ends(cnt[srow] + spos + 1)
            fused_update.recurrence(M, S, mid, acc, terms, ends, step_start, counts, rates)
        else:
            # The levels are combined once, after the walk, from each event's reads before it.
            if compiled_memory.usable(M):  # CPU: one compiled walk over each row's events, both user levels
                read_before, mid_before = compiled_memory.recurrence(M, S, mid, acc, terms, q, step_start, counts,
                                                                     cnt, self.cfg.c_mid, rates)
            else:
                sizes = active.tolist()
                mid_before, mid, acc = self.mid_chunks(mid, acc, terms["mid_target"], srow, spos, cnt, counts,
                                                       len(sizes), rates)
                read_before = self.memory_steps(M, S, terms, q, sizes)

        latest = step_start[counts - 1] + torch.arange(len(uniq), device=dev)  # each user's latest event
        ITEMS = torch.full((len(uniq), len(starts)), -1, dtype=torch.int64, device=dev)
        ITEMS[row, pos] = items
        # A row's new items sit right after its old window: the latest R end at R + count.
        window = counts.unsqueeze(1) + torch.arange(self.cfg.recent_items, device=dev)
        recent = torch.cat([state.recent[uniq], ITEMS], 1).gather(1, window)
        for name, value in (("M", M), ("S", S), ("mid", mid), ("acc", acc), ("cnt", cnt + counts),
                            ("recent", recent), ("last", x[latest]), ("last_ts", s_ts[latest])):
            getattr(state, name).index_copy_(0, uniq, value)
        reads = None
        if read:  # back to event order
            z = self.combine(mid_before, read_before, seq) if self.cfg.use_fast else self.user0.expand_as(x)
            reads = Reads(z=torch.empty_like(z).index_copy_(0, sm, z),
                          last_ts=torch.empty_like(prev_ts).index_copy_(0, sm, prev_ts))
        return (self.update_population(state, items, ts, donate=True) if population else state), reads

    @torch.no_grad()
    def update_population(self, state: FastState, items: torch.Tensor, ts: torch.Tensor,
                          donate: bool = False) -> FastState:
        """The state with the events added to its population level (``donate``: as in `update`).

        Population-fast: counts accumulate per chunk of c_pop global events; at each chunk
        end the level consolidates: pop ← δ·pop + chunk counts. Cuts of micro-batches do not
        change the result: chunk boundaries are global event positions. With a half-life in
        seconds, every event counts by its age instead (`decay_add`)."""
        if not len(items):
            return state
        if not donate:
            state = replace(state, pop_acc=state.pop_acc.clone())  # the only tensor written in place
        if self.cfg.pop_half_life_s is not None:
            state.pop, state.pop_ts = decay_add(state.pop, state.pop_ts, items, ts, self.cfg.pop_half_lives())
            state.pop_events = state.pop_events + len(items)
            return state
        state.pop_ts = torch.maximum(state.pop_ts, ts.max())  # the level's clock, whichever way it decays
        C = self.cfg.c_pop
        start = int(state.pop_events)
        pos = start
        while pos < start + len(items):
            end = min((pos // C + 1) * C, start + len(items))
            part = items[pos - start:end - start]
            state.pop_acc.index_add_(0, part, state.pop_acc.new_ones(len(part), *state.pop_acc.shape[1:]))
            if end % C == 0:
                state.pop = consolidate(state.pop, state.pop_acc, self.cfg)
                state.pop_acc.zero_()
            pos = end
        state.pop_events = state.pop_events + len(items)
        return state

    # -- checkpoint (safetensors + JSON config, no pickle) ---------------------------------
    def save(self, path, item_ids=None) -> None:
        """Weights, config and (for serving and the stream worker) the external item id of
        each table row, so events can name items as the product does."""
        from safetensors.torch import save_file

        metadata = {"config": json.dumps(asdict(self.cfg))}
        if item_ids is not None:
            metadata["item_ids"] = json.dumps([str(i) for i in item_ids])
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path, **overrides) -> NestedModel:
        from safetensors.torch import load_file

        cfg = model_config(path)
        weights = load_file(str(path))
        model = cls(replace(cfg, **overrides)).to(weights["user0"].dtype)  # exact: no dtype rounding
        weights.setdefault("pop_share", torch.zeros((), dtype=weights["user0"].dtype))  # saved before the mixture
        weights.setdefault("assoc_weight", torch.zeros((), dtype=weights["user0"].dtype))  # before the association level
        weights.setdefault("assoc_discount", torch.tensor(0.5, dtype=weights["user0"].dtype))
        model.load_state_dict(weights)
        return model


def trust(absent_s: torch.Tensor, fade: torch.Tensor) -> torch.Tensor:
    """(B,) seconds since each user's latest event → (B,) weight of their personal score:
    tastes read from old events say less about today than what everyone watches now.
    The one formula for replay, the stream worker and the exported serving graph."""
    return 1 / (1 + fade * torch.log1p(absent_s.clamp(min=0) / 86400))


def decay_add(pop: torch.Tensor, pop_ts: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
              half_life_s) -> tuple[torch.Tensor, torch.Tensor]:
    """The time-decayed population level: (N,) counts as of ``pop_ts`` plus events (items, ts)
    → the counts as of T = the latest of them, each event weighted 2^(−age at T / half-life).
    Exact under any split of the stream: levels of disjoint parts, brought to one time
    (`decay_to`), sum to the level of the whole. With (N, S) counts and S half-lives, each
    column is one speed."""
    T = torch.maximum(pop_ts, ts.max())
    hl = torch.as_tensor(half_life_s, dtype=torch.float64)
    weight = torch.pow(0.5, (T - ts).to(torch.float64).unsqueeze(-1) / hl).to(pop.dtype).to(pop.device)
    return decay_to(pop, pop_ts, T, half_life_s).index_add_(0, items, weight.reshape(len(ts), *pop.shape[1:])), T


def decay_to(pop: torch.Tensor, pop_ts, t, half_life_s) -> torch.Tensor:
    """(N, …) counts as of ``pop_ts`` → as of the later time ``t`` (a new tensor); the
    half-life is one number, or one per speed (the last dim)."""
    age = torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(pop_ts, dtype=torch.float64)
    hl = torch.as_tensor(half_life_s, dtype=torch.float64)
    return pop * torch.pow(0.5, age.clamp(min=0) / hl).to(pop.dtype).to(pop.device)


def read_speeds(pop: torch.Tensor, memory_events: float) -> torch.Tensor:
    """(N, S) counts at S speeds, slowest last → (N,) the counts of a level that holds about
    ``memory_events`` events' worth (a steady stream's count mass under an event half-life
    of that many: memory_events / ln 2), interpolated between the two speeds whose mass
    brackets it, in log mass. A function of the whole level's counts only: applied after the
    partitions' levels are summed, it reads exactly what one level of the whole stream would."""
    if pop.shape[-1] == 1:
        return pop[..., 0]
    mass = pop.sum(0).clamp(min=1e-12).log2()  # (S,) increasing: a longer memory holds more
    target = math.log2(memory_events / math.log(2))
    hi = (mass < target).sum().clamp(1, len(mass) - 1)  # the first speed holding at least the target
    lo = hi - 1
    a = ((target - mass[lo]) / (mass[hi] - mass[lo]).clamp(min=1e-12)).clamp(0, 1)
    return (1 - a) * pop[:, lo] + a * pop[:, hi]


def sum_levels(levels, half_life_s: float | None) -> tuple[torch.Tensor, int]:
    """Partial population levels [(counts, clock)] of disjoint parts of the stream → the
    whole level's counts and clock (`recsys.partials.sum_levels`, on the CPU)."""
    total, clock = partials.sum_levels([(counts.cpu().numpy(), t) for counts, t in levels], half_life_s)
    return torch.from_numpy(total), clock


def consolidate(pop: torch.Tensor, chunk_counts: torch.Tensor, cfg: NestedConfig) -> torch.Tensor:
    """The population level at the end of a chunk of ``c_pop`` global events: the counts so
    far decay by the chunk's share of the half-life, and the chunk's counts join them."""
    return pop * 0.5 ** (cfg.c_pop / cfg.pop_half_life) + chunk_counts


def population_term(pop: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The population level's score: ``weight · log(1 + counts)`` (the model's, and the
    exported graph's from the counts serving sums over partitions)."""
    return weight * torch.log1p(pop)


def score_items(z: torch.Tensor, E: torch.Tensor, b: torch.Tensor, population: torch.Tensor,
                weight: torch.Tensor | None = None, share: torch.Tensor | None = None,
                association: torch.Tensor | None = None) -> torch.Tensor:
    """The nested model's one score: (…, D) user vectors, (N, D) item embeddings and (N,)
    biases of the slow level, the population term (broadcast to (…, N)), ``trust`` weights
    (…,) of the personal part (None: 1), the population expert's ``share`` of the mixture
    (None: the additive ``weight · ⟨z, e_i⟩ + b_i + population_i``), and the association
    level's weighted votes (…, N) for what follows the user's latest items, part of the
    personal expert (None: none). Replay, calibration (over a grid of mixes at once),
    training, the stream's push and the exported serving graph all score with it."""
    if weight is not None:  # scaling the (…, D) vectors, not the (…, N) affinities: one pass less
        z = z * weight.unsqueeze(-1)
    personal = z @ E.T + b
    if association is not None:
        personal = personal + association
    if share is None:
        return personal + population
    return mixture(personal, population, share)


def mixture(personal: torch.Tensor, population: torch.Tensor, share: torch.Tensor) -> torch.Tensor:
    """log(π · softmax(population) + (1 − π) · softmax(personal)) over the items (last dim),
    π = ``share``; the inputs broadcast (calibration scores a grid of mixes at once).

    Additive, the population term's scale sets how far a user's levels can move an item: where
    popularity is steep (trends, a few hits), a fresh session changes the order only among
    items of equal popularity. Mixed, each expert brings its own most likely items: the
    synthetic log's generator draws events this way (a session's cluster, trending items,
    popularity)."""
    a = torch.log_softmax(population, -1) + torch.log(share)
    b = torch.log_softmax(personal, -1) + torch.log1p(-share)
    if torch.onnx.is_in_onnx_export():  # logaddexp, in ops ONNX has
        return torch.maximum(a, b) + torch.log1p(torch.exp(-(a - b).abs()))
    return torch.logaddexp(a, b)  # one pass: calibration mixes a grid of (G, B, N) at once


def write_log(model: NestedModel, state: FastState, log, batch_size: int) -> FastState:
    """Apply a whole time-ordered log (anything with ``users``, ``items``, ``ts`` arrays) in
    micro-batches of ``batch_size``."""
    for lo in range(0, len(log.users), batch_size):
        part = (torch.from_numpy(a[lo:lo + batch_size]) for a in (log.users, log.items, log.ts))
        state = model.update(state, *part, donate=True)
    return state


def model_config(path) -> NestedConfig:
    """A model file's config, read from its metadata (no weights loaded). A file saved before
    ``pop_read`` was calibrated reading the whole ``pop_half_life``: it keeps reading that."""
    return NestedConfig(**{"pop_read": 1.0} | json.loads(_metadata(path)["config"]))


def load_item_ids(path) -> list[str]:
    """The external item ids of a model file's table rows (row order)."""
    meta = _metadata(path)
    if "item_ids" not in meta:
        raise ValueError(f"{path} holds no item ids: save it with `recsys train`")
    return json.loads(meta["item_ids"])


def _metadata(path) -> dict[str, str]:
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"no model file at {path}: train one with `recsys train --out {path}`")
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def save_state(state: FastState, path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.tensors().items()}, str(path))


def load_state(path) -> FastState:
    from safetensors.torch import load_file

    return FastState(**load_file(str(path)))


# How the population level forgets by default: "time" (a half-life in seconds; a worker
# group's partial levels add up exactly) or "events" (a half-life in global events). Chosen
# on the histories alone (each history's own 80/20 replay, NDCG@10 time vs events): ML-1M
# 0.1552 vs 0.1531, Steam 0.0456 vs 0.0450, synthetic 0.0649 vs 0.0645.
POPULATION_CLOCK = "time"


def population_defaults(history_events: int, history_ts=None, clock: str = POPULATION_CLOCK) -> dict:
    """Population-level defaults from the history alone (never from the stream): a half-life
    of 1 % of the history's events, consolidated 8 times per half-life so the level is never
    staler than an eighth of its own memory. ``clock="time"``: the same memory in seconds —
    the time the history's latest 1 % of events took (at least an hour) — is the middle speed;
    the read keeps the 1 % in events when the stream runs slower or faster (``pop_speeds``)."""
    half_life = float(max(1000, math.ceil(0.01 * history_events)))
    out = {"pop_half_life": half_life, "c_pop": int(min(1000, half_life // 8))}
    if clock == "time":
        if history_ts is None:
            raise ValueError("a time-decayed population level needs the history's timestamps (history_ts)")
        ts = np.asarray(history_ts)
        k = min(int(half_life), len(ts) - 1)
        out["pop_half_life_s"] = float(max(3600, int(ts[-1]) - int(ts[-1 - k]))) if k > 0 else 86400.0
    elif clock != "events":
        raise ValueError(f"population clock must be 'events' or 'time', got {clock!r}")
    return out
