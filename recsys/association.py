"""The population association level: *what follows what now*, learned online from every event.

Nested Learning puts an associative memory at every level, each updated at its own rate.
The slow level's successor table is the prior (trained offline, it generalises to rare items
through embeddings); this level is the fast one above it: for each event (u, j), the user's
previous few items i strengthen i → j, the latest loudest, every pair weighed by its age at
two or more speeds (decayed by event *time*, as the population counts are, so partial levels
of any split of the stream add up). Memory is bounded: each item keeps its ``slots``
strongest successors (a new pair takes the weakest slot when it is stronger).

Read through a user's latest items, a successor's vote is its pair weight normalised by the
source item's outgoing weight and the successor's incoming weight (cosine-like: an item
everyone buys gains no vote from following everything), the speeds' votes mixed by shares
calibrated on the history (the fast speed's is small on sparse logs):

    >>> level = empty(n_items=100, cfg=AssociationConfig(half_lives_s=(86400.0, 30 * 86400.0)))
    >>> level = add(level, before, items, ts, cfg)      # before: (B, W) each event's previous items
    >>> votes = read(level, recent, n_items, cfg)        # (B, n_items), each row's best vote is 1

The level is a value (`AssociationLevel`): ``add`` returns a new one and leaves its input alone.

Shapes: ``B`` events, ``W`` previous items per event, ``N`` items, ``S`` slots per item,
``V`` speeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from recsys.rows import grow
from recsys.batch_users import sequences_before, user_positions


@dataclass(frozen=True)
class AssociationConfig:
    # slots, window, position_decay: best on the history's own replay of Amazon Toys and Steam
    # (a wider window and more slots add little past these; fewer cost up to 5 %).
    slots: int = 64  # S: successors kept per item
    window: int = 10  # W: previous items each event pairs with (and the read's voters)
    position_decay: float = 0.85  # the k-th latest previous item counts decay**(k-1)
    # Seconds; one decayed weight per speed. Empty: set from the history (`association_defaults`).
    half_lives_s: tuple[float, ...] = ()
    # The successor's incoming weight's exponent in the vote's normaliser (0: P(j | i); 0.5: cosine).
    popularity_discount: float = 0.25
    # The fastest speed's share of the vote; the slower ones share the rest. Each speed's vote
    # is normalised by its own weights, so a fast speed's few recent pairs are loud: on a
    # sparse log an equal share halves the level's worth. Calibrated on the history's tail.
    fast_share: float = 0.25

    def __post_init__(self) -> None:
        if self.slots < 1 or self.window < 1 or not 0 < self.position_decay <= 1 or not 0 <= self.fast_share <= 1:
            raise ValueError("AssociationConfig: slots and window must be >= 1, position_decay in (0, 1], "
                             f"fast_share in [0, 1]: {self}")
        object.__setattr__(self, "half_lives_s", tuple(float(h) for h in self.half_lives_s))
        if any(h <= 0 for h in self.half_lives_s):
            raise ValueError(f"AssociationConfig: half-lives must be positive: {self}")


class AssociationLevel(NamedTuple):
    """Each item's strongest successors and their decayed weights, as of ``clock``."""

    ids: torch.Tensor  # (N, S) int64 successor item per slot, -1 = empty
    weights: torch.Tensor  # (N, S, V) decayed pair weights
    out: torch.Tensor  # (N, V) each item's decayed outgoing weight (every pair, kept or not)
    into: torch.Tensor  # (N, V) each item's decayed incoming weight
    clock: torch.Tensor  # () int64 the latest event's time, -1 = none yet

    @property
    def n_items(self) -> int:
        return self.ids.shape[0]

    def grown(self, n_items: int) -> AssociationLevel:
        """The same level with rows for items up to ``n_items`` (new items start empty)."""
        extra = n_items - self.n_items
        if extra <= 0:
            return self
        S, V = self.weights.shape[1:]
        return AssociationLevel(torch.cat([self.ids, self.ids.new_full((extra, S), -1)]),
                                torch.cat([self.weights, self.weights.new_zeros(extra, S, V)]),
                                torch.cat([self.out, self.out.new_zeros(extra, V)]),
                                torch.cat([self.into, self.into.new_zeros(extra, V)]), self.clock)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"assoc_ids": self.ids, "assoc_weights": self.weights, "assoc_out": self.out,
                "assoc_into": self.into, "assoc_clock": self.clock}


