"""The association level's changelog: what a worker group's partitions learned of *what follows
what*, as rows for serving to hold.

A partition's association level is a table of N items × S successor slots, far too large to
push whole ten times a second, and each event changes a few rows only. So the worker sends
the rows that changed (a source item's successors and weights, and each item's outgoing and
incoming weight), every ``every_s``, to partition 0 of the topic ``<topic>.association``, and
serving tails it (`serving/association.py`). Kafka Streams backs its state stores the same way.

A row's values are as of its partition's clock when sent; between sends a row only decays,
so serving brings every row to one time exactly. A row sent twice (a worker restarted from
its checkpoint re-applies events and sends their rows again) carries the same values, and
serving keeps, per row, the one of the latest clock: order and repeats do not matter.
A worker sends a partition's whole level when it takes the partition over (from a
checkpoint, or its first events) and every ``snapshot_every_s``, so a log kept for longer
than that always holds every row.

    >>> log = AssociationLog("127.0.0.1:9092", "interactions")
    >>> log.touched(partition, rows)          # item rows the batch changed
    >>> log.send(levels)                      # at most every ``every_s``; a no-op between
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from streaming.clients import create_topic, make_producer

log = logging.getLogger("recsys.stream")
RETENTION_MS = 3600 * 1000
MESSAGE_BYTES = 256 * 1024  # rows per message: about this much (256 rows of 64 slots at 2 speeds), under a broker's 1 MB


def association_topic(topic: str) -> str:
    return f"{topic}.association"


def encode(partition: int, clock: int, rows: np.ndarray, level: dict[str, np.ndarray]) -> bytes:
    """One message: the rows' tensors as of ``clock`` (safetensors, readable without torch)."""
    from safetensors.numpy import save

    return save({"partition": np.array([partition], np.int64), "clock": np.array([clock], np.int64),
                 "rows": rows.astype(np.int64), **{k: np.ascontiguousarray(v) for k, v in level.items()}})


def no_entries(n_items: int, speeds: int) -> dict[str, np.ndarray]:
    """The exported graph's association inputs for a read of nothing (no vote for any item): one
    empty entry, as ONNX Runtime's MatMul takes no zero-length operand."""
    return {"assoc_ids": np.full((1, 1), -1, np.int64), "assoc_weights": np.zeros((1, 1, speeds), np.float32),
            "assoc_out": np.ones((1, 1, speeds), np.float32), "assoc_position": np.zeros((1, 1), np.float32),
            "assoc_into": np.zeros((n_items, speeds), np.float32)}


def decode(body: bytes) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]]:
    from safetensors.numpy import load

    t = load(body)
    return int(t.pop("partition")[0]), int(t.pop("clock")[0]), t.pop("rows"), t


class AssociationLog:
    def __init__(self, bootstrap_servers: str, topic: str, every_s: float = 0.25, snapshot_every_s: float = 300.0):
        if snapshot_every_s * 1000 >= RETENTION_MS:
            raise ValueError(f"snapshot_every_s={snapshot_every_s} must be well under the changelog's retention")
        self.topic, self.every_s, self.snapshot_every_s = association_topic(topic), every_s, snapshot_every_s
        try:  # kept an hour: far longer than between two whole levels, so it always holds every row
            create_topic(bootstrap_servers, self.topic, partitions=1, configs={"retention.ms": str(RETENTION_MS)})
        except Exception as e:  # created already (by another worker, or before)
            if "TopicAlreadyExists" not in type(e).__name__ + str(e):
                raise
        self.producer = make_producer(bootstrap_servers)
        self.lock = threading.Lock()  # failed sends come back on the producer's thread
        self.dirty: dict[int, list[np.ndarray]] = {}
        self.whole: set[int] = set()  # partitions owed a whole level
        self.last_sent = 0.0
        self.last_snapshot = time.monotonic()
        self.bytes_sent = 0

    def touched(self, partition: int, rows) -> None:
        """``rows``: a tensor (on any device) or array of item rows; -1: none."""
        rows = rows.cpu().numpy() if hasattr(rows, "cpu") else np.asarray(rows)
        with self.lock:
            self.dirty.setdefault(partition, []).append(rows)

    def take_over(self, partition: int) -> None:
        """The partition's whole level goes with the next send (a new owner, restored or not)."""
        with self.lock:
            self.whole.add(partition)

    def forget(self, partition: int) -> None:
        """A revoked partition: its new owner sends it."""
        with self.lock:
            self.dirty.pop(partition, None)
            self.whole.discard(partition)

    def send(self, levels: dict, force: bool = False) -> int:
        """Send the changed rows of every partition in ``levels`` (partition -> `FastState`);
        at most every ``every_s`` unless ``force``. Returns the rows sent."""
        now = time.monotonic()
        if not force and now - self.last_sent < self.every_s:
            return 0
        self.last_sent = now
        with self.lock:
            if now - self.last_snapshot >= self.snapshot_every_s:
                self.whole |= set(levels)
                self.last_snapshot = now
            dirty, whole = self.dirty, self.whole & set(levels)
            self.dirty, self.whole = {}, self.whole - whole
        sent = 0
        for p in sorted(set(dirty) | whole):
            if p not in levels:
                continue
            level = levels[p].association()
            ids, weights, out, into = (t.cpu().numpy() for t in (level.ids, level.weights, level.out, level.into))
            if p in whole:  # every row that holds anything
                rows = np.flatnonzero((out.sum(1) > 0) | (into.sum(1) > 0))
            else:
                rows = np.unique(np.concatenate(dirty[p]))
                rows = rows[(rows >= 0) & (rows < len(ids))]
            clock = int(level.clock)
            per_message = max(1, MESSAGE_BYTES // (ids[:1].nbytes + weights[:1].nbytes + 2 * out[:1].nbytes))
            for lo in range(0, len(rows), per_message):
                part = rows[lo:lo + per_message]
                body = encode(p, clock, part, {"ids": ids[part], "weights": weights[part], "out": out[part],
                                                "into": into[part]})
                self.producer.send(self.topic, key=str(p).encode(), value=body, partition=0).add_errback(
                    self._failed, p, part)
                self.bytes_sent += len(body)
            sent += len(rows)
        return sent

    def _failed(self, error, partition: int, rows: np.ndarray) -> None:
        """A send the broker refused: its rows go with the next one (their values as of then)."""
        log.warning("association rows of partition %d not sent (%s); sending them again", partition, error)
        with self.lock:
            self.dirty.setdefault(partition, []).append(rows)

    def flush(self, timeout_s: float = 10.0) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self.producer.close(timeout=5)
