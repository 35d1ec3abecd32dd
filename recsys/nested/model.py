"""The nested user model: one slow level, three fast levels (HOPE / Nested Learning style).

| level | state | updated |
| --- | --- | --- |
| slow | item and successor tables (TorchRec), projections, gates — `NestedModel` parameters | offline (`recsys train`) |
| population-fast | decayed item counts `pop`, at several speeds | every event (by its time), or every `C_pop` global events |
| user-mid | taste adapter `mid` + gradient accumulator | every `C_mid` of the user's events |
| user-fast | matrix memory `M` + momentum `S` (Titans delta rule); the latest items `recent` | every event |
| user "no" | the items the user gave negative feedback on, `negative` (masked for them) | every negative event |

The user vector adds the user-mid adapter, the memory's read and the user's latest items
read through the successor table (what follows them, across everyone).

Meta-training scores ``trust(time away) · personal + pop_weight · log(1 + pop)``. Served, the
two parts can instead be two experts mixed in probability, ``π · softmax(population) +
(1 − π) · softmax(personal)`` (`mixture`): the list then holds what everyone takes now *and*
what this user's levels point at, instead of one ranking in which popularity's scale swamps a
fresh session. Which form, and its mix, is set on the history's tail after training
(`recsys/calibration.py`).

The fast state is a value (`FastState`, recsys/nested/state.py), passed in and returned:

    >>> state = model.init_state(n_users=100, n_items=model.n_items)
    >>> state = model.update(state, users, items, ts)      # a micro-batch, time-ordered
    >>> scores = model.score(state, users[:4], n_items)    # (4, n_items)
    >>> state, reads = model.update_reading(state, users, items, ts)  # + each user just before each event

The update rule of the fast levels is the same code in meta-training (with
gradients), in replay and in the stream worker (without); only the user-mid level, which
changes once per chunk, is applied per chunk online (`mid_chunks`) and per event in
training (`mid_step`) — the same rule, held equal by a test in float64.

One module per level: `population`, `user_fast`, `user_mid`, `negative` (and the population
association level, `recsys/association.py`); `walk` runs the user levels over a batch, `score` is the one
score, `io` the model file. Read `update` and `score` below top to bottom.

Shapes: ``B`` events, ``U`` users in a batch, ``T`` steps per user, ``N`` items,
``D`` embedding dim, ``m`` memory dim.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from recsys import association
from recsys.batch_users import sequences_before
from recsys.nested import negative
from recsys.nested import population as pop_level
from recsys.nested import slow
from recsys.nested.config import NestedConfig
from recsys.nested.io import read_weights, save_weights
from recsys.nested.population import population_term, read_speeds
from recsys.nested.score import score_items, trust
from recsys.nested.state import FastState, Reads, empty_state, grow_state
from recsys.nested.user_fast import memory_read
from recsys.nested.user_mid import chunk_ends
from recsys.nested.walk import step_major, walk


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
        self.register_buffer("assoc_discount", torch.tensor(0.25))  # its votes' popularity discount (`association.read`)
        self.register_buffer("assoc_fast_share", torch.tensor(0.25))  # its fast speed's share of the vote
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
        """(…,) item ids → (…, D) embeddings (``next``: successor vectors; `slow.item_vectors`)."""
        return slow.item_vectors(self, items, table)

    def all_items(self, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, D) scoring embeddings and (N,) biases of the first ``n_items`` (`slow.scoring_items`)."""
        return slow.scoring_items(self, n_items)

    # -- state ------------------------------------------------------------------------------
    def init_state(self, n_users: int, n_items: int, device=None) -> FastState:
        return empty_state(self.cfg, n_users, n_items, device or self.user0.device, self.user0.dtype)

    grow_state = staticmethod(grow_state)

    # -- the fast levels: read and write ------------------------------------------------------
    def user_vectors(self, M, last, mid, seq=None) -> torch.Tensor:
        """Combine the levels into the query vector: population + user-mid + user-fast read
        (+ ``seq``, the user's latest items read through the successor table: `sequence_read`)."""
        if not self.cfg.use_fast:
            return self.user0.expand(len(M), -1)
        return self.combine(mid, memory_read(M, self.query(last)), seq)

    def query(self, last: torch.Tensor) -> torch.Tensor:
        """(…, D) the user's latest item → (…, m) the user-fast memory's query."""
        return F.normalize(self.W_q(last), dim=-1)

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

    def mid_rates_now(self) -> tuple[torch.Tensor, torch.Tensor]:
        """User-mid (step / c_mid, decay): one chunk's step is the mean of its gradients."""
        step, decay = torch.sigmoid(self.mid_rates)
        return step / self.cfg.c_mid, decay

    def chunk_ends(self, applied: torch.Tensor) -> torch.Tensor:
        return chunk_ends(applied, self.cfg.c_mid, self.user0.dtype)

    # -- the online API -----------------------------------------------------------------------
    @torch.no_grad()
    def score(self, state: FastState, users: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B,) users → (B, n_items) scores from the current state (what a user said no to at −inf)."""
        scores = self.score_users(self.read_users(state, users), state.absent_s(users),
                                  self.population_counts(state.pop), n_items,
                                  self.votes(state, state.latest_items(users), n_items))
        return negative.masked(scores, state.turned_down(users, state.clock(), self.cfg.impression_window_s))

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

    def association_config(self):
        """The association level's config, its read as calibrated (`recsys.association`)."""
        return self.cfg.association_config(float(self.assoc_discount), float(self.assoc_fast_share))

    def votes(self, level: FastState | list[FastState], recent: torch.Tensor, n_items: int) -> torch.Tensor | None:
        """(B, R) users' latest items → (B, n_items) the association level's votes for what follows
        them (`association.read`; of a list of partitions' levels, `association.read_partials`);
        None where the model has no association level."""
        if not self.cfg.association:
            return None
        if isinstance(level, list):
            return association.read_partials([lv.association() for lv in level], recent, n_items,
                                             self.association_config())
        return association.read(level.association(), recent, n_items, self.association_config())

    def mixture_share(self) -> torch.Tensor | None:
        """() the population expert's share of the served mixture; None: the additive score."""
        return self.pop_share if float(self.pop_share) > 0 else None

    @torch.no_grad()
    def update(self, state: FastState, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
               population: bool = True, donate: bool = False, weight: torch.Tensor | None = None) -> FastState:
        """The state after a time-ordered micro-batch of events; a user's events apply in their
        order. ``state`` is left as it was, unless ``donate``: then its tensors are reused for
        the result and the caller must not use it again (JAX's buffer donation; the worker,
        the replay and training donate, as a copy of every row per batch would cost more than
        the update). ``population=False``: the user levels only (a stream worker keeps one
        population level per partition, with `update_population`). ``weight``: each event's
        feedback weight (`recsys.feedback`; None: every event a view); `negative.route` sends
        the turned-down events to their rows and the positive ones here, to `_recur`."""
        return negative.route(self, state if donate else state.clone(), users, items, ts, weight, read=False,
                              population=population)[0]

    @torch.no_grad()
    def update_reading(self, state: FastState, users: torch.Tensor, items: torch.Tensor,
                       ts: torch.Tensor, donate: bool = False, weight: torch.Tensor | None = None
                       ) -> tuple[FastState, Reads]:
        """``update``, and each event's user just before it (their earlier events of the batch
        applied): the fresh-user query of replay v2 and of serving (with ``weight``: of positive events)."""
        return negative.route(self, state if donate else state.clone(), users, items, ts, weight, read=True)

    @torch.no_grad()
    def update_population(self, state: FastState, items: torch.Tensor, ts: torch.Tensor,
                          donate: bool = False, weight: torch.Tensor | None = None,
                          before: torch.Tensor | None = None) -> FastState:
        """The state with the events added to its population levels (``donate``: as in `update`;
        ``weight``: each counts its feedback weight, and only positive ones count). ``before``:
        (B, L) each event's user's items before it (`before_each`), for the association level;
        None: the counts alone."""
        state = pop_level.add_events(state, items, ts, self.cfg, donate, weight)
        if before is None or not self.cfg.association:
            return state
        yes = slice(None) if weight is None else weight > 0  # only what a user took follows anything
        return state.with_association(association.add(state.association(), before[yes], items[yes], ts[yes],
                                                      self.association_config(), donate=donate))

    def before_each(self, state: FastState, users: torch.Tensor, items: torch.Tensor,
                    weight: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, W) each positive event's user's latest items before it (their earlier positive
        events of the batch included; -1: none, and the rows of events not positive): what
        `update_population` pairs each event's item with. None without an association level."""
        if not self.cfg.association:
            return None
        W = self.cfg.assoc_window
        if weight is None:
            return sequences_before(state.recent[users], users, items)[:, -W:]
        out = torch.full((len(users), W), -1, dtype=torch.int64, device=users.device)
        yes = weight > 0
        out[yes] = sequences_before(state.recent[users[yes]], users[yes], items[yes])[:, -W:]
        return out

    def _recur(self, state: FastState, users: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
               read: bool, population: bool = True, weight: torch.Tensor | None = None
               ) -> tuple[FastState, Reads | None]:
        """The recurrence behind ``update`` and ``update_reading``, writing into ``state``:
        everything that depends on the events alone is computed once over the batch (laid out
        step-major, `walk.step_major`), then both user levels walk each row's events
        (`walk.walk`), then the rows and the population level are written."""
        state = self.grow_state(state, int(users.max()) + 1, int(items.max()) + 1)
        before = self.before_each(state, users, items) if population else None  # before the rows are written
        lay = step_major(users)
        uniq, counts, srow, spos = lay.uniq, lay.counts, lay.srow, lay.spos
        s_items, s_ts = items[lay.sm], ts[lay.sm]
        prev = lay.step_start[(spos - 1).clamp(min=0)] + srow  # the user's previous event (when spos > 0)
        prev_ts = torch.where(spos > 0, s_ts[prev], state.last_ts[uniq][srow])
        dt = torch.where(prev_ts >= 0, (s_ts - prev_ts).clamp(min=0), 0)
        x = self.item_vectors(s_items)  # (B, D)
        terms = self.event_terms(x, dt)  # every projection and gate of the batch at once

        M, S = state.M[uniq], state.S[uniq]
        cnt = state.cnt[uniq]
        q = seq = None
        if read:  # each event's query context: the user's previous item, and latest items
            last_before = torch.where((spos > 0).unsqueeze(1), x[prev], state.last[uniq][srow])
            seq = self.sequence_read(sequences_before(state.recent[users], users, items)[lay.sm])
            q = self.query(last_before)  # (B, m) step-major
        mid, acc, read_before, mid_before = walk(M, S, state.mid[uniq], state.acc[uniq], cnt, terms, q, lay,
                                                 self.cfg.c_mid, self.mid_rates_now(), (self.cfg.dim, self.cfg.mem_dim))

        latest = lay.step_start[counts - 1] + torch.arange(len(uniq), device=users.device)  # each user's latest event
        ITEMS = torch.full((len(uniq), len(lay.active)), -1, dtype=torch.int64, device=users.device)
        ITEMS[lay.row, lay.pos] = items
        # A row's new items sit right after its old window: the latest R end at R + count.
        window = counts.unsqueeze(1) + torch.arange(self.cfg.recent_items, device=users.device)
        recent = torch.cat([state.recent[uniq], ITEMS], 1).gather(1, window)
        for name, value in (("M", M), ("S", S), ("mid", mid), ("acc", acc), ("cnt", cnt + counts),
                            ("recent", recent), ("last", x[latest]), ("last_ts", s_ts[latest])):
            getattr(state, name).index_copy_(0, uniq, value)
        reads = None
        if read:  # back to event order
            z = self.combine(mid_before, read_before, seq) if self.cfg.use_fast else self.user0.expand_as(x)
            reads = Reads(z=torch.empty_like(z).index_copy_(0, lay.sm, z),
                          last_ts=torch.empty_like(prev_ts).index_copy_(0, lay.sm, prev_ts))
        if population:
            state = self.update_population(state, items, ts, donate=True, weight=weight, before=before)
        return state, reads

    # -- the model file ------------------------------------------------------------------------
    def save(self, path, item_ids=None) -> None:
        save_weights(self, path, item_ids)

    @classmethod
    def load(cls, path, **overrides) -> NestedModel:
        cfg, weights = read_weights(path)
        model = cls(replace(cfg, **overrides)).to(weights["user0"].dtype)  # exact: no dtype rounding
        model.load_state_dict(weights)
        return model
