"""The stream worker: a Kafka consumer group member that applies fast-level updates.

    poll ─► micro-batch (size or max wait) ─► decode + validate ─► bad: dead-letter topic
         ─► ids → rows ─► model.update on the device ─► push fresh user vectors to Feast
         ─► every few seconds: checkpoint state + offsets together (effectively-once)

Effectively-once: offsets advance only with the state they are checkpointed with; on
start and on every rebalance the worker restores the rows of its partitions from the
newest checkpoint holding them and seeks there, so an event applied after the last
checkpoint and lost in a crash is read and applied again, exactly once in the state.
Dead letters and Feast pushes are at-least-once (a crash can repeat them).

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
from streaming.checkpoint import Snapshot, latest_for_partitions, read_checkpoint, write_checkpoint
from streaming.events import InvalidEvent, decode_fields

log = logging.getLogger("recsys.stream")


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
    log_every_s: float = 10.0
    idle_exit_s: float | None = None  # exit cleanly after this long without messages (batch jobs, tests)
    # One intra-op thread on CPU: the Kafka IO thread and the Feast writer need the other
    # cores (bench/stream_throughput.py: freshness p99 2.0 s → 1.05 s at 5,000 ev/s on 2 cores).
    torch_threads: int = 1

    @property
    def dlq(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dead-letters"


class Metrics:
    """Prometheus metrics on a private registry (two workers in one process stay apart)."""

    def __init__(self, port: int | None):
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
        self.checkpoint = Histogram("recsys_stream_checkpoint_seconds", "checkpoint write time", registry=r)
        self.push = Histogram("recsys_stream_push_seconds", "one online-store write of the touched users",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5))
        self.push_rows = Histogram("recsys_stream_push_rows", "users per online-store write", registry=r,
                                   buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000))
        if port is not None:
            start_http_server(port, addr="0.0.0.0", registry=r)


class StreamWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = NestedModel.load(cfg.model).to(self.device).eval()
        self.items = Vocab(load_item_ids(cfg.model))
        self.users = Vocab()
        self.partition_of = torch.empty(0, dtype=torch.int64)  # row -> partition
        self.state = self.model.init_state(0, len(self.items), device=self.device)
        self.offsets: dict[int, int] = {}  # owned partition -> next offset (all before it are in the state)
        self.pending: list = []  # records polled, not yet applied
        self.restored_own = False
        self.ckpt_path = Path(cfg.checkpoint_dir) / f"{cfg.worker_id}.safetensors"
        self.metrics = Metrics(cfg.metrics_port)
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
        self.push_failures = 0
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

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        from streaming.consumer import make_consumer

        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.torch_threads)
        # A fetch the broker holds open (500 ms by default) when the partition is quiet
        # would add up to that to freshness: never hold longer than a micro-batch may wait.
        self.consumer = make_consumer(self.cfg.bootstrap_servers, group_id=self.cfg.group,
                                      max_poll_records=max(self.cfg.batch_size, 4096),
                                      fetch_max_wait_ms=max(1, int(self.cfg.max_wait_s * 1000)))
        self.producer = KafkaProducer(bootstrap_servers=self.cfg.bootstrap_servers, linger_ms=5, acks="all")
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
                if polled:
                    self.last_msg = now
                    first_pending = first_pending or now
                if self.pending and (len(self.pending) >= self.cfg.batch_size
                                     or now - first_pending >= self.cfg.max_wait_s):
                    self.apply(self.pending)
                    self.pending, first_pending = [], None
                if self.dirty and now - last_push >= self.cfg.push_every_s:
                    self.push()
                    last_push = now
                if now - last_ckpt >= self.cfg.checkpoint_every_s:
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
            self.push(wait=True)
            self.checkpoint(wait=True)
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
        good, parts, stamps = [], [], []
        for rec in records:
            ev = decode_fields(rec.value if rec.value is not None else b"")
            if isinstance(ev, InvalidEvent):
                self.dead_letter(rec, ev)
            else:
                good.append(ev)
                parts.append(rec.partition)
                stamps.append(rec.timestamp)
        t1 = time.perf_counter()
        self.seconds["decode"] += t1 - t0
        if good:
            user_ids, item_ids, ts = zip(*good)
            rows = self._rows(list(user_ids), torch.tensor(parts, dtype=torch.int64))
            items = torch.from_numpy(self.items.index(list(item_ids)))
            ts = torch.tensor(ts, dtype=torch.int64)
            self.state = self.model.update(self.state, rows.to(self.device), items.to(self.device),
                                           ts.to(self.device))
            self.dirty.update(rows.tolist())
            stamps = np.asarray(stamps, dtype=np.int64)
            self.unpushed_ms.append(stamps)
            self.applied_s = np.concatenate([self.applied_s[-50_000:], time.time() - stamps / 1000.0])
            self.applied += len(good)
            self.metrics.events.inc(len(good))
        for rec in records:  # records of a partition come in offset order
            self.offsets[rec.partition] = rec.offset + 1
        t2 = time.perf_counter()
        self.seconds["update"] += t2 - t1
        self.metrics.batch.observe(t2 - t0)
        self.first_apply = self.first_apply or time.monotonic()
        self.last_apply = time.monotonic()

    def dead_letter(self, rec, err: InvalidEvent) -> None:
        headers = [("reason", err.reason.encode()), ("detail", str(err.detail)[:500].encode()),
                   ("source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
        self.producer.send(self.cfg.dlq, key=rec.key, value=rec.value, headers=headers)
        self.dead[err.reason] += 1
        self.metrics.dead.labels(err.reason).inc()

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
        if self.features is not None and self.dirty:
            rows = torch.tensor(sorted(self.dirty), device=self.device)
            s = self.state
            with torch.no_grad():
                z = self.model.read_users(s, rows).float().cpu().numpy()
                pop = self.model.pop_term(s.pop[:self.model.n_items]).float().cpu().numpy()
            ids = [self.users.ids[r] for r in rows.tolist()] + [POPULATION_KEY]
            events = np.append(s.cnt[rows].cpu().numpy(), int(s.seen))
            recent = [r[r >= 0] for r in s.recent[rows].cpu().numpy()] + [np.zeros(0, np.int64)]
            last_ts = np.append(s.last_ts[rows].cpu().numpy(), int(s.clock()))  # population: the clock
            stamps = np.concatenate(self.unpushed_ms) if self.unpushed_ms else np.zeros(0)
            self.push_job = self.pusher.submit(self._write, ids, [*z, pop], events, recent, last_ts, stamps)
            if wait:
                self.push_job.result()
        elif self.unpushed_ms:  # no online store: fresh when applied
            self._observe_freshness(np.concatenate(self.unpushed_ms))
        self.dirty.clear()
        self.unpushed_ms = []
        self.seconds["push"] += time.perf_counter() - t0

    def _write(self, ids, vectors, events, recent, last_ts, stamps_ms) -> None:
        t0 = time.perf_counter()
        try:
            self.features.submit(_push_user_state, ids, vectors, events, recent, last_ts).result()
            self.metrics.push.observe(time.perf_counter() - t0)
            self.metrics.push_rows.observe(len(ids))
        except Exception as e:  # the state (and its checkpoint) is the truth: a failed push is logged, not fatal
            self.push_failures += 1
            log.warning("Feast push of %d rows failed (%s); they are pushed again with their next event", len(ids), e)
            return
        self._observe_freshness(stamps_ms)

    def _observe_freshness(self, stamps_ms: np.ndarray) -> None:
        if len(stamps_ms):
            fresh = time.time() - stamps_ms / 1000.0
            self.fresh_s = np.concatenate([self.fresh_s[-50_000:], fresh])
            self.metrics.freshness.labels("0.5").set(float(np.quantile(fresh, 0.5)))
            self.metrics.freshness.labels("0.99").set(float(np.quantile(fresh, 0.99)))

    # -- checkpoints and rebalances ------------------------------------------------------------
    def checkpoint(self, wait: bool = False) -> None:
        """State + offsets in one atomic file; dead letters are flushed first, so a message
        is never past a checkpointed offset without being in the state or the DLQ.

        The snapshot is copied here, consistent with the offsets; the file is written by a
        background thread (one write at a time; ``wait`` returns once it is on disk)."""
        if not self.offsets or self.broken:
            return
        t0 = time.perf_counter()
        self.producer.flush()
        if self.checkpoint_job is not None:
            self.checkpoint_job.result()  # the previous write is done (and its error, if any, raised)
        n = len(self.users)  # rows past n are spare capacity (amortised growth)
        snap = Snapshot(
            topic=self.cfg.topic, offsets=dict(self.offsets), user_ids=list(self.users.ids),
            partitions=self.partition_of.clone(), users={k: _cpu_copy(getattr(self.state, k)[:n]) for k in USER_FIELDS},
            population={k: _cpu_copy(getattr(self.state, k)) for k in POPULATION_FIELDS}, item_ids=list(self.items.ids))
        self.checkpoint_job = self.checkpointer.submit(self._write_checkpoint, snap, t0)
        if wait:
            self.checkpoint_job.result()
        self.seconds["checkpoint"] += time.perf_counter() - t0

    def _write_checkpoint(self, snap: Snapshot, t0: float) -> None:
        write_checkpoint(self.ckpt_path, snap)
        self.metrics.checkpoint.observe(time.perf_counter() - t0)

    def on_revoked(self, partitions: set[int]) -> None:
        self.pending = []  # not applied: the next owner reads them again from the checkpoint
        self.checkpoint(wait=True)  # on disk before the partitions change hands
        self._keep_rows(~torch.isin(self.partition_of, torch.tensor(sorted(partitions), dtype=torch.int64)))
        for p in partitions:
            self.offsets.pop(p, None)
        log.info("revoked partitions %s (checkpointed)", sorted(partitions))

    def on_assigned(self, partitions: set[int]) -> None:
        self.pending = []
        self.last_msg = time.monotonic()  # idle time counts from joining, not from start
        if not self.restored_own and self.ckpt_path.exists():
            self._adopt_population(read_checkpoint(self.ckpt_path))
        self.restored_own = True
        new = sorted(set(partitions) - set(self.offsets))
        sources = latest_for_partitions(self.ckpt_path.parent, self.cfg.topic, new)
        for path in set(sources.values()):
            snap = read_checkpoint(path)
            mine = [p for p, src in sources.items() if src == path]
            self._import_rows(snap, mine)
            for p in mine:
                self.offsets[p] = snap.offsets[p]
        for p in partitions:
            tp = TopicPartition(self.cfg.topic, p)
            if p in self.offsets:
                self.consumer.seek(tp, self.offsets[p])
            else:
                self.consumer.seek_to_beginning(tp)  # never checkpointed: the whole partition
        log.info("assigned partitions %s; restored %s from %s", sorted(partitions), sorted(sources),
                 sorted({p.name for p in sources.values()}))
        self.metrics.users.set(len(self.users))

    def _rows(self, user_ids: list[str], partitions: torch.Tensor) -> torch.Tensor:
        """State rows of ``user_ids`` (new users get new rows), remembering each one's partition."""
        rows = torch.from_numpy(self.users.index(user_ids))
        grown = len(self.users) - len(self.partition_of)
        self.partition_of = torch.cat([self.partition_of, torch.full((grown,), -1, dtype=torch.int64)])
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

    def _keep_rows(self, keep: torch.Tensor) -> None:
        rows = keep.nonzero().flatten()
        self.state = self.state.with_user_rows(self.state.user_rows(rows.to(self.device)))
        self.users = Vocab([self.users.ids[r] for r in rows.tolist()])
        self.partition_of = self.partition_of[rows]
        self.dirty = set()

    # -- observability -------------------------------------------------------------------------
    def lag(self) -> dict[int, int]:
        out = {}
        for p, off in self.offsets.items():
            high = self.consumer.highwater(TopicPartition(self.cfg.topic, p))
            if high is not None:
                out[p] = max(0, high - off)
                self.metrics.lag.labels(str(p)).set(out[p])
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


def run_worker(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [stream] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    return StreamWorker(cfg).run()
