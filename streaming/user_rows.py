"""The worker's users: one state row per user id, and beside each row what applying the
stream exactly once needs — the partition that owns the user, the offset of the user's
latest applied event, when the user was last active (for the idle TTL) and hashes of the
user's latest client event ids (for client retries).

    >>> rows = UserRows()
    >>> r = rows.rows(["u1", "u2", "u1"], torch.tensor([0, 3, 0]))   # tensor([0, 1, 0])
    >>> new = rows.unapplied(r, offsets, event_ids)                   # not in the state yet
    >>> rows.applied(r[new], offsets[new])
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch

from recsys.vocab import Vocab

EVENT_IDS_KEPT = 16  # per user: a client retry within this many of the user's id'd events is applied once


class UserRows:
    def __init__(self):
        self.ids = Vocab()  # row -> external user id
        self.partition = torch.empty(0, dtype=torch.int64)
        self.through = torch.empty(0, dtype=torch.int64)  # offset of the latest applied event; -1: none tracked
        self.touched = torch.empty(0, dtype=torch.float64)  # monotonic time of the latest event
        self.event_ids = torch.zeros(0, EVENT_IDS_KEPT, dtype=torch.int64)  # 0: empty slot

    def __len__(self) -> int:
        return len(self.ids)

    def find(self, user_ids) -> np.ndarray:
        """Rows of ``user_ids``, -1 for users not held."""
        return self.ids.index(list(user_ids), add=False)

    def rows(self, user_ids: list[str], partitions: torch.Tensor) -> torch.Tensor:
        """Rows of ``user_ids`` (new users get new rows), remembering each one's partition."""
        rows = torch.from_numpy(self.ids.index(user_ids))
        grown = len(self.ids) - len(self.partition)
        if grown:
            self.partition = torch.cat([self.partition, torch.full((grown,), -1, dtype=torch.int64)])
            self.through = torch.cat([self.through, torch.full((grown,), -1, dtype=torch.int64)])
            self.touched = torch.cat([self.touched, torch.full((grown,), time.monotonic(), dtype=torch.float64)])
            self.event_ids = torch.cat([self.event_ids, torch.zeros(grown, EVENT_IDS_KEPT, dtype=torch.int64)])
        self.partition[rows] = partitions
        return rows

    def unapplied(self, rows: torch.Tensor, offsets: torch.Tensor, event_ids) -> torch.Tensor:
        """(B,) bool: events not in the state yet — past their row's latest offset (a row back
        from the online store may hold some already), and not a client's retry of an event
        applied before. Each new client id is remembered (the user's latest ``EVENT_IDS_KEPT``)."""
        new = offsets > self.through[rows]
        if all(e is None for e in event_ids):
            return new
        for j, (row, event_id) in enumerate(zip(rows.tolist(), event_ids)):
            if event_id is None or not new[j]:
                continue
            h = _id_hash(event_id)
            if bool((self.event_ids[row] == h).any()):
                new[j] = False
            else:
                self.event_ids[row] = torch.cat([self.event_ids[row, 1:], torch.tensor([h])])
        return new

    def applied(self, rows: torch.Tensor, offsets: torch.Tensor) -> None:
        self.through.scatter_reduce_(0, rows, offsets, "amax")
        self.touched[rows] = time.monotonic()

    def on(self, partitions) -> torch.Tensor:
        """(U,) bool: rows owned by ``partitions``."""
        return torch.isin(self.partition, torch.tensor(sorted(partitions), dtype=torch.int64))

    def idle(self, ttl_s: float) -> torch.Tensor:
        """(U,) bool: rows with no event for ``ttl_s`` seconds."""
        return time.monotonic() - self.touched > ttl_s

    def least_recent(self, n: int) -> torch.Tensor:
        """The ``n`` rows whose latest event is oldest."""
        return torch.argsort(self.touched[:len(self)])[:n]

    def restart_log(self, partition: int) -> None:
        """Offsets in a partition's old log mean nothing in its new one."""
        self.through[self.partition == partition] = -1

    def keep(self, keep: torch.Tensor) -> torch.Tensor:
        """Keep the rows where ``keep`` (U,) holds, renumbered in order; returns the renumbering
        (old row -> new row, -1 for a dropped one)."""
        rows = keep.nonzero().flatten()
        self.ids = Vocab([self.ids.ids[r] for r in rows.tolist()])
        self.partition, self.through, self.touched = self.partition[rows], self.through[rows], self.touched[rows]
        self.event_ids = self.event_ids[rows]
        renumber = torch.full((len(keep),), -1, dtype=torch.int64)
        renumber[rows] = torch.arange(len(rows))
        return renumber


def _id_hash(event_id: str) -> int:
    """A stable 63-bit hash of a client's event id (Python's own hash is salted per process)."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") >> 1 or 1
