"""Count-based baselines of the replay protocol: popularity (static, online, decayed)
and online item-to-item co-occurrence. Each has ``fit(history)``, ``score(users,
n_items)`` and ``update(batch)``, the interface every replayed model shares.

Shapes: ``B`` events in a batch, ``N`` known items, ``L`` recent items per user.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offline_eval.protocol import ProtocolConfig
from offline_eval.replay import grid_gains
from recsys.batch_users import sequences_before, user_positions
from recsys.rows import grow


class PopStatic:
    """Item counts over history; never changes."""

    def __init__(self):
        self.counts = torch.zeros(0)

    def fit(self, history) -> None:
        self.counts = torch.bincount(torch.from_numpy(history.items)).float()

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self.counts = grow(self.counts, n_items)
        return self.counts[:n_items].expand(len(users), n_items)

    def update(self, batch) -> None:
        pass


class PopOnline(PopStatic):
    """Item counts updated after every batch; with ``half_life_events`` they decay per event,
    so recent popularity (trends) outweighs old."""

    def __init__(self, half_life_events: float | None = None):
        super().__init__()
        self.decay = 0.5 ** (1 / half_life_events) if half_life_events else 1.0

    def fit(self, history) -> None:
        items = torch.from_numpy(history.items)
        if self.decay == 1.0:
            self.counts = torch.bincount(items).float()
        else:  # each event weighs decay^(events after it)
            age = torch.arange(len(items) - 1, -1, -1, dtype=torch.float64)
            self.counts = torch.bincount(items, weights=self.decay ** age).float()

    def update(self, batch) -> None:
        items = torch.from_numpy(batch.items)
        self.counts = grow(self.counts, int(items.max()) + 1)
        if self.decay == 1.0:
            self.counts.index_add_(0, items, torch.ones(len(items)))
        else:
            age = torch.arange(len(items) - 1, -1, -1, dtype=torch.float32)
            self.counts.mul_(self.decay ** len(items))
            self.counts.index_add_(0, items, self.decay ** age)


@dataclass(frozen=True)
class ItemKNNConfig:
    # decay and alpha: best on the history's own 80/20 replay (protocol v2) of ML-1M and of
    # Steam alike, from {0.7, 0.8, 0.85, 0.9} × {0.5, 0.75, 0.9}; never on a stream.
    recent: int = 20  # L: the user's latest items that vote for what follows them
    window: int = 20  # j follows i when j is among the next `window` events of the same user (window <= recent)
    decay: float = 0.85  # the vote of the user's k-th latest item weighs decay^(k-1): what they just did counts most
    alpha: float = 0.75  # sim(i → j) = follows(i, j) / (cnt_i^alpha · cnt_j^(1-alpha)); 1: P(j | i)
    pop_weight: float = 1e-3  # tie-break towards popular items, and the answer for users with no history

    def __post_init__(self) -> None:
        if not 1 <= self.window <= self.recent:
            raise ValueError(f"window must be in [1, recent={self.recent}], got {self.window}")


class ItemKNNOnline:
    """Sequential item-to-item kNN: counts of "j follows i" within a window of the same
    user's events, grown per batch; the user's latest items vote for their successors,
    the latest loudest.

    Memory: a dense (N, N) float matrix (ML-1M: 47 MB)."""

    def __init__(self, cfg: ItemKNNConfig = ItemKNNConfig()):
        self.cfg = cfg
        self.follows = torch.zeros(0, 0)  # [i, j]: times j followed i
        self.count = torch.zeros(0)
        self.recent = torch.full((0, cfg.recent), -1, dtype=torch.long)  # (U, L) ring, newest last

    def _ensure(self, n_users: int, n_items: int) -> None:
        self.follows = grow(grow(self.follows, n_items, 0), n_items, 1)
        self.count = grow(self.count, n_items)
        self.recent = grow(self.recent, n_users, 0, fill=-1)

    def fit(self, history) -> None:
        self._ensure(history.n_users_known, history.n_items_known)
        self._absorb(history.users, history.items)

    def update(self, batch) -> None:
        self._ensure(batch.n_users_known, batch.n_items_known)
        self._absorb(batch.users, batch.items)

    def _absorb(self, users: np.ndarray, items: np.ndarray, chunk: int = 4096) -> None:
        # Events are applied in chunks; inside one chunk, a user's events pair with their
        # earlier events of the same chunk (sequences_before).
        for lo in range(0, len(users), chunk):
            self._absorb_chunk(torch.from_numpy(users[lo:lo + chunk]), torch.from_numpy(items[lo:lo + chunk]))

    def _absorb_chunk(self, users: torch.Tensor, items: torch.Tensor) -> None:
        before = sequences_before(self.recent[users], users, items)  # (B, L) oldest first
        prev = before[:, -self.cfg.window:]  # the `window` items each event follows
        valid = prev >= 0
        self.follows.index_put_((prev[valid], items.unsqueeze(1).expand_as(prev)[valid]),
                                torch.ones(int(valid.sum())), accumulate=True)
        self.count.index_add_(0, items, torch.ones(len(items)))
        # Each user's ring: what came before their last event of the chunk, then that event.
        p = user_positions(users)
        last = p.pos == p.counts[p.row] - 1
        self.recent[users[last]] = torch.cat([before[last, 1:], items[last].unsqueeze(1)], dim=1)

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self._ensure(int(users.max()) + 1, n_items)
        return self._votes(self.recent[users], n_items)

    def score_fresh(self, batch, n_items: int) -> torch.Tensor:
        """Each event's voters include its user's earlier events of the batch (counts stay at the batch start)."""
        users, items = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
        self._ensure(int(users.max()) + 1, max(n_items, int(items.max()) + 1))  # items new to this batch vote nothing yet
        return self._votes(sequences_before(self.recent[users], users, items), n_items)

    def _votes(self, recent: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B, L) latest items, oldest first (-1: none) → (B, n_items) scores."""
        B, L = recent.shape
        src = recent.clamp(min=0)
        age = torch.arange(L - 1, -1, -1)  # 0 for the newest
        weight = (recent >= 0) * self.cfg.decay ** age / self.count[src].clamp(min=1) ** self.cfg.alpha  # (B, L)
        # A sparse (B, N_all) vote matrix times the follows rows: 3x faster than a dense gather.
        rows_cols = torch.stack([torch.arange(B).repeat_interleave(L), src.flatten()])
        votes_from = torch.sparse_coo_tensor(rows_cols, weight.flatten(), (B, self.follows.shape[0]),
                                             check_invariants=False)
        votes = torch.sparse.mm(votes_from, self.follows[:, :n_items])  # (B, N)
        count = self.count[:n_items]
        return votes / count.clamp(min=1) ** (1 - self.cfg.alpha) + self.cfg.pop_weight * torch.log1p(count)


