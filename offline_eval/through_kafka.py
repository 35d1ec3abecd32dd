"""`recsys replay --through-kafka`: the nested models' stream takes the production path.

Each revealed batch is produced to a Kafka topic and applied by the real stream worker
(`streaming/worker.py`, in a thread of this process); the next batch is scored from the
worker's own state. Only the transport differs from the in-process replay, so the
metrics must come out the same — the check that the worker applies what the replay
measured.

The worker starts from the fitted model's state after the history, written as the
worker's own checkpoint (so its restore path runs too), and reads a one-partition topic:
the population level's chunks are global event positions, so the worker must see the
events in log order.

    >>> with WorkerPath(fitted_nested, log, "127.0.0.1:9092", workdir) as model:
    ...     replay_model(model, log, cfg, fitted=True)
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl
import torch

from offline_eval.protocol import EncodedLog
from offline_eval.nested import NestedReplay
from streaming.checkpoint import Snapshot, write_checkpoint
from streaming.clients import create_topic, make_producer
from streaming.producer import encode_frame
from streaming.worker import StreamWorker, WorkerConfig

WORKER_MODELS = ("nested", "nested_slow_only")  # the models a stream worker applies


class WorkerPath:
    """A fitted `NestedReplay` whose updates go through Kafka and the stream worker."""

    def __init__(self, fitted: NestedReplay, log: EncodedLog, bootstrap_servers: str, workdir: Path,
                 timeout_s: float = 60.0):
        self.fitted, self.log, self.timeout_s = fitted, log, timeout_s
        self.bootstrap_servers, self.workdir = bootstrap_servers, Path(workdir)
        self.topic = f"replay-{uuid.uuid4().hex[:10]}"
        self.sent = 0
        self.error: BaseException | None = None  # what stopped the worker thread, if anything

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> WorkerPath:
        model_path = self._write_start()
        create_topic(self.bootstrap_servers, self.topic)
        self.worker = StreamWorker(WorkerConfig(
            model=model_path, checkpoint_dir=self.workdir / "checkpoints", bootstrap_servers=self.bootstrap_servers,
            topic=self.topic, group=self.topic, worker_id="replay", batch_size=4096, max_wait_s=0.005,
            device="cpu", log_every_s=3600.0))  # the in-process replay's device: same arithmetic
        self.thread = threading.Thread(target=self._run_worker, name="stream-worker", daemon=True)
        self.thread.start()
        self.producer = make_producer(self.bootstrap_servers, linger_ms=1)
        self._wait(lambda: self.worker.owns(0), "join its group and restore the history state")
        return self

    def __exit__(self, *exc) -> None:
        self.producer.close()
        self.worker.stop()
        self.thread.join(timeout=30)

    def _run_worker(self) -> None:
        try:
            self.worker.run()
        except BaseException as e:  # surfaced to the replay by _wait
            self.error = e
            raise

    def _write_start(self) -> Path:
        """The trained model (with item ids) and a worker checkpoint holding the fast state
        after the history, every user on partition 0 at offset 0."""
        model, state = self.fitted.model, self.fitted.state
        self.workdir.mkdir(parents=True, exist_ok=True)
        model_path = self.workdir / "model.safetensors"
        item_ids = [str(i) for i in self.log.item_ids[:model.cfg.n_items]]
        model.save(model_path, item_ids=item_ids)
        n_users = self.log.history().n_users_known
        write_checkpoint(self.workdir / "checkpoints" / "replay.safetensors", Snapshot(
            topic=self.topic, offsets={0: 0}, user_ids=[str(u) for u in self.log.user_ids[:n_users]],
            partitions=torch.zeros(n_users, dtype=torch.int64),
            users={k: v.clone() for k, v in state.user_rows(slice(0, n_users)).items()},
            population={0: {k: v.clone() for k, v in state.population().items()}}, item_ids=item_ids))
        return model_path

    def _wait(self, done, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if not self.thread.is_alive():
                raise RuntimeError(f"the stream worker stopped before it could {what}") from self.error
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stream worker did not {what} within {self.timeout_s:.0f}s "
                                   f"(broker {self.bootstrap_servers}, topic {self.topic})")
            time.sleep(0.001)

    # -- the replay interface -----------------------------------------------------------------
    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        w = self.worker.held()
        rows = w.users.index(self.log.user_ids[users.numpy()], add=False)
        blank = len(w.users)  # users the worker has not seen yet score from an empty row
        rows = torch.from_numpy(np.where(rows >= 0, rows, blank))
        state = w.model.grow_state(w.state, blank + 1, len(w.items))  # no copy where it has room
        votes = w.model.votes(w.levels, state.latest_items(rows), len(w.items))
        scores = w.model.score_users(w.model.read_users(state, rows), state.absent_s(rows), w.population, len(w.items),
                                     votes)
        return scores[:, torch.from_numpy(self._columns(n_items))]

    def _columns(self, n_items: int) -> np.ndarray:
        """The worker's index of each of the replay's first ``n_items`` items."""
        cols = self.worker.held().items.index(self.log.item_ids[:n_items], add=False)
        if (cols < 0).any():
            raise RuntimeError("the stream worker is missing items the replay has revealed")
        return cols

    def score_fresh(self, batch: EncodedLog, n_items: int) -> torch.Tensor:
        """Each event from its user's state after their earlier events of the batch, run ahead
        on a copy of the worker's rows for these users (the worker's state is untouched: it
        applies the batch from Kafka)."""
        w = self.worker.held()
        local_users, local = np.unique(batch.users, return_inverse=True)
        rows = w.users.index(self.log.user_ids[local_users], add=False)
        blank = len(w.users)  # users the worker has not seen yet start from an empty row
        state = w.model.grow_state(w.state, blank + 1, len(w.items))
        ahead = state.take(torch.from_numpy(np.where(rows >= 0, rows, blank)))
        item_cols = w.items.index(self.log.item_ids[batch.items], add=False)
        # An item new to this batch is new to the model's table too: any index past it reads as cold.
        item_cols = np.where(item_cols >= 0, item_cols, len(w.items))
        users, items = torch.from_numpy(local.astype(np.int64)), torch.from_numpy(item_cols.astype(np.int64))
        before = w.model.before_each(ahead, users, items)  # the rows' latest items, before the update writes them
        votes = None if before is None else w.model.votes(w.levels, before, len(w.items))
        _, reads = w.model.update_reading(ahead, users, items, torch.from_numpy(batch.ts),
                                          donate=True)  # a copy of the rows: `take`
        scores = w.model.score_users(reads.z, state.clock() - reads.last_ts, w.population, len(w.items), votes)
        return scores[:, torch.from_numpy(self._columns(n_items))]

    def update(self, batch: EncodedLog) -> None:
        frame = pl.DataFrame({"user_id": self.log.user_ids[batch.users], "item_id": self.log.item_ids[batch.items],
                              "ts": batch.ts})
        for key, value in encode_frame(frame).iter_rows():
            self.producer.send(self.topic, key=key.encode(), value=value.encode())
        self.producer.flush()
        self.sent += batch.n_events
        # The next batch is scored only once the worker has applied this one (no peeking, no lag).
        self._wait(lambda: self.worker.handled >= self.sent,
                   f"apply {self.sent:,} events")

