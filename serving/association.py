"""The association level as serving holds it: every partition's rows, tailed from the worker
group's changelog (`streaming/association_log.py`), and a user's read gathered from them
for the exported graph, which scores it as the model does (`recsys.association.vote`).

Each row is kept as of the clock it was sent at, the latest clock winning; a read brings the
rows it takes to the freshest partition's clock (pure decay, so exactly). The partitions'
entries go to the graph side by side, each source's outgoing weight summed over them: the
vote is linear in the entries, so that is the vote of the whole level.

    >>> tables = AssociationTables("127.0.0.1:9092", "interactions", half_lives_s, window=10, position_decay=0.85)
    >>> tables.refresh()                                   # the changelog to its end
    >>> inputs = tables.entries(latest_items, n_items)     # the graph's assoc_* inputs
"""

from __future__ import annotations

import time

import numpy as np

from streaming.association_log import association_topic, decode, no_entries
from streaming.clients import make_consumer


class PartitionRows:
    """One partition's association rows, grown as items appear."""

    def __init__(self, slots: int, speeds: int):
        self.ids = np.full((0, slots), -1, np.int64)
        self.weights = np.zeros((0, slots, speeds), np.float32)
        self.out = np.zeros((0, speeds), np.float32)
        self.into = np.zeros((0, speeds), np.float32)
        self.clock = np.full(0, -1, np.int64)  # the clock each row is as of

    def put(self, clock: int, rows: np.ndarray, t: dict[str, np.ndarray]) -> None:
        if rows.max(initial=-1) >= len(self.clock):
            self._grow(int(rows.max()) + 1)
        newer = clock >= self.clock[rows]  # a row sent again by a restarted worker, or late: the latest wins
        rows = rows[newer]
        self.ids[rows], self.weights[rows], self.out[rows], self.into[rows] = (
            t[k][newer] for k in ("ids", "weights", "out", "into"))
        self.clock[rows] = clock

    def _grow(self, n: int) -> None:
        n = max(n, int(len(self.clock) * 1.5))
        extra = n - len(self.clock)
        self.ids = np.concatenate([self.ids, np.full((extra, self.ids.shape[1]), -1, np.int64)])
        self.weights = np.concatenate([self.weights, np.zeros((extra, *self.weights.shape[1:]), np.float32)])
        self.out = np.concatenate([self.out, np.zeros((extra, self.out.shape[1]), np.float32)])
        self.into = np.concatenate([self.into, np.zeros((extra, self.into.shape[1]), np.float32)])
        self.clock = np.concatenate([self.clock, np.full(extra, -1, np.int64)])


class AssociationTables:
    def __init__(self, bootstrap_servers: str, topic: str, half_lives_s: list[float], window: int,
                 position_decay: float, timeout_s: float = 30.0):
        from kafka import TopicPartition

        self.half_lives = np.asarray(half_lives_s, np.float64)
        self.window, self.position_decay, self.timeout_s = window, position_decay, timeout_s
        self.partitions: dict[int, PartitionRows] = {}
        self.into = (np.zeros((0, len(half_lives_s)), np.float32), -1)  # (every item's incoming weight, clock)
        self.tp = TopicPartition(association_topic(topic), 0)
        self.consumer = make_consumer(bootstrap_servers)
        self.consumer.assign([self.tp])
        self.consumer.seek_to_beginning(self.tp)

    def refresh(self) -> int:
        """Read the changelog to its end (what it held when called); returns the rows read."""
        end = self.consumer.end_offsets([self.tp])[self.tp]
        deadline, read = time.monotonic() + self.timeout_s, 0
        while self.consumer.position(self.tp) < end:
            for records in self.consumer.poll(timeout_ms=100, max_records=64).values():
                for record in records:
                    partition, clock, rows, t = decode(record.value)
                    if partition not in self.partitions:
                        self.partitions[partition] = PartitionRows(t["ids"].shape[1], t["weights"].shape[2])
                    self.partitions[partition].put(clock, rows, t)
                    read += len(rows)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the association changelog {self.tp.topic} could not be read to its end "
                                   f"({end}) within {self.timeout_s:.0f}s")
        if read:
            self.into = self._summed_into()
        return read

    @property
    def clock(self) -> int:
        return max((int(p.clock.max(initial=-1)) for p in self.partitions.values()), default=-1)

    def _decay(self, clock: np.ndarray, now: int) -> np.ndarray:
        """(…,) row clocks → (…, V) each speed's decay to ``now`` (rows never sent: 0)."""
        age = np.maximum(now - clock, 0).astype(np.float64)[..., None]
        return np.where(clock[..., None] >= 0, np.exp2(-age / self.half_lives), 0).astype(np.float32)

    def _summed_into(self) -> tuple[np.ndarray, int]:
        now = self.clock
        n = max((len(p.clock) for p in self.partitions.values()), default=0)
        total = np.zeros((n, len(self.half_lives)), np.float32)
        for p in self.partitions.values():
            total[:len(p.clock)] += p.into * self._decay(p.clock, now)
        return total, now

    def entries(self, latest: list[int], n_items: int) -> dict[str, np.ndarray]:
        """The graph's association inputs for a user whose latest items (oldest first, indices
        in the catalogue's numbering) are ``latest``, over ``n_items`` items: the model's table
        and the items first seen online that serving knows of."""
        into, now = self.into
        V = len(self.half_lives)
        src = np.asarray(latest[-self.window:], np.int64)
        W = len(src)
        position = (self.position_decay ** np.arange(W - 1, -1, -1)).astype(np.float32)  # latest = 1
        held = [(p, src[src < len(p.clock)], position[src < len(p.clock)]) for p in self.partitions.values()]
        out = np.zeros((W, V), np.float32)  # each source's outgoing weight, summed over the partitions
        for p, rows, _ in held:
            out[src < len(p.clock)] += p.out[rows] * self._decay(p.clock[rows], now)
        ids, weights, outs, positions = [], [], [], []
        for p, rows, pos in held:
            slot_ids = p.ids[rows]
            ids.append(np.where(slot_ids < n_items, slot_ids, -1))  # an item serving cannot name yet: no vote
            weights.append(p.weights[rows] * self._decay(p.clock[rows], now)[:, None, :])
            outs.append(np.broadcast_to(out[src < len(p.clock)][:, None, :], (len(rows), p.ids.shape[1], V)))
            positions.append(np.broadcast_to(pos[:, None], (len(rows), p.ids.shape[1])))
        every = np.zeros((n_items, V), np.float32)
        every[:min(n_items, len(into))] = into[:n_items]
        if not sum(len(rows) for _, rows, _ in held):  # nothing to read
            return no_entries(n_items, V) | {"assoc_into": every}
        return {"assoc_ids": np.concatenate(ids).reshape(1, -1),
                "assoc_weights": np.concatenate(weights).reshape(1, -1, V).astype(np.float32),
                "assoc_out": np.concatenate(outs).reshape(1, -1, V).astype(np.float32),
                "assoc_position": np.concatenate(positions).reshape(1, -1).astype(np.float32),
                "assoc_into": every}

    def close(self) -> None:
        self.consumer.close(autocommit=False)