# Half-lives of `DecayedPop`, in seconds: an hour to half a year; the history's own replay picks one.
HALF_LIVES_S = (3600.0, 4 * 3600.0, 86400.0, 3 * 86400.0, 7 * 86400.0, 30 * 86400.0, 180 * 86400.0)


class DecayedPop:
    """Item counts decayed by event time, each event weighing 2^(−age / half-life): what is
    popular now. With ``half_life_s`` None, ``fit`` chooses it from ``grid`` on the history's
    own 80/20 replay (protocol v2), never on the stream; the grid's counts are kept side by
    side as (G, N), so choosing costs one replay of the history.

        >>> pop = DecayedPop()
        >>> pop.fit(log.history())      # pop.half_life_s: the grid's best on the history
    """

    def __init__(self, half_life_s: float | None = None, grid: tuple[float, ...] = HALF_LIVES_S):
        self.half_life_s, self.grid = half_life_s, tuple(grid)
        self.half_lives = torch.zeros(0, dtype=torch.float64)
        self.counts = torch.zeros(0, 0, dtype=torch.float64)  # (G, N) as of ``clock``
        self.clock: int | None = None

    def fit(self, history) -> None:
        if self.half_life_s is None:
            self.half_life_s = self._choose(history.resplit(ProtocolConfig().history_fraction))
        self._start((self.half_life_s,))
        self._absorb(history.items, history.ts)

    def describe(self) -> dict:
        return {"half_life_s": self.half_life_s,
                "summary": f"half-life {self.half_life_s / 3600:g} h, chosen on the history's own replay"}

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        return self.grid_scores(n_items)[0].float().expand(len(users), n_items)

    def grid_scores(self, n_items: int) -> torch.Tensor:
        """(G, n_items) the counts of each half-life kept."""
        self.counts = grow(self.counts, n_items, 1)
        return self.counts[:, :n_items]

    def update(self, batch) -> None:
        self._absorb(batch.items, batch.ts)

    def _start(self, half_lives) -> None:
        self.half_lives = torch.tensor(half_lives, dtype=torch.float64).view(-1, 1)
        self.counts, self.clock = torch.zeros(len(half_lives), 0, dtype=torch.float64), None

    def _absorb(self, items: np.ndarray, ts: np.ndarray) -> None:
        if not len(items):
            return
        items, ts = torch.from_numpy(items), torch.from_numpy(ts)
        now = int(ts.max()) if self.clock is None else max(self.clock, int(ts.max()))
        self.counts = grow(self.counts, int(items.max()) + 1, 1)
        if self.clock is not None:
            self.counts *= torch.exp2(-(now - self.clock) / self.half_lives)
        age = (now - ts).to(torch.float64).clamp(min=0)  # a late event counts as of now
        self.counts.index_add_(1, items, torch.exp2(-age / self.half_lives))
        self.clock = now

    def _choose(self, inner, batch_size: int = 256) -> float:
        """The grid's half-life with the best NDCG@10 on ``inner``'s stream (ties: the first)."""
        self._start(self.grid)
        self._absorb(inner.items[:inner.n_history], inner.ts[:inner.n_history])
        gain = grid_gains(inner, lambda batch, n_known: self.grid_scores(n_known).float().unsqueeze(1)
                          .expand(-1, batch.n_events, -1), self.update, batch_size)
        return self.grid[int(torch.argmax(gain))]