def _decay(age_s: torch.Tensor, half_lives: torch.Tensor) -> torch.Tensor:
    """(…,) ages in seconds → (…, V) weights 2^(−age / half-life)."""
    return torch.exp2(-age_s.unsqueeze(-1).clamp(min=0) / half_lives)


def empty(n_items: int, cfg: AssociationConfig) -> AssociationLevel:
    if not cfg.half_lives_s:
        raise ValueError("the association level needs its half-lives: AssociationConfig(half_lives_s=…) "
                         "or association_defaults(history ts)")
    V = len(cfg.half_lives_s)
    return AssociationLevel(torch.full((n_items, cfg.slots), -1, dtype=torch.int64),
                            torch.zeros(n_items, cfg.slots, V), torch.zeros(n_items, V), torch.zeros(n_items, V),
                            torch.tensor(-1))


def add(level: AssociationLevel, before: torch.Tensor, items: torch.Tensor, ts: torch.Tensor,
        cfg: AssociationConfig, donate: bool = False) -> AssociationLevel:
    """A time-ordered micro-batch of events → the level after it (a new value; ``donate``:
    its input's tensors are reused, and the caller must not use it again, as in
    `NestedModel.update`).

    before: (B, L) each event's user's items before it, oldest first (-1: none), as
    `recsys.batch_users.sequences_before` gives them; its latest ``cfg.window`` pair with the
    event's item."""
    if not len(items):
        return level
    device = level.weights.device
    half_lives = torch.tensor(cfg.half_lives_s, dtype=level.weights.dtype, device=device)
    level = level.grown(int(max(items.max(), before.max())) + 1)
    now = int(ts.max()) if int(level.clock) < 0 else max(int(level.clock), int(ts.max()))
    start = level
    level = _decayed(level, now, half_lives, donate)
    N, S = level.ids.shape
    prev = before[:, -cfg.window:]  # (B, W) oldest first
    W = prev.shape[1]
    position = cfg.position_decay ** torch.arange(W - 1, -1, -1, dtype=half_lives.dtype, device=device)  # latest = 1
    age = _decay((now - ts).to(half_lives.dtype), half_lives)  # (B, V)
    strength = position.view(1, W, 1) * age.unsqueeze(1)  # (B, W, V)
    dst = items.unsqueeze(1).expand_as(prev)
    valid = (prev >= 0) & (prev != dst)
    src, dst, strength = prev[valid], dst[valid], strength[valid]  # (P,), (P,), (P, V)
    if donate:
        out, into = level.out.index_add_(0, src, strength), level.into.index_add_(0, dst, strength)
    else:
        out, into = level.out.index_add(0, src, strength), level.into.index_add(0, dst, strength)
    if not len(src):
        return AssociationLevel(level.ids, level.weights, out, into, level.clock)

    keys, inverse = torch.unique(src * N + dst, return_inverse=True)  # one entry per distinct pair
    pair_w = strength.new_zeros(len(keys), strength.shape[1]).index_add_(0, inverse, strength)
    src, dst = keys // N, keys % N
    # Written in place below: a copy, unless donated, or new already (decayed or grown)
    ids = level.ids if donate or level.ids is not start.ids else level.ids.clone()
    weights = level.weights if donate or level.weights is not start.weights else level.weights.clone()
    hit = ids[src] == dst.unsqueeze(1)  # (P, S)
    known = hit.any(1)
    slot = hit.to(torch.int8).argmax(1)
    weights.index_put_((src[known], slot[known]), pair_w[known], accumulate=True)

    # New pairs: within each source row, the strongest new pairs take the row's weakest slots,
    # where they outweigh what is there (an empty slot weighs 0).
    src, dst, pair_w = src[~known], dst[~known], pair_w[~known]
    if len(src):
        total = pair_w.sum(1)
        order = torch.argsort(total, descending=True, stable=True)
        order = order[torch.argsort(src[order], stable=True)]  # grouped by row, strongest first
        src, dst, pair_w, total = src[order], dst[order], pair_w[order], total[order]
        rows, first, per_row = torch.unique_consecutive(src, return_inverse=True, return_counts=True)
        rank = torch.arange(len(src), device=device) - (torch.cumsum(per_row, 0) - per_row)[first]
        room = rank < S
        weakest = torch.argsort(weights[rows].sum(-1), dim=1, stable=True)  # (R, S) weakest slot first
        target = weakest[first[room], rank[room]]
        take = total[room] > weights[src[room], target].sum(-1)
        r, t = src[room][take], target[take]
        ids[r, t] = dst[room][take]
        weights[r, t] = pair_w[room][take]
    return AssociationLevel(ids, weights, out, into, level.clock)


