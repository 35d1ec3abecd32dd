"""The stream worker: a Kafka consumer group member that applies fast-level updates.

    poll ─► micro-batch (size or max wait) ─► decode + validate ─► bad: dead-letter topic
         ─► ids → rows ─► model.update on the device ─► push fresh user vectors to Feast
         ─► every few seconds: checkpoint state + offsets together (effectively-once)

Effectively-once: offsets advance only with the state they are checkpointed with; on
start and on every rebalance the worker restores the rows of its partitions from the
newest checkpoint holding them and seeks there, so an event applied after the last
checkpoint and lost in a crash is read and applied again, exactly once in the state.
Dead letters and Feast pushes are at-least-once (a crash can repeat them; a failed
push keeps its users dirty until a later push lands).

Nothing a message holds stops the loop: what cannot be decoded or validated — a
timestamp beyond the clock skew included — is dead-lettered with its reason, a body too
large for the broker is truncated first, and a dead letter the broker refuses is counted
and logged with its offset. A checkpoint that cannot be written is retried with backoff
while events go on being applied; a checkpoint that cannot be read is skipped for the
one before it (streaming/checkpoint.py). A stored offset past the log's end, or a topic
whose id changed, means the topic was recreated: the partition starts from the
beginning of the new log and keeps its user rows, with a warning and a metric.

The population level is the worker's own: with several workers each sees its
partitions' share of the stream, and a taken-over partition brings its users, not
the previous owner's population counts.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kafka import ConsumerRebalanceListener, KafkaProducer, TopicPartition

from features.store import POPULATION_KEY
from recsys.nested_model import POPULATION_FIELDS, USER_FIELDS, NestedModel, load_item_ids
from recsys.vocab import Vocab
from streaming.checkpoint import (Snapshot, UserRow, decode_user_row, encode_user_row, read_own, restore,
                                  write_checkpoint)
from streaming.events import InvalidEvent, decode_fields
from streaming.consumer import make_consumer

log = logging.getLogger("recsys.stream")
MAX_KEY_BYTES = 1024  # a dead letter keeps at most this much of a poison message's key
PAST_END_GRACE_S = 2.0  # a position past the log's end this long means the topic was recreated
EVENT_IDS_KEPT = 16  # per user: a client retry within this many of the user's id'd events is applied once


@dataclass(frozen=True)
class WorkerConfig:
    model: Path  # a `recsys train` checkpoint
    checkpoint_dir: Path
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "interactions"
    group: str = "recsys"
    dead_letter_topic: str | None = None  # default: "<topic>.dead-letters"
    worker_id: str = field(default_factory=socket.gethostname)  # names this worker's checkpoint file
    batch_size: int = 256  # cut a micro-batch at this many messages ...
    max_wait_s: float = 0.05  # ... or this long after its first message
    checkpoint_every_s: float = 5.0
    feature_repo: Path | None = None  # push user vectors here (None: no push)
    push_every_s: float = 0.1  # coalesce pushes: one Feast write for many micro-batches
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    metrics_port: int | None = None  # Prometheus endpoint; None: off
    metrics_host: str = "127.0.0.1"  # loopback unless a scraper elsewhere needs it (k8s: 0.0.0.0)
    max_clock_skew_s: float = 3600.0  # an event stamped further ahead of this host's clock is dead-lettered
    dead_letter_max_bytes: int = 64 * 1024  # a poison body longer than this is dead-lettered truncated
    checkpoint_give_up_s: float = 600.0  # exit (for a restart elsewhere) after failing to checkpoint this long
    # Users idle this long (seconds of wall clock) leave memory and checkpoints for the online
    # store, and come back from it with their next event; None keeps every user held.
    user_ttl_s: float | None = None
    log_every_s: float = 10.0
    idle_exit_s: float | None = None  # exit cleanly after this long without messages (batch jobs, tests)
    # One intra-op thread on CPU: the Kafka IO thread and the Feast writer need the other
    # cores (bench/stream_throughput.py: freshness p99 2.0 s → 1.05 s at 5,000 ev/s on 2 cores).
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.user_ttl_s is not None and self.feature_repo is None:
            raise ValueError("user_ttl_s needs feature_repo: evicted users wait in the online store until they return")

    @property
    def dlq(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dead-letters"


class Metrics:
    """Prometheus metrics on a private registry (two workers in one process stay apart)."""

    def __init__(self, port: int | None, host: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("recsys_stream_events", "valid events applied to the fast state", registry=r)
        self.dead = Counter("recsys_stream_dead_letters", "messages sent to the dead-letter topic",
                            ["reason"], registry=r)
        self.batch = Histogram("recsys_stream_batch_seconds", "decode + update time per micro-batch", registry=r,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.lag = Gauge("recsys_stream_lag", "messages behind the partition's high watermark", ["partition"],
                         registry=r)
        self.freshness = Gauge("recsys_stream_freshness_seconds",
                               "event produced → user vector in the online store", ["quantile"], registry=r)
        self.users = Gauge("recsys_stream_users", "user rows held by this worker", registry=r)
        self.dead_lost = Counter("recsys_stream_dead_letters_lost", "poison the dead-letter topic refused: "
                                 "logged with its offset and skipped", ["reason"], registry=r)
        self.resets = Counter("recsys_stream_partition_resets", "partitions restarted from the log's beginning "
                              "(topic recreated or truncated)", ["partition"], registry=r)
        self.checkpoint = Histogram("recsys_stream_checkpoint_seconds", "checkpoint write time", registry=r)
        self.checkpoint_failures = Counter("recsys_stream_checkpoint_failures", "checkpoint writes that failed",
                                           registry=r)
        self.checkpoint_age = Gauge("recsys_stream_checkpoint_age_seconds",
                                    "time since the last checkpoint on disk", registry=r)
        self.evicted = Counter("recsys_stream_users_evicted", "idle users moved to the online store", registry=r)
        self.rehydrated = Counter("recsys_stream_users_rehydrated", "evicted users taken back on their return",
                                  registry=r)
        self.push_failures = Counter("recsys_stream_push_failures", "online-store writes that failed "
                                     "(their users stay dirty and are pushed again)", registry=r)
        self.push = Histogram("recsys_stream_push_seconds", "one online-store write of the touched users",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5))
        self.push_rows = Histogram("recsys_stream_push_rows", "users per online-store write", registry=r,
                                   buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000))
        if port is not None:
            start_http_server(port, addr=host, registry=r)


class StreamWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = NestedModel.load(cfg.model).to(self.device).eval()
        self.items = Vocab(load_item_ids(cfg.model))
        self.users = Vocab()
        # Per row, beside the state: its partition, the offset of its latest event (-1: not
        # tracked), the monotonic time of that event (for the idle TTL) and hashes of the
        # user's latest client event ids (0: empty).
        self.partition_of = torch.empty(0, dtype=torch.int64)
        self.through = torch.empty(0, dtype=torch.int64)
        self.touched = torch.empty(0, dtype=torch.float64)
        self.event_ids = torch.zeros(0, EVENT_IDS_KEPT, dtype=torch.int64)
        self.stream_clock = -1  # the latest accepted event's time
        self.state = self.model.init_state(0, len(self.items), device=self.device)
        self.offsets: dict[int, int] = {}  # owned partition -> next offset (all before it are in the state)
        self.pending: list = []  # records polled, not yet applied
        self.restored_own = False
        self.ckpt_path = Path(cfg.checkpoint_dir) / f"{cfg.worker_id}.safetensors"
        self.metrics = Metrics(cfg.metrics_port, cfg.metrics_host)
        # Feast writes run in their own process: converting rows to protos is pure Python,
        # and on a thread it took the main loop's GIL (1,200 rows: 0.17 s alone, 0.37 s beside
        # the loop). Forked now, before the Kafka client starts its threads; the thread
        # below only waits for it and records freshness.
        self.features = None
        if cfg.feature_repo is not None:
            self.features = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"),
                                                initializer=_open_feature_repo, initargs=(str(cfg.feature_repo),))
            self.features.submit(_feature_repo_ready).result()  # fail fast on a bad repo, fork now
        self.pusher = ThreadPoolExecutor(1, thread_name_prefix="feast-push")
        self.push_job = None
        # Checkpoint files are written (serialised, fsynced) off the loop: the loop only takes
        # the snapshot. A 6,000-user state is ~50 MB, and its write paused every event behind it.
        self.checkpointer = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.checkpoint_job = None
        self.unpushed_lock = threading.Lock()
        self.unpushed_users: list[str] = []  # users of failed pushes: dirty again at the next push
        self.dirty: set[int] = set()  # rows whose vector changed since the last push
        self.unpushed_ms: list[np.ndarray] = []  # produce timestamps of events not yet visible in Feast
        self.fresh_s = np.zeros(0)  # recent freshness samples (seconds)
        self.applied_s = np.zeros(0)  # recent produce → applied-in-state samples (seconds)
        self.stopping = False
        self.broken = False  # set when the loop dies: never checkpoint a state that may be half-updated
        self.applied = 0
        self.dead = Counter()
        self.seconds = Counter()  # where the time goes: poll (client fetch + record parsing), decode, update, ...
        self.first_apply = self.last_apply = None  # monotonic times, for sustained-throughput figures
        self.changed = False  # anything to checkpoint since the last file (an idle worker writes none)
        self.checkpointed_at = time.monotonic()  # the last file on disk (or the start)
        self.checkpoint_failures = 0  # in a row
        self.topic_id: str | None = None
        self.rotate = False  # whether the file at ckpt_path is good, to be kept as the previous one
        self.unverified: set[int] = set()  # assigned partitions whose stored offset is not yet checked
        self.past_end: dict[int, float] = {}  # partition -> since when our position is past its log's end
        self.metrics.checkpoint_age.set_function(lambda: time.monotonic() - self.checkpointed_at)

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:

        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.torch_threads)
        # A fetch the broker holds open (500 ms by default) when the partition is quiet
        # would add up to that to freshness: never hold longer than a micro-batch may wait.
        self.consumer = make_consumer(self.cfg.bootstrap_servers, group_id=self.cfg.group,
                                      max_poll_records=max(self.cfg.batch_size, 4096),
                                      fetch_max_wait_ms=max(1, int(self.cfg.max_wait_s * 1000)))
        # Dead letters only: every limit set on purpose. A request may carry the largest dead
        # letter (truncated bodies); a send blocks at most 10 s on a lost broker (then it counts
        # as lost, not as a stuck loop); acks=all, as a dead letter is the only copy we keep.
        self.producer = KafkaProducer(bootstrap_servers=self.cfg.bootstrap_servers, linger_ms=5, acks="all",
                                      max_request_size=max(1024 * 1024, 2 * self.cfg.dead_letter_max_bytes),
                                      max_block_ms=10_000, request_timeout_ms=10_000, delivery_timeout_ms=30_000)
        self.consumer.subscribe([self.cfg.topic], listener=_Rebalance(self))
        if threading.current_thread() is threading.main_thread():  # embedded (replay): the host stops it
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._stop)
        log.info("worker %s: model %s on %s, group %r, topic %r, checkpoints in %s", self.cfg.worker_id,
                 self.cfg.model, self.device, self.cfg.group, self.cfg.topic, self.cfg.checkpoint_dir)
        last_ckpt = last_log = last_push = self.last_msg = time.monotonic()
        first_pending = None
        logged_applied = 0
        try:
            while not self.stopping:
                t0 = time.monotonic()
                polled = self.consumer.poll(timeout_ms=int(self.cfg.max_wait_s * 1000),
                                            max_records=self.cfg.batch_size - len(self.pending))
                now = time.monotonic()
                self.seconds["poll"] += now - t0
                for records in polled.values():
                    self.pending.extend(records)
                if self.unverified:  # a reset drops this poll's records of its partition: they come again
                    self._verify_positions()
                if polled:
                    self.last_msg = now
                    first_pending = first_pending or now
                if self.pending and (len(self.pending) >= self.cfg.batch_size
                                     or now - first_pending >= self.cfg.max_wait_s):
                    self.apply(self.pending)
                    self.pending, first_pending = [], None
                if self.push_pending() and now - last_push >= self.cfg.push_every_s:
                    self.push()
                    last_push = now
                if now - last_ckpt >= self._checkpoint_interval():
                    self._give_up_if_stale()
                    self._check_log_ends()
                    self.evict_idle()
                    self.checkpoint()
                    last_ckpt = now
                if now - last_log >= self.cfg.log_every_s:
                    self.log_line((self.applied - logged_applied) / (now - last_log))
                    last_log, logged_applied = now, self.applied
                if self.cfg.idle_exit_s is not None and self.restored_own and now - self.last_msg >= self.cfg.idle_exit_s:
                    log.info("no messages for %.0fs: exiting", self.cfg.idle_exit_s)
                    break
            if self.pending:
                self.apply(self.pending)
                self.pending = []
            self.last_push()
            clean = self.checkpoint(wait=True)
        except BaseException:
            # A batch may have failed half-applied: the last good checkpoint stays the truth
            # (closing the consumer revokes partitions, which would otherwise checkpoint).
            self.broken = True
            raise
        finally:
            self.pusher.shutdown(wait=True)
            if self.features is not None:
                self.features.shutdown(wait=True)
            self.consumer.close(autocommit=False)  # revokes the partitions: a last checkpoint
            self.checkpointer.shutdown(wait=True)
            self.producer.close()
        # The monotonic clock is one per host: benches add up several workers' spans.
        if not clean:
            log.error("worker %s stopped WITHOUT a last checkpoint (%s): a restart re-applies events since the "
                      "last file on disk", self.cfg.worker_id, self.ckpt_path)
            return 1
        log.info("worker %s stopped cleanly: %d events applied, %d dead letters (applying from monotonic "
                 "%.3f to %.3f)", self.cfg.worker_id, self.applied, sum(self.dead.values()),
                 self.first_apply or 0, self.last_apply or 0)
        return 0

    def _stop(self, signum, frame) -> None:
        log.info("signal %d: finishing the current batch, then a last checkpoint", signum)
        self.stopping = True

    # -- one micro-batch ----------------------------------------------------------------------
    def apply(self, records) -> None:
        t0 = time.perf_counter()
        firsts: dict[int, int] = {}
        for rec in records:
            firsts.setdefault(rec.partition, rec.offset)
        for p, first in firsts.items():  # the client itself reset a position that vanished (a new log)
            if first < self.offsets.get(p, 0):
                self._reset(p, f"the log restarted at offset {first}, before our {self.offsets[p]}", seek=False)
        good, parts, offsets, stamps = [], [], [], []
        horizon = time.time() + self.cfg.max_clock_skew_s  # the stream clock moves only with accepted events
        for rec in records:
            ev = decode_fields(rec.value if rec.value is not None else b"")
            if not isinstance(ev, InvalidEvent) and ev[2] > horizon:
                ev = InvalidEvent("future_timestamp", f"ts={ev[2]} is more than {self.cfg.max_clock_skew_s:.0f}s "
                                                      f"ahead of the worker's clock ({horizon:.0f})")
            if isinstance(ev, InvalidEvent):
                self.dead_letter(rec, ev)
            else:
                good.append(ev)
                parts.append(rec.partition)
                offsets.append(rec.offset)
                stamps.append(rec.timestamp)
        t1 = time.perf_counter()
        self.seconds["decode"] += t1 - t0
        if good:
            user_ids, item_ids, ts, event_ids = zip(*good)
            parts = torch.tensor(parts, dtype=torch.int64)
            if self.cfg.user_ttl_s is not None:
                self._rehydrate(user_ids, parts)
            rows = self._rows(list(user_ids), parts)
            items = torch.from_numpy(self.items.index(list(item_ids)))
            ts = torch.tensor(ts, dtype=torch.int64)
            offsets = torch.tensor(offsets, dtype=torch.int64)
            stamps = np.asarray(stamps, dtype=np.int64)
            new = offsets > self.through[rows]  # a row back from the online store may hold some already
            if any(e is not None for e in event_ids):
                new &= ~self._retried(rows, event_ids, new)
            if not new.all():
                rows, items, ts, offsets, stamps = rows[new], items[new], ts[new], offsets[new], stamps[new.numpy()]
        if good and len(rows):
            self.through.scatter_reduce_(0, rows, offsets, "amax")
            self.touched[rows] = time.monotonic()
            self.stream_clock = max(self.stream_clock, int(ts.max()))
            self.state = self.model.update(self.state, rows.to(self.device), items.to(self.device),
                                           ts.to(self.device))
            self.dirty.update(rows.tolist())
            with self.unpushed_lock:
                self.unpushed_ms.append(stamps)
            self.applied_s = np.concatenate([self.applied_s[-50_000:], time.time() - stamps / 1000.0])
            self.metrics.events.inc(len(rows))
            self.metrics.users.set(len(self.users))
        self.applied += len(good)  # valid events handled (applied now, or already in the state), once they are
        for rec in records:  # records of a partition come in offset order
            self.past_end.pop(rec.partition, None)  # the log is alive at our position
            self.offsets[rec.partition] = rec.offset + 1
        self.changed = True
        t2 = time.perf_counter()
        self.seconds["update"] += t2 - t1
        self.metrics.batch.observe(t2 - t0)
        self.first_apply = self.first_apply or time.monotonic()
        self.last_apply = time.monotonic()

    def _retried(self, rows: torch.Tensor, event_ids, new: torch.Tensor) -> torch.Tensor:
        """Events whose id their user's row already holds: a client's retry of an event applied
        before. Each new id is remembered (the user's latest ``EVENT_IDS_KEPT``)."""
        out = torch.zeros(len(rows), dtype=torch.bool)
        for j, (row, event_id) in enumerate(zip(rows.tolist(), event_ids)):
            if event_id is None or not new[j]:
                continue
            h = _id_hash(event_id)
            if bool((self.event_ids[row] == h).any()):
                out[j] = True
            else:
                self.event_ids[row] = torch.cat([self.event_ids[row, 1:], torch.tensor([h])])
        return out

    def dead_letter(self, rec, err: InvalidEvent) -> None:
        """The message, as the broker will take it, with why it was refused and where it came
        from. Whatever happens to the send, the loop goes on."""
        body = rec.value if rec.value is not None else b""  # a record needs a key or a value
        headers = [("reason", err.reason.encode()), ("detail", str(err.detail)[:500].encode()),
                   ("source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
        if len(body) > self.cfg.dead_letter_max_bytes:
            headers.append(("truncated_from", str(len(body)).encode()))
            body = body[:self.cfg.dead_letter_max_bytes]
        key = rec.key[:MAX_KEY_BYTES] if rec.key is not None else None
        self.dead[err.reason] += 1
        self.metrics.dead.labels(err.reason).inc()
        try:
            sent = self.producer.send(self.cfg.dlq, key=key, value=body, headers=headers)
        except Exception as e:  # refused before it left (too large, broker unknown for max_block_ms)
            self._dead_letter_lost(e, rec, err.reason)
        else:
            sent.add_errback(self._dead_letter_lost, rec, err.reason)

    def _dead_letter_lost(self, error: BaseException, rec, reason: str) -> None:
        self.metrics.dead_lost.labels(reason).inc()
        log.error("dead letter for %s/%d offset %d (%s) not delivered, skipped: %s", rec.topic, rec.partition,
                  rec.offset, reason, error)

    def push(self, wait: bool = False) -> None:
        """Fresh user vectors of every row touched since the last push, in one Feast write.

        The write runs in a writer process (Feast's row conversion is pure Python and
        would hold this loop's GIL), overlapping the next batches; while one is in flight, touched
        rows keep accumulating for the next, so a slow store coalesces, never queues."""
        t0 = time.perf_counter()
        if self.push_job is not None and not self.push_job.done():
            if not wait:
                return
            self.push_job.result()
        self._redirty_failed()
        with self.unpushed_lock:
            unpushed, self.unpushed_ms = self.unpushed_ms, []
        if self.features is not None and self.dirty:
            rows = torch.tensor(sorted(self.dirty), device=self.device)
            s = self.state
            with torch.no_grad():
                z = self.model.read_users(s, rows).float().cpu().numpy()
                pop = self.model.pop_term(s.pop[:self.model.n_items]).float().cpu().numpy()
            ids = [self.users.ids[r] for r in rows.tolist()] + [POPULATION_KEY]
            events = np.append(s.cnt[rows].cpu().numpy(), int(s.seen))
            recent = [r[r >= 0] for r in s.recent[rows].cpu().numpy()] + [np.zeros(0, np.int64)]
            last_ts = np.append(s.last_ts[rows].cpu().numpy(), self.clock())  # population: the clock
            stamps = np.concatenate(unpushed) if unpushed else np.zeros(0)
            self.push_job = self.pusher.submit(self._write, ids, [*z, pop], events, recent, last_ts, stamps)
            if wait:
                self.push_job.result()
        elif unpushed:  # no online store: fresh when applied
            self._observe_freshness(np.concatenate(unpushed))
        self.dirty.clear()
        self.seconds["push"] += time.perf_counter() - t0

    def _write(self, ids, vectors, events, recent, last_ts, stamps_ms) -> None:
        t0 = time.perf_counter()
        try:
            self.features.submit(_push_user_state, ids, vectors, events, recent, last_ts).result()
            self.metrics.push.observe(time.perf_counter() - t0)
            self.metrics.push_rows.observe(len(ids))
        except Exception as e:  # the state is the truth: its rows are pushed again, the loop goes on
            self.metrics.push_failures.inc()
            log.warning("Feast push of %d rows failed (%s: %s); they stay dirty and are pushed again", len(ids),
                        type(e).__name__, e)
            with self.unpushed_lock:
                self.unpushed_users.extend(ids[:-1])  # the last row is the population, pushed every time
                self.unpushed_ms.append(stamps_ms)
            return
        self._observe_freshness(stamps_ms)

    def _redirty_failed(self) -> None:
        """Rows of failed pushes that this worker still holds are dirty again."""
        with self.unpushed_lock:
            failed, self.unpushed_users = self.unpushed_users, []
        rows = self.users.index(failed, add=False)
        self.dirty.update(rows[rows >= 0].tolist())

    def push_pending(self) -> bool:
        """Whether a push has anything to write: touched rows, or rows of a failed push."""
        return bool(self.dirty or self.unpushed_users)

    def last_push(self, attempts: int = 5) -> None:
        """At shutdown: push until the online store has every row, or give up loudly."""
        for attempt in range(attempts):
            self.push(wait=True)
            if not self.push_pending():
                return
            time.sleep(min(2.0 ** attempt, 10.0))
        log.error("the online store refused %d users' last vectors; they are pushed with their next event",
                  len(self.unpushed_users))

    def _observe_freshness(self, stamps_ms: np.ndarray) -> None:
        if len(stamps_ms):
            fresh = time.time() - stamps_ms / 1000.0
            self.fresh_s = np.concatenate([self.fresh_s[-50_000:], fresh])
            self.metrics.freshness.labels("0.5").set(float(np.quantile(fresh, 0.5)))
            self.metrics.freshness.labels("0.99").set(float(np.quantile(fresh, 0.99)))

    def clock(self) -> int:
        """The stream's clock: the latest accepted event's time (evicting a user never moves it back)."""
        held = self.state.last_ts[:len(self.users)]
        return max(self.stream_clock, int(held.max()) if len(held) else -1)

    # -- idle users: out to the online store and back ------------------------------------------
    def evict_idle(self) -> None:
        """Users idle for ``user_ttl_s`` leave memory (and the next checkpoint) once their whole
        row is in the online store; an unpushed or unwritten user stays until a later try."""
        if self.cfg.user_ttl_s is None or not len(self.users):
            return
        self.push(wait=True)  # their latest vectors first: serving reads those
        self._redirty_failed()  # a user whose vector did not land stays, dirty
        idle = time.monotonic() - self.touched > self.cfg.user_ttl_s
        if self.dirty:
            idle[sorted(self.dirty)] = False
        rows = idle.nonzero().flatten()
        if not len(rows):
            return
        ids = [self.users.ids[r] for r in rows.tolist()]
        values = {k: getattr(self.state, k)[rows.to(self.device)].cpu() for k in USER_FIELDS}
        values["event_ids"] = self.event_ids[rows]
        blobs = [encode_user_row(UserRow({k: v[j] for k, v in values.items() if k != "recent"},
                                         [self.items.ids[i] if i >= 0 else None for i in values["recent"][j].tolist()],
                                         int(self.through[r]), self.topic_id))
                 for j, r in enumerate(rows.tolist())]
        try:
            self.features.submit(_push_evicted, ids, blobs).result()
        except Exception as e:
            self.metrics.push_failures.inc()
            log.warning("evicting %d idle users failed (%s: %s); they stay held and are tried again", len(ids),
                        type(e).__name__, e)
            return
        self._keep_rows(~idle)
        self.changed = True
        self.metrics.evicted.inc(len(ids))
        self.metrics.users.set(len(self.users))

    def _rehydrate(self, user_ids, partitions: torch.Tensor) -> None:
        """Users this worker does not hold take their rows back from the online store, if an
        eviction left one there; the others start empty, as new users do."""
        known = self.users.index(user_ids, add=False)
        missing = {u: p for u, p, r in zip(user_ids, partitions.tolist(), known.tolist()) if r < 0}
        if not missing:
            return
        blobs = self.features.submit(_read_evicted, list(missing)).result()
        back = [(u, decode_user_row(b)) for u, b in zip(missing, blobs) if b is not None]
        if not back:
            return
        rows = self._rows([u for u, _ in back], torch.tensor([missing[u] for u, _ in back], dtype=torch.int64))
        recent = torch.tensor([[-1 if i is None else int(self.items.index([i])[0]) for i in row.recent]
                               for _, row in back], dtype=torch.int64)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        dev = rows.to(self.device)
        for name in USER_FIELDS:
            value = recent if name == "recent" else torch.stack([row.fields[name] for _, row in back])
            getattr(self.state, name)[dev] = value.to(self.device)
        # An offset counts in the log it was read from: a recreated topic starts over.
        self.through[rows] = torch.tensor([row.through if row.topic_id == self.topic_id else -1 for _, row in back],
                                          dtype=torch.int64)
        self.event_ids[rows] = torch.stack([row.fields["event_ids"] for _, row in back])
        self.metrics.rehydrated.inc(len(back))

    # -- checkpoints and rebalances ------------------------------------------------------------
    def checkpoint(self, wait: bool = False) -> bool:
        """State + offsets in one atomic file; dead letters are flushed first, so a message
        is never past a checkpointed offset without being in the state or the DLQ (or
        counted as lost). Returns whether the state is on disk (``wait``) or on its way.

        The snapshot is copied here, consistent with the offsets; the file is written by a
        background thread (one write at a time; ``wait`` returns once it is on disk). An idle
        worker writes nothing: only a changed state makes a new file."""
        if not self.offsets or self.broken:
            return True
        if self.checkpoint_job is not None:
            self.checkpoint_job.result()  # the previous write is done (a failure marked the state changed)
        if not self.changed:
            return True
        t0 = time.perf_counter()
        try:
            self.producer.flush(timeout=30)
        except Exception as e:  # the broker is away: try again at the next interval
            log.warning("checkpoint postponed: dead letters not flushed (%s)", e)
            return False
        self.changed = False
        n = len(self.users)  # rows past n are spare capacity (amortised growth)
        snap = Snapshot(
            topic=self.cfg.topic, offsets=dict(self.offsets), user_ids=list(self.users.ids),
            partitions=self.partition_of.clone(), users={k: _cpu_copy(getattr(self.state, k)[:n]) for k in USER_FIELDS},
            population={k: _cpu_copy(getattr(self.state, k)) for k in POPULATION_FIELDS}, item_ids=list(self.items.ids),
            topic_id=self.topic_id, ends=self._highwaters(), event_ids=self.event_ids.clone())
        self.checkpoint_job = self.checkpointer.submit(self._write_checkpoint, snap, t0)
        ok = self.checkpoint_job.result() if wait else True
        self.seconds["checkpoint"] += time.perf_counter() - t0
        return ok

    def _write_checkpoint(self, snap: Snapshot, t0: float) -> bool:
        try:
            write_checkpoint(self.ckpt_path, snap, keep_previous=self.rotate)
        except Exception as e:  # disk full, read-only, gone: the loop goes on and the next interval retries
            self.changed = True
            self.checkpoint_failures += 1
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint %s failed (%s: %s), %d in a row, the last one on disk %.0fs ago; retrying in "
                      "%.0fs", self.ckpt_path, type(e).__name__, e, self.checkpoint_failures,
                      time.monotonic() - self.checkpointed_at, self._checkpoint_interval())
            return False
        self.checkpoint_failures = 0
        self.checkpointed_at = time.monotonic()
        self.rotate = True
        self.metrics.checkpoint.observe(time.perf_counter() - t0)
        return True

    def _checkpoint_interval(self) -> float:
        """The configured interval, doubled per failure in a row (at most a minute)."""
        return min(self.cfg.checkpoint_every_s * 2 ** self.checkpoint_failures, max(self.cfg.checkpoint_every_s, 60.0))

    def _give_up_if_stale(self) -> None:
        """Exit (for a supervisor to restart us elsewhere) when no checkpoint has landed for
        ``checkpoint_give_up_s`` while writes keep failing."""
        stale = time.monotonic() - self.checkpointed_at
        if self.checkpoint_failures and stale > self.cfg.checkpoint_give_up_s:
            raise RuntimeError(f"no checkpoint written to {self.ckpt_path} for {stale:.0f}s "
                               f"(checkpoint_give_up_s={self.cfg.checkpoint_give_up_s:.0f}); exiting for a restart")

    def on_revoked(self, partitions: set[int]) -> None:
        self.pending = []  # not applied: the next owner reads them again from the checkpoint
        self.push(wait=True)  # the next owner does not know which of these users are unpushed
        on_disk = self.checkpoint(wait=True)  # before the partitions change hands
        self._keep_rows(~torch.isin(self.partition_of, torch.tensor(sorted(partitions), dtype=torch.int64)))
        for p in partitions:
            self.offsets.pop(p, None)
        log.info("revoked partitions %s (%s)", sorted(partitions),
                 "checkpointed" if on_disk else "NOT checkpointed: the next owner re-applies from the last file")

    def on_assigned(self, partitions: set[int]) -> None:
        self.pending = []
        self.last_msg = time.monotonic()  # idle time counts from joining, not from start
        if not self.restored_own:
            own = read_own(self.ckpt_path)
            if own is not None:
                self._adopt_population(own[1])
            # A damaged newest file is overwritten, not kept as the previous one: that stays good.
            self.rotate = own is not None and own[0] == self.ckpt_path
            self.restored_own = True
        new = sorted(set(partitions) - set(self.offsets))
        self.topic_id = _topic_id(self.consumer, self.cfg.topic)
        restored = restore(self.ckpt_path.parent, self.cfg.topic, new, self.topic_id)
        for _, snap, mine in restored.snapshots:
            self._import_rows(snap, mine)
            for p in mine:
                self.offsets[p] = snap.offsets[p]
                if snap.topic_id and self.topic_id and snap.topic_id != self.topic_id:
                    self._reset(p, f"the topic was recreated (id {snap.topic_id} -> {self.topic_id})")
        for p in partitions:
            tp = TopicPartition(self.cfg.topic, p)
            if p in self.offsets:
                self.consumer.seek(tp, self.offsets[p])
            else:
                self.consumer.seek_to_beginning(tp)  # never checkpointed: the whole partition
        self.unverified |= set(partitions)  # against the log's end once poll() returns: no requests in here
        self.changed = True
        log.info("assigned partitions %s; restored %s from %s", sorted(partitions),
                 sorted(p for *_, mine in restored.snapshots for p in mine),
                 sorted(path.name for path, *_ in restored.snapshots))
        self.metrics.users.set(len(self.users))

    def _verify_positions(self) -> None:
        tps = [TopicPartition(self.cfg.topic, p) for p in sorted(self.unverified)]
        self.unverified = set()
        ends = self.consumer.end_offsets(tps)
        self._check_log_ends({tp.partition: end for tp, end in ends.items()})

    def _check_log_ends(self, ends: dict[int, int] | None = None) -> None:
        """A position past its partition's end means the log was recreated or truncated
        under us: say so and start that partition again, never skip silently.

        Only a lasting one counts: a broker may report an end a moment behind what it has
        just served (Tansu does, under load), so the position must stay past the end, with
        no record arriving, for ``PAST_END_GRACE_S``."""
        ends = self._highwaters() if ends is None else ends
        now = time.monotonic()
        for p, end in ends.items():
            if p not in self.offsets or self.offsets[p] <= end:
                self.past_end.pop(p, None)
            elif now - self.past_end.setdefault(p, now) >= PAST_END_GRACE_S:
                self._reset(p, f"our next offset {self.offsets[p]:,} has been past the log's end {end:,} "
                               f"for {now - self.past_end.pop(p):.0f}s")

    def _reset(self, partition: int, why: str, seek: bool = True) -> None:
        """The documented policy for a recreated topic: alert, keep the user rows, and apply
        the partition's new log from its beginning (``seek``: unless the client is there already)."""
        log.warning("partition %d: %s; the topic was recreated or truncated: applying it from the beginning of "
                    "its log, keeping its users' state", partition, why)
        self.metrics.resets.labels(str(partition)).inc()
        self.offsets[partition] = 0
        self.through[self.partition_of == partition] = -1  # offsets in the old log mean nothing in the new
        if seek:
            self.pending = [r for r in self.pending if r.partition != partition]
            self.consumer.seek_to_beginning(TopicPartition(self.cfg.topic, partition))
        self.changed = True

    def _rows(self, user_ids: list[str], partitions: torch.Tensor) -> torch.Tensor:
        """State rows of ``user_ids`` (new users get new rows), remembering each one's partition."""
        rows = torch.from_numpy(self.users.index(user_ids))
        grown = len(self.users) - len(self.partition_of)
        if grown:
            self.partition_of = torch.cat([self.partition_of, torch.full((grown,), -1, dtype=torch.int64)])
            self.through = torch.cat([self.through, torch.full((grown,), -1, dtype=torch.int64)])
            self.touched = torch.cat([self.touched, torch.full((grown,), time.monotonic(), dtype=torch.float64)])
            self.event_ids = torch.cat([self.event_ids, torch.zeros(grown, EVENT_IDS_KEPT, dtype=torch.int64)])
        self.partition_of[rows] = partitions
        return rows

    def _adopt_population(self, snap: Snapshot) -> None:
        """On first start, the population level (and the online item ids) from our own file."""
        self.items = Vocab(snap.item_ids)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        for name, value in snap.population.items():
            setattr(self.state, name, value.to(self.device))

    def _import_rows(self, snap: Snapshot, partitions: list[int]) -> None:
        take = torch.isin(snap.partitions, torch.tensor(partitions, dtype=torch.int64)).nonzero().flatten()
        rows = self._rows([snap.user_ids[i] for i in take.tolist()], snap.partitions[take])
        users = dict(snap.users)
        if "recent" in users:  # item indices past the model's table are each worker's own naming
            remap = torch.from_numpy(self.items.index(snap.item_ids))
            users["recent"] = torch.where(users["recent"] >= 0, remap[users["recent"].clamp(min=0)], -1)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        for name, value in users.items():
            getattr(self.state, name)[rows.to(self.device)] = value[take].to(self.device)
        if snap.event_ids is not None:
            self.event_ids[rows] = snap.event_ids[take]

    def _keep_rows(self, keep: torch.Tensor) -> None:
        rows = keep.nonzero().flatten()
        self.state = self.state.with_user_rows(self.state.user_rows(rows.to(self.device)))
        self.users = Vocab([self.users.ids[r] for r in rows.tolist()])
        self.partition_of, self.through, self.touched = self.partition_of[rows], self.through[rows], self.touched[rows]
        self.event_ids = self.event_ids[rows]
        renumber = torch.full((len(keep),), -1, dtype=torch.int64)
        renumber[rows] = torch.arange(len(rows))
        dirty = renumber[sorted(self.dirty)] if self.dirty else torch.zeros(0, dtype=torch.int64)
        self.dirty = set(dirty[dirty >= 0].tolist())

    # -- observability -------------------------------------------------------------------------
    def _highwaters(self) -> dict[int, int]:
        """Each owned partition's log end as of the latest fetch (no request)."""
        tps = {p: TopicPartition(self.cfg.topic, p) for p in self.offsets}
        return {p: high for p, tp in tps.items() if (high := self.consumer.highwater(tp)) is not None}

    def lag(self) -> dict[int, int]:
        """Messages behind each partition's end (a position past the end is a reset, not 0)."""
        ends = self._highwaters()
        self._check_log_ends(ends)
        out = {p: high - self.offsets[p] for p, high in ends.items()}
        for p, n in out.items():
            self.metrics.lag.labels(str(p)).set(n)
        self.metrics.users.set(len(self.users))
        return out

    def log_line(self, rate: float) -> None:
        lag = self.lag()
        fresh = self.fresh_s[-10_000:]
        fq = (f"{np.quantile(fresh, 0.5) * 1e3:.0f}/{np.quantile(fresh, 0.99) * 1e3:.0f} ms"
              if len(fresh) else "n/a")
        log.info("%s ev/s | applied %s | dead letters %s | lag %s | users %s | freshness p50/p99 %s",
                 f"{rate:,.0f}", f"{self.applied:,}", f"{sum(self.dead.values()):,}",
                 f"{sum(lag.values()):,}" if lag else "n/a", f"{len(self.users):,}", fq)


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python calls these inside poll(); no commits here (they deadlock: RECIPES.md)."""

    def __init__(self, worker: StreamWorker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.on_revoked({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned):
        self.worker.on_assigned({tp.partition for tp in assigned})


def _id_hash(event_id: str) -> int:
    """A stable 63-bit hash of a client's event id (Python's own hash is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little") >> 1 or 1


def _topic_id(consumer, topic: str) -> str | None:
    """The broker's id of ``topic`` (a recreated topic gets a new one), None if it names none.
    kafka-python keeps it in its cluster metadata, with no public accessor yet."""
    try:
        topic_id = consumer._client.cluster.topic_id(topic)
    except Exception:
        return None
    return str(topic_id) if topic_id else None


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A snapshot's own copy: the loop goes on updating the state while the file is written."""
    return t.detach().to("cpu", copy=True)


_repo = None  # the Feast repo of the writer process


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


def run_worker(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [stream] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    return StreamWorker(cfg).run()
