"""Session-based kNN in the style of V-SKNN (Ludewig & Jannach, "Evaluation of session-based
recommendation algorithms", 2018), online: a baseline the field calls hard to beat on
sparse logs.

A user's session is their latest ``m`` items, the latest weighing most (linear position
weights: the p-th of m weighs p / m). Neighbours are sampled among the latest takers of
those items (each item keeps its latest ``takers`` users); a neighbour's similarity is the
sum of the position weights of the session items it took among them (the dot product of
the weighted session with the neighbour's, over the sample). The ``k`` most similar vote for
their own latest items, each vote its similarity times the item's idf. Both ``m`` and ``k``
are chosen on the history's own 80/20 replay (protocol v2), never on the stream; every
setting of the grid reads the same state, so choosing costs one replay of the history.

    >>> sknn = SKNNOnline()
    >>> sknn.fit(log.history())       # sknn.session, sknn.neighbours: the grid's best on the history

Shapes: ``B`` events, ``m`` session items, ``T`` takers per item, ``k`` neighbours, ``M``
items a neighbour votes with, ``N`` items.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offline_eval.protocol import ProtocolConfig
from offline_eval.replay import grid_gains
from recsys.batch_users import sequences_before, user_positions
from recsys.rows import grow


@dataclass(frozen=True)
class SKNNConfig:
    sessions: tuple[int, ...] = (3, 5, 10)  # m: the user's latest items taken as their session (a grid)
    neighbours: tuple[int, ...] = (50, 100, 200)  # k (a grid)
    takers: int = 100  # T: each item's latest takers, the neighbours' sample
    votes: int = 10  # M: a neighbour's latest items, each of which it votes for
    pop_weight: float = 1e-3  # tie-break towards popular items, and the answer for a user with no history


class SKNNOnline:
    def __init__(self, cfg: SKNNConfig = SKNNConfig(), session: int | None = None, neighbours: int | None = None):
        self.cfg, self.session, self.neighbours = cfg, session, neighbours
        self.width = max(max(cfg.sessions), cfg.votes)
        self.recent = torch.full((0, self.width), -1, dtype=torch.int64)  # (U, ·) each user's latest items
        self.takers = torch.full((0, cfg.takers), -1, dtype=torch.int64)  # (N, T) each item's latest takers
        self.count = torch.zeros(0)  # (N,) events of each item
        self.users_seen = 0

    def fit(self, history) -> None:
        if self.session is None or self.neighbours is None:
            self.session, self.neighbours = self._choose(history.resplit(ProtocolConfig().history_fraction))
        self._reset()
        self.update(history)

    def describe(self) -> dict:
        return {"session": self.session, "neighbours": self.neighbours,
                "summary": f"session of the latest {self.session} items, {self.neighbours} neighbours among each "
                           f"item's latest {self.cfg.takers} takers, chosen on the history's own replay"}

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self._ensure(int(users.max()) + 1, n_items)
        return self._scores(self.recent[users], users, n_items, [(self.session, self.neighbours)])[0]

    def score_fresh(self, batch, n_items: int) -> torch.Tensor:
        """Each event's session includes its user's earlier events of the batch (the takers stay at the batch start)."""
        return self._fresh(batch, n_items, [(self.session, self.neighbours)])[0]

    def update(self, batch, chunk: int = 4096) -> None:
        for lo in range(0, batch.n_events if hasattr(batch, "n_events") else len(batch.users), chunk):
            users, items = (torch.from_numpy(a[lo:lo + chunk]) for a in (batch.users, batch.items))
            self._ensure(int(users.max()) + 1, int(items.max()) + 1)
            before = sequences_before(self.recent[users], users, items)
            takers_before = sequences_before(self.takers[items], items, users)  # an item's takers, as a user's items
            self.count.index_add_(0, items, torch.ones(len(items)))
            for rows, ring, new, key in ((users, self.recent, items, before), (items, self.takers, users, takers_before)):
                p = user_positions(rows)
                last = p.pos == p.counts[p.row] - 1  # the row's latest event of the chunk
                ring[rows[last]] = torch.cat([key[last, 1:], new[last].unsqueeze(1)], 1)
            self.users_seen = max(self.users_seen, int(users.max()) + 1)

    # -- the read --------------------------------------------------------------------------------
    def _fresh(self, batch, n_items: int, grid) -> list[torch.Tensor]:
        users, items = torch.from_numpy(batch.users), torch.from_numpy(batch.items)
        self._ensure(int(users.max()) + 1, max(n_items, int(items.max()) + 1))
        return self._scores(sequences_before(self.recent[users], users, items), users, n_items, grid)

    def _scores(self, recent: torch.Tensor, users: torch.Tensor, n_items: int, grid) -> list[torch.Tensor]:
        """(B, ·) sessions (oldest first, -1: none) → one (B, n_items) score per (m, k) of ``grid``."""
        count = self.count[:n_items]
        idf = torch.log1p(max(self.users_seen, 1) / count.clamp(min=1))
        prior = self.cfg.pop_weight * torch.log1p(count)
        out = []
        for m in sorted({m for m, _ in grid}):
            ks = [k for mm, k in grid if mm == m]
            ids, sims = self._neighbours(recent[:, -m:], users, max(ks))
            for k in ks:
                out.append(((m, k), self._vote(ids[:, :k], sims[:, :k], idf, n_items) + prior))
        order = {key: i for i, key in enumerate(grid)}
        return [scores for _, scores in sorted(out, key=lambda o: order[o[0]])]

    def _neighbours(self, session: torch.Tensor, users: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, m) sessions → (B, k) the most similar neighbours (-1: none) and their similarities."""
        B, m = session.shape
        position = torch.arange(1, m + 1, dtype=torch.float32) / m  # linear: the latest weighs 1
        weight = torch.where(session >= 0, position, 0)  # (B, m)
        cand = torch.where((session >= 0).unsqueeze(-1), self.takers[session.clamp(min=0)], -1)  # (B, m, T)
        cand = torch.where(cand == users.view(-1, 1, 1), -1, cand).reshape(B, -1)  # never the user themself
        w = weight.unsqueeze(-1).expand(-1, -1, self.cfg.takers).reshape(B, -1)
        # A candidate's similarity: the weights of the session items it took, summed over its
        # copies in the row (duplicates sit side by side once sorted; the last of each run keeps the sum).
        cand, order = torch.sort(cand, dim=1)
        total = torch.cumsum(torch.gather(w, 1, order), 1)
        last = torch.ones_like(cand, dtype=torch.bool)
        last[:, :-1] = cand[:, :-1] != cand[:, 1:]
        before = torch.where(last, total, 0)
        start = torch.cummax(torch.cat([torch.zeros(B, 1), before[:, :-1]], 1), 1).values  # the previous run's end
        sim = torch.where(last & (cand >= 0), total - start, 0)
        k = min(k, sim.shape[1])
        sims, at = torch.topk(sim, k, dim=1)
        ids = torch.where(sims > 0, torch.gather(cand, 1, at), -1)
        return ids, sims

    def _vote(self, ids: torch.Tensor, sims: torch.Tensor, idf: torch.Tensor, n_items: int) -> torch.Tensor:
        """(B, k) neighbours and similarities → (B, n_items) their latest items' votes × idf."""
        B, k = ids.shape
        items = self.recent[ids.clamp(min=0)][..., -self.cfg.votes:]  # (B, k, M)
        usable = (ids >= 0).unsqueeze(-1) & (items >= 0) & (items < n_items)
        value = torch.where(usable, sims.unsqueeze(-1), 0).reshape(B, -1)
        votes = torch.zeros(B, n_items).scatter_add_(1, torch.where(usable, items, 0).reshape(B, -1), value)
        return votes * idf

    # -- state and choosing ----------------------------------------------------------------------
    def _reset(self) -> None:
        self.recent = self.recent[:0]
        self.takers = self.takers[:0]
        self.count = self.count[:0]
        self.users_seen = 0

    def _ensure(self, n_users: int, n_items: int) -> None:
        self.recent = grow(self.recent, n_users, fill=-1)
        self.takers = grow(self.takers, n_items, fill=-1)
        self.count = grow(self.count, n_items)

    def _choose(self, inner, batch_size: int = 256) -> tuple[int, int]:
        """The grid's (m, k) with the best NDCG@10 on ``inner``'s stream (ties: the first)."""
        grid = [(m, k) for m in self.cfg.sessions for k in self.cfg.neighbours]
        self._reset()
        self.update(inner.slice(0, inner.n_history))
        gain = grid_gains(inner, lambda batch, n_known: torch.stack(self._fresh(batch, n_known, grid)),
                          self.update, batch_size)
        return grid[int(torch.argmax(gain))]