def _decayed(level: AssociationLevel, now: int, half_lives: torch.Tensor, donate: bool = False) -> AssociationLevel:
    clock = torch.tensor(now, device=level.clock.device)
    if int(level.clock) < 0:
        return level._replace(clock=clock)
    if now <= int(level.clock):
        return level
    factor = _decay(torch.tensor(float(now - int(level.clock)), dtype=half_lives.dtype, device=half_lives.device),
                    half_lives)  # (V,)
    if donate:
        return AssociationLevel(level.ids, level.weights.mul_(factor), level.out.mul_(factor), level.into.mul_(factor),
                                clock)
    return AssociationLevel(level.ids, level.weights * factor, level.out * factor, level.into * factor, clock)


def speed_shares(n_speeds: int, fast_share: float) -> torch.Tensor:
    """(V,) each speed's share of the vote: the fastest ``fast_share``, the others the rest."""
    if n_speeds == 1:
        return torch.ones(1)
    return torch.tensor([fast_share] + [(1 - fast_share) / (n_speeds - 1)] * (n_speeds - 1))


def read(level: AssociationLevel, recent: torch.Tensor, n_items: int, cfg: AssociationConfig,
         discount: float | None = None, fast_share: float | None = None) -> torch.Tensor:
    """(B, L) each user's latest items, oldest first (-1: none) → (B, n_items) votes for what
    follows them, each row scaled to a best vote of 1 (0 where nothing follows).
    ``discount``, ``fast_share``: the config's, unless given (calibration tries a grid).

    Each source item's slots are scored once per batch (`similarity`), however many of the
    batch's users read it; then each user's sources by their positions (`entries` and `vote`
    are the same read laid out for one user's entries, as serving gathers them)."""
    discount = cfg.popularity_discount if discount is None else discount
    shares = speed_shares(level.weights.shape[-1], cfg.fast_share if fast_share is None else fast_share)
    prev = recent[:, -cfg.window:]
    W = prev.shape[1]
    sources, inverse = torch.unique(prev.clamp(min=0, max=level.n_items - 1), return_inverse=True)
    sim = similarity(level.ids[sources], level.weights[sources], level.out[sources].unsqueeze(1), level.into,
                     n_items, shares.to(level.weights), discount)  # (U, S)
    position = cfg.position_decay ** torch.arange(W - 1, -1, -1, dtype=sim.dtype, device=prev.device)  # latest = 1
    value = sim[inverse] * torch.where(prev >= 0, position, 0).unsqueeze(-1)  # (B, W, S)
    return _votes(level.ids[sources][inverse].flatten(1), value.flatten(1), n_items)


def read_partials(levels: list[AssociationLevel], recent: torch.Tensor, n_items: int, cfg: AssociationConfig
                  ) -> torch.Tensor:
    """`read` of the whole level from partial ones (a worker group's partitions): each brought
    to the freshest clock, their entries side by side, each source's outgoing weight and each
    item's incoming weight summed over them (the vote is linear in the entries)."""
    levels = [level for level in levels if int(level.clock) >= 0]
    if len(levels) == 1:
        return read(levels[0], recent, n_items, cfg)
    if not levels:
        return torch.zeros(len(recent), n_items)
    now = max(int(level.clock) for level in levels)
    n = max(n_items, *(level.n_items for level in levels))
    half_lives = torch.tensor(cfg.half_lives_s, dtype=levels[0].weights.dtype, device=levels[0].weights.device)
    levels = [_decayed(level.grown(n), now, half_lives) for level in levels]
    into = sum(level.into for level in levels)
    laid = [entries(level, recent, cfg) for level in levels]
    out = sum(e[2] for e in laid)
    shares = speed_shares(len(cfg.half_lives_s), cfg.fast_share).to(into)
    values = [similarity(ids, w, out, into, n_items, shares, cfg.popularity_discount) * pos for ids, w, _, pos in laid]
    return _votes(torch.cat([e[0] for e in laid], 1), torch.cat(values, 1), n_items)


