"""The worker's writes to the online store: fresh user vectors after their events, and the
whole rows of idle users (evicted), read back when they return.

Writes run in a writer process: Feast's row conversion is pure Python, and on a thread
it took the worker loop's GIL (1,200 rows: 0.17 s alone, 0.37 s beside the loop). A
thread here only waits for that process and records freshness. While one write is in
flight, touched rows accumulate for the next, so a slow store coalesces, never queues; a
failed write keeps its users dirty until a later one lands (at-least-once).

A store can also lose rows it had (a Redis restarted empty): every few seconds the worker
checks that its partitions' population rows are still there, and if one is gone it
re-pushes every row it holds, ``max_rows`` per write, the population rows last — their
return tells serving the re-sync is done.

    >>> push = FeaturePush(Path("runs/features"), metrics)
    >>> push.touched(rows, produce_ms)             # after each micro-batch
    >>> push.push(view)                            # every push_every_s (a `recsys.nested.ServingView`)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from features.store import is_population_key, population_key
from recsys.nested.view import ServingView
from recsys.vocab import Vocab

log = logging.getLogger("recsys.stream")


class FeaturePush:
    def __init__(self, repo: Path | None, metrics, max_rows: int = 5_000):
        self.metrics = metrics
        self.max_rows = max_rows  # rows per write: a re-sync of 100k users goes in paced steps
        self.writer = None  # None: no online store, events are fresh once applied
        if repo is not None:  # forked now, before the Kafka client starts its threads
            self.writer = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                              initializer=_open_feature_repo, initargs=(str(repo),))
            self.writer.submit(_feature_repo_ready).result()  # fail fast on a bad repo
        self.waiter = ThreadPoolExecutor(1, thread_name_prefix="feast-push")
        self.job = None
        self.dirty: set[int] = set()  # rows whose vector changed since the last push
        self.dirty_partitions: set[int] = set()  # partitions whose population level changed
        self.lock = threading.Lock()  # guards the two lists a failed write refills from the waiter thread
        self.failed_users: list[str] = []  # users of failed writes: dirty again at the next push
        self.unpushed_ms: list[np.ndarray] = []  # produce timestamps of events not yet in the store
        self.fresh_s = np.zeros(0)  # recent freshness samples: produced → in the store (seconds)
        self.landed: set[int] = set()  # partitions whose population row a write has put in the store
        self.lost = False  # the check found a landed population row gone: re-push everything
        self.resyncing = False
        self.check = None  # the store check in flight (on the waiter thread)
        self.refusals = 0  # writes failed in a row: the next try waits 0.1 s × 2^n, at most 10 s
        self.retry_at = 0.0

    def touched(self, rows: torch.Tensor, partitions, produced_ms: np.ndarray) -> None:
        self.dirty.update(rows.tolist())
        self.dirty_partitions.update(partitions)
        with self.lock:
            self.unpushed_ms.append(produced_ms)

    def pending(self) -> bool:
        """Whether a push has anything to write: touched rows, or rows of a failed push."""
        return bool(self.dirty or self.dirty_partitions or self.failed_users or self.lost)

    def check_store(self, partitions) -> None:
        """Off the loop: are the population rows of these partitions, once written, still in
        the store? If not, the next push starts a re-sync."""
        keys = [population_key(p) for p in sorted(set(partitions) & self.landed)]
        if self.writer is None or not keys or self.resyncing or (self.check is not None and not self.check.done()):
            return

        def check() -> None:
            try:
                gone = self.writer.submit(_missing_rows, keys).result()
            except Exception as e:  # unreachable: failed writes re-dirty their rows meanwhile
                log.warning("online store check failed (%s: %s)", type(e).__name__, e)
                return
            if gone:
                log.warning("the online store lost rows it had (%s: restarted empty?): re-pushing every row held",
                            ", ".join(gone))
                self.lost = True

        self.check = self.waiter.submit(check)

    def push(self, view: ServingView, wait: bool = False) -> None:
        """Fresh user vectors of every row touched since the last push, and the population
        level of every partition touched, as ``view`` shows them, in one write (``wait``:
        until it landed or failed)."""
        if self.job is not None and not self.job.done():
            if not wait:
                return
            self.job.result()
        if not wait and self.refusals and time.monotonic() < self.retry_at:
            return  # a failing store is not hammered every 0.1 s
        self._redirty_failed(view.user_ids)
        if self.lost:
            self.lost, self.resyncing = False, True
            self.dirty.update(range(view.n_users))
            self.dirty_partitions.update(view.partitions)
            self.metrics.resyncs.inc()
        with self.lock:
            unpushed, self.unpushed_ms = self.unpushed_ms, []
        self.dirty_partitions &= view.partitions  # a partition revoked meanwhile is its new owner's to push
        if self.writer is not None and (self.dirty or self.dirty_partitions):
            ordered = sorted(self.dirty)
            take, rest = ordered[:self.max_rows], ordered[self.max_rows:]
            parts = [] if self.resyncing and rest else sorted(self.dirty_partitions)
            if self.resyncing and not rest:
                log.info("re-sync: the last %d rows and %d population rows on their way", len(take), len(parts))
                self.resyncing = False
            users, levels = view.users(take), [view.level(p) for p in parts]
            # A partition's row: its partial item counts (item-major speeds), as of its own clock.
            ids = users.ids + [population_key(p) for p in parts]
            vectors = [*users.vectors, *(level.counts for level in levels)]
            events = np.concatenate([users.events, [level.events for level in levels]])
            recent = users.masked + [np.zeros(0, np.int64)] * len(parts)
            last_ts = np.concatenate([users.last_ts, [level.clock for level in levels]])
            stamps = np.concatenate(unpushed) if unpushed else np.zeros(0)
            self.job = self.waiter.submit(self._write, ids, vectors, events, recent, last_ts, stamps)
            if wait:
                self.job.result()
            self.dirty = set(rest)
            self.dirty_partitions -= set(parts)
            return
        if unpushed:  # no online store: fresh when applied
            self._observe_freshness(np.concatenate(unpushed))
        self.dirty.clear()
        self.dirty_partitions.clear()

    def last_push(self, view: ServingView, attempts: int = 5) -> None:
        """At shutdown: push until the online store has every row, or give up loudly."""
        refused = 0
        while refused < attempts:
            self.push(view, wait=True)
            if not self.pending():
                return
            if self.failed_users:  # refused, not just more than one write's worth: back off
                refused += 1
                time.sleep(min(2.0 ** refused, 10.0))
        log.error("the online store refused %d users' last vectors; they are pushed with their next event",
                  len(self.failed_users))

    def settled(self, view: ServingView) -> set[int]:
        """Push and wait; the rows whose latest vector is still not in the store."""
        self.push(view, wait=True)
        self._redirty_failed(view.user_ids)
        return self.dirty

    def renumber(self, renumber: torch.Tensor) -> None:
        """Rows were dropped or moved (``UserRows.keep``): dirty rows follow."""
        dirty = renumber[sorted(self.dirty)] if self.dirty else torch.zeros(0, dtype=torch.int64)
        self.dirty = set(dirty[dirty >= 0].tolist())

    # -- idle users' whole rows ---------------------------------------------------------------
    def evict(self, ids: list[str], blobs: list[bytes]) -> bool:
        try:
            self.writer.submit(_push_evicted, ids, blobs).result()
        except Exception as e:
            self.metrics.push_failures.inc()
            log.warning("evicting %d idle users failed (%s: %s); they stay held and are tried again", len(ids),
                        type(e).__name__, e)
            return False
        return True

    def evicted(self, ids: list[str]) -> list[bytes | None]:
        return self.writer.submit(_read_evicted, ids).result()

    def close(self) -> None:
        self.waiter.shutdown(wait=True)
        if self.writer is not None:
            self.writer.shutdown(wait=True)

    # -- on the waiter thread ---------------------------------------------------------------
    def _write(self, ids, vectors, events, recent, last_ts, stamps_ms) -> None:
        t0 = time.perf_counter()
        try:
            self.writer.submit(_push_user_state, ids, vectors, events, recent, last_ts).result()
            self.metrics.push.observe(time.perf_counter() - t0)
            self.metrics.push_rows.observe(len(ids))
            self.refusals = 0
            self.landed.update(int(u.rsplit("/", 1)[1]) for u in ids if is_population_key(u))
        except Exception as e:  # the state is the truth: its rows are pushed again, the loop goes on
            self.metrics.push_failures.inc()
            log.warning("Feast push of %d rows failed (%s: %s); they stay dirty and are pushed again", len(ids),
                        type(e).__name__, e)
            with self.lock:
                self.failed_users.extend(ids)
                self.unpushed_ms.append(stamps_ms)
            self.refusals += 1
            self.retry_at = time.monotonic() + min(0.1 * 2.0 ** self.refusals, 10.0)
            return
        self._observe_freshness(stamps_ms)

    def _redirty_failed(self, users: Vocab) -> None:
        """Rows of failed pushes that this worker still holds are dirty again."""
        with self.lock:
            failed, self.failed_users = self.failed_users, []
        self.dirty_partitions.update(int(u.rsplit("/", 1)[1]) for u in failed if is_population_key(u))
        rows = users.index([u for u in failed if not is_population_key(u)], add=False)
        self.dirty.update(rows[rows >= 0].tolist())

    def _observe_freshness(self, stamps_ms: np.ndarray) -> None:
        if len(stamps_ms):
            fresh = time.time() - stamps_ms / 1000.0
            self.fresh_s = np.concatenate([self.fresh_s[-50_000:], fresh])
            self.metrics.freshness.labels("0.5").set(float(np.quantile(fresh, 0.5)))
            self.metrics.freshness.labels("0.99").set(float(np.quantile(fresh, 0.99)))


# -- in the writer process --------------------------------------------------------------------
_repo = None


def _open_feature_repo(path: str) -> None:
    global _repo
    from features.store import FeatureRepo

    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _repo = FeatureRepo(Path(path))


def _exit_with_parent(parent: int) -> None:
    """A `kill -9` of the worker must not leave its writer behind: the writer inherited
    both ends of its task pipe, so it would wait on it forever."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _feature_repo_ready() -> bool:
    return _repo is not None


def _push_user_state(ids, vectors, events, recent, last_ts) -> None:
    _repo.push_user_state(ids, vectors, events=events, recent_items=recent, last_ts=last_ts)


def _push_evicted(ids, blobs) -> None:
    _repo.push_evicted(ids, blobs)


def _read_evicted(ids) -> list:
    return _repo.evicted(ids)


def _missing_rows(keys) -> list[str]:
    return [k for k, v in zip(keys, _repo.user_state(keys)["vector"]) if v is None]