def entries(level: AssociationLevel, recent: torch.Tensor, cfg: AssociationConfig
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a read of ``recent``'s latest ``cfg.window`` items gathers, one entry per (item, slot):
    (B, W·S) successors (-1: none), (B, W·S, V) pair weights, (B, W·S, V) the source item's
    outgoing weight, (B, W·S) the source's position weight (0 where it is none)."""
    prev = recent[:, -cfg.window:]
    B, W = prev.shape
    S = level.ids.shape[1]
    src = prev.clamp(min=0, max=level.n_items - 1)
    position = cfg.position_decay ** torch.arange(W - 1, -1, -1, dtype=level.weights.dtype,
                                                  device=prev.device)  # latest = 1
    weight = torch.where(prev >= 0, position, 0).unsqueeze(-1).expand(B, W, S)
    out = level.out[src].unsqueeze(2).expand(B, W, S, -1)
    return (level.ids[src].reshape(B, W * S), level.weights[src].reshape(B, W * S, -1),
            out.reshape(B, W * S, -1), weight.reshape(B, W * S))


def similarity(ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, into: torch.Tensor, n_items: int | None,
               shares: torch.Tensor, discount) -> torch.Tensor:
    """(…, L) successors (-1: none), (…, L, V) pair weights, their sources' outgoing weights
    (broadcastable), (n, V) every item's incoming weight → (…, L) each pair's weight over
    ``out^(1 − discount) · into^discount`` (cosine-like at ½), the speeds mixed by ``shares``;
    0 for no successor, or one past ``n_items`` (None: every item of ``into``)."""
    usable = ids >= 0 if n_items is None else (ids >= 0) & (ids < n_items)
    dst = torch.where(usable, ids, torch.zeros_like(ids))
    pull = into.clamp(min=1e-12) ** -discount  # (n, V): one power per item, not per entry
    sim = (weights * pull[dst] / out.clamp(min=1e-12) ** (1 - discount)) @ shares
    return torch.where(usable, sim, torch.zeros_like(sim))


def _votes(ids: torch.Tensor, value: torch.Tensor, n_items: int) -> torch.Tensor:
    """(B, L) successors and their votes → (B, n_items) votes, each row's best 1."""
    dst = torch.where((ids >= 0) & (ids < n_items), ids, torch.zeros_like(ids))
    votes = value.new_zeros(len(ids), n_items).scatter_add_(1, dst, value)
    return votes / votes.amax(1, keepdim=True).clamp(min=1e-12)


def vote(ids: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, position: torch.Tensor, into: torch.Tensor,
         shares: torch.Tensor, discount) -> torch.Tensor:
    """One layout of `read` for the exported graph (`serving/export.py`): entries (`entries`; a
    worker group's partitions' entries side by side, each source's ``out`` summed over them)
    and every item's incoming weight ``into`` (n, V) → (B, n) votes, each row's best 1. Linear
    in the entries, so partial levels' entries add up to the whole level's vote."""
    value = similarity(ids, weights, out, into, None, shares, discount) * position
    dst = torch.where(ids >= 0, ids, torch.zeros_like(ids))
    zeros = torch.zeros_like(position[:, :1]) * into[:, 0].unsqueeze(0)  # (B, n): shapes the graph traces
    votes = zeros.scatter_add(1, dst, value)
    return votes / votes.amax(1, keepdim=True).clamp(min=1e-12)


def absorb(level: AssociationLevel, log, cfg: AssociationConfig, batch_size: int = 4096,
           recent: torch.Tensor | None = None) -> tuple[AssociationLevel, torch.Tensor]:
    """A whole time-ordered log (``users``, ``items``, ``ts`` arrays) through ``add`` in
    micro-batches; each user's previous items are tracked in ``recent`` ((U, W), oldest
    first), returned with the level so a later batch goes on from it."""
    n_users = int(log.users.max()) + 1 if len(log.users) else 0
    recent = torch.full((n_users, cfg.window), -1, dtype=torch.int64) if recent is None else \
        grow(recent, n_users, fill=-1)
    for lo in range(0, len(log.users), batch_size):
        users, items, ts = (torch.from_numpy(a[lo:lo + batch_size]) for a in (log.users, log.items, log.ts))
        before = sequences_before(recent[users], users, items)
        level = add(level, before, items, ts, cfg)
        p = user_positions(users)
        last = p.pos == p.counts[p.row] - 1  # each user's latest event of the batch
        recent[users[last]] = torch.cat([before[last, 1:], items[last].unsqueeze(1)], 1)
    return level, recent


# The speeds, as multiples of the population level's middle half-life (the time the history's
# latest 1 % of events took): one for what follows what this week, one that keeps nearly all
# of the history (item-kNN, which never forgets, is strong on sparse logs).
SPEEDS = (1.0, 1024.0)


def association_defaults(base_half_life_s: float, speeds: tuple[float, ...] = SPEEDS) -> AssociationConfig:
    return AssociationConfig(half_lives_s=tuple(base_half_life_s * s for s in speeds))
