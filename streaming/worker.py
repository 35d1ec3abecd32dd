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

The population levels (item counts, and the association level: what follows what) are kept
per partition: each partition's partial levels are applied, checkpointed and handed over
with the partition's users and offsets (so they too hold each event exactly once), and
pushed under its own key; serving sums them. With a
time-decayed level (the model's ``pop_half_life_s``) the sum equals the level of the
whole stream, however partitions are spread over workers.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from recsys.feedback import is_plain
from recsys.nested import FastState, NestedModel, ServingView, load_item_ids, sum_levels
from recsys.vocab import Vocab
from streaming.association_log import AssociationLog
from streaming.catalogue import Catalogue
from streaming.checkpoint import CheckpointWriter, check_rows_fit, model_identity
from streaming.clients import ensure_topic, make_consumer
from streaming.dead_letters import DeadLetters
from streaming.events import InvalidEvent, decode_fields
from streaming.metrics import Metrics
from streaming.ownership import Ownership, Rebalance
from streaming.push import FeaturePush
from streaming.user_rows import UserRows

log = logging.getLogger("recsys.stream")


@dataclass(frozen=True)
class WorkerConfig:
    model: Path  # a `recsys train` model file
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
    # The association level's changed rows go to its changelog topic this often (streaming/association_log.py).
    association_every_s: float = 0.25
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    metrics_port: int | None = None  # Prometheus endpoint; None: off
    metrics_host: str = "127.0.0.1"  # loopback unless a scraper elsewhere needs it (k8s: 0.0.0.0)
    max_clock_skew_s: float = 3600.0  # an event stamped further ahead of this host's clock is dead-lettered
    # ... or further than this past its partition's clock (plus the wall time since that moved).
    # The shared logs' longest gap inside one of 4 partitions is 4.7 days (ML-1M's stream).
    max_clock_jump_s: float = 30 * 86400.0
    dead_letter_max_bytes: int = 64 * 1024  # a poison body longer than this is dead-lettered truncated
    checkpoint_give_up_s: float = 600.0  # exit (for a restart elsewhere) after failing to checkpoint this long
    # Users idle this long (seconds of wall clock) leave memory and checkpoints for the online
    # store, and come back from it with their next event; None keeps every user held.
    user_ttl_s: float | None = None
    # With an online store, at most this many users are held: past it, the least recently
    # active leave for the store (and come back the same way). ~25 KB each at the default
    # model size (12 KB of state rows, 2.6 KB of them what the user turned down): 100k new
    # users once grew a worker to 2.2 GB, before the rows held negative feedback. None: no bound.
    max_users: int | None = 200_000
    log_every_s: float = 10.0
    idle_exit_s: float | None = None  # exit cleanly after this long without messages (batch jobs, tests)
    # One intra-op thread on CPU: the Kafka IO thread and the Feast writer need the other
    # cores (bench/stream_throughput.py: freshness p99 2.0 s → 1.05 s at 5,000 ev/s on 2 cores).
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if self.user_ttl_s is not None and self.feature_repo is None:
            raise ValueError("user_ttl_s needs feature_repo: evicted users wait in the online store until they return")

    @property
    def evicts(self) -> bool:
        """Whether users leave memory for the online store (and so may come back from it)."""
        return self.feature_repo is not None and (self.user_ttl_s is not None or self.max_users is not None)

    @property
    def dlq(self) -> str:
        return self.dead_letter_topic or f"{self.topic}.dead-letters"


@dataclass(frozen=True)
class Held:
    """What the worker holds now, for scoring beside it (the in-process replay)."""

    model: NestedModel
    state: FastState
    users: Vocab  # row -> user id
    items: Vocab  # index -> item id (the model's table, then items first seen online)
    population: torch.Tensor  # (N,) the worker's partitions' population levels, summed
    levels: list[FastState]  # the worker's partitions' levels (the association level's partials: `NestedModel.votes`)


@dataclass(frozen=True)
class WorkerStats:
    applied: int  # valid events handled (applied, or already in the state)
    dead_letters: int
    seconds: dict[str, float]  # where the loop's time went: poll, decode, update, push, checkpoint
    first_apply: float | None  # monotonic times, for sustained-throughput figures
    last_apply: float | None
    freshness_s: np.ndarray  # recent samples: produced → in the online store
    applied_s: np.ndarray  # recent samples: produced → applied in the state


class StreamWorker(Ownership):
    """The loop: poll → micro-batch → decode → update → push → checkpoint. What it owns and
    how that changes hands (rebalances, checkpoints, idle users) is `Ownership`'s."""

    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = NestedModel.load(cfg.model).to(self.device).eval()
        self.identity = model_identity(cfg.model, asdict(self.model.cfg))  # recorded in each checkpoint
        self.items = Vocab(load_item_ids(cfg.model))  # the catalogue's, once the loop has connected
        self.catalogue: Catalogue | None = None
        self.association_log: AssociationLog | None = None  # with a model that has the association level
        self.users = UserRows()
        self.state = self.model.init_state(0, len(self.items), device=self.device)  # the user rows
        self.levels: dict[int, FastState] = {}  # owned partition -> its population level (no user rows)
        self.clock_moved: dict[int, float] = {}  # partition -> monotonic time its level's clock last moved
        self.evicted_from: set[int] = set()  # owned partitions some of whose users wait in the online store
        self.offsets: dict[int, int] = {}  # owned partition -> next offset (all before it are in the state)
        self.pending: list = []  # records polled, not yet applied
        self.metrics = Metrics(cfg.metrics_port, cfg.metrics_host)
        self.features = FeaturePush(cfg.feature_repo, self.metrics)  # forks its writer before Kafka's threads
        self.dead_letters = DeadLetters(cfg.bootstrap_servers, cfg.dlq, cfg.dead_letter_max_bytes, self.metrics)
        self.checkpoints = CheckpointWriter(Path(cfg.checkpoint_dir) / f"{cfg.worker_id}.safetensors",
                                            cfg.checkpoint_every_s, cfg.checkpoint_give_up_s, self.metrics)
        self.restored_own = False
        self.stopping = False
        self.broken = False  # set when the loop dies: never checkpoint a state that may be half-updated
        self.changed = False  # anything to checkpoint since the last file (an idle worker writes none)
        self.applied = 0
        self.applied_s = np.zeros(0)  # recent produce → applied-in-state samples (seconds)
        self.seconds = Counter()  # where the time goes: poll (client fetch + record parsing), decode, update, ...
        self.first_apply = self.last_apply = None
        self.topic_id: str | None = None
        self.unverified: set[int] = set()  # assigned partitions whose stored offset is not yet checked
        self.past_end: dict[int, float] = {}  # partition -> since when our position is past its log's end

    # -- the public API: run, stop, and what an embedding process may read -----------------
    def stop(self) -> None:
        """Finish the current batch, push, checkpoint, and return from ``run``."""
        self.stopping = True

    @property
    def joined(self) -> bool:
        """Whether the worker has joined its group and restored its own checkpoint."""
        return self.restored_own

    def owns(self, partition: int) -> bool:
        """Whether the worker holds ``partition`` (its state restored, its position set)."""
        return partition in self.offsets

    @property
    def handled(self) -> int:
        """Messages applied or dead-lettered: every one the worker is done with."""
        return self.applied + self.dead_letters.total

    def held(self) -> Held:
        levels = [(level.level_counts(), level.level_clock()) for level in self.levels.values()]
        population = torch.zeros(max(len(self.items), *(len(c) for c, _ in levels)),
                                 dtype=self.state.level_counts().dtype)
        if levels:
            summed = self.model.population_counts(sum_levels(levels, self.model.cfg.pop_half_lives())[0])
            population[:len(summed)] = summed
        return Held(self.model, self.state, self.users.ids, self.items, population.to(self.device),
                    list(self.levels.values()))

    def stats(self) -> WorkerStats:
        return WorkerStats(self.applied, self.dead_letters.total, dict(self.seconds), self.first_apply,
                           self.last_apply, self.features.fresh_s.copy(), self.applied_s.copy())

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.device.type == "cpu":
            torch.set_num_threads(self.cfg.torch_threads)
        # A fetch the broker holds open (500 ms by default) when the partition is quiet
        # would add up to that to freshness: never hold longer than a micro-batch may wait.
        self.consumer = make_consumer(self.cfg.bootstrap_servers, group_id=self.cfg.group,
                                      max_poll_records=max(self.cfg.batch_size, 4096),
                                      fetch_max_wait_ms=max(1, int(self.cfg.max_wait_s * 1000)))
        one = self.model.init_state(1, len(self.items))
        check_rows_fit(self.cfg.checkpoint_dir, self.cfg.topic, one.row_shapes(),
                       self.identity)  # here, not in the rebalance callback, where a raise would be swallowed
        self.dead_letters.connect()
        self.catalogue = Catalogue(self.cfg.bootstrap_servers, self.cfg.topic, list(self.items.ids))
        self.items = self.catalogue.items
        if self.model.cfg.association:
            self.association_log = AssociationLog(self.cfg.bootstrap_servers, self.cfg.topic,
                                                  self.cfg.association_every_s)
        try:
            if ensure_topic(self.cfg.bootstrap_servers, self.cfg.topic):
                # A warning: a misspelt --topic would otherwise wait on an empty topic in silence.
                log.warning("created topic %r, which did not exist, with the broker's default partitions",
                            self.cfg.topic)
        except Exception as e:  # no right to create, an old broker: the group's metadata refresh finds it later
            log.warning("topic %r not checked or created (%s); subscribing anyway", self.cfg.topic, e)
        self.consumer.subscribe([self.cfg.topic], listener=Rebalance(self))
        if threading.current_thread() is threading.main_thread():  # embedded (replay): the host stops it
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
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
                if self.features.pending() and now - last_push >= self.cfg.push_every_s:
                    self.push()
                    last_push = now
                if self.association_log is not None:
                    self.association_log.send(self.levels)
                if now - last_ckpt >= self.checkpoints.interval():
                    self.checkpoints.give_up_if_stale()
                    self._check_log_ends()
                    self.evict_idle()
                    self.features.check_store(self.levels)  # a store restarted empty gets every row again
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
            self.features.last_push(self.serving_view())
            if self.association_log is not None:
                self.association_log.send(self.levels, force=True)
                self.association_log.flush()
            clean = self.checkpoint(wait=True)
        except BaseException:
            # A batch may have failed half-applied: the last good checkpoint stays the truth
            # (closing the consumer revokes partitions, which would otherwise checkpoint).
            self.broken = True
            raise
        finally:
            self.features.close()
            self.consumer.close(autocommit=False)  # revokes the partitions: a last checkpoint
            self.checkpoints.close()
            self.dead_letters.close()
            if self.association_log is not None:
                self.association_log.close()
            if self.catalogue is not None:
                self.catalogue.close()
        if not clean:
            log.error("worker %s stopped WITHOUT a last checkpoint (%s): a restart re-applies events since the "
                      "last file on disk", self.cfg.worker_id, self.checkpoints.path)
            return 1
        # The monotonic clock is one per host: benches add up several workers' spans.
        log.info("worker %s stopped cleanly: %d events applied, %d dead letters (applying from monotonic "
                 "%.3f to %.3f)", self.cfg.worker_id, self.applied, self.dead_letters.total,
                 self.first_apply or 0, self.last_apply or 0)
        return 0

    def _on_signal(self, signum, frame) -> None:
        log.info("signal %d: finishing the current batch, then a last checkpoint", signum)
        self.stop()

    # -- one micro-batch: decode, rows, update --------------------------------------------------
    def apply(self, records) -> None:
        t0 = time.perf_counter()
        firsts: dict[int, int] = {}
        for rec in records:
            firsts.setdefault(rec.partition, rec.offset)
        for p, first in firsts.items():  # the client itself reset a position that vanished (a new log)
            if first < self.offsets.get(p, 0):
                self._reset(p, f"the log restarted at offset {first}, before our {self.offsets[p]}", seek=False)
        good, kept, parts, offsets, stamps = [], [], [], [], []
        host_horizon = time.time() + self.cfg.max_clock_skew_s  # the stream clock moves only with accepted events
        horizons: dict[int, tuple[int, float]] = {}  # partition -> (clock, jump allowed)
        for rec in records:
            ev = decode_fields(rec.value if rec.value is not None else b"")
            if not isinstance(ev, InvalidEvent):
                ev = self._check_clock(ev, rec.partition, host_horizon, horizons)
            if isinstance(ev, InvalidEvent):
                self.dead_letters.send(rec, ev)
            else:
                good.append(ev)
                kept.append(rec)
        if good:
            item_ids = [ev[1] for ev in good]
            named = self.catalogue.index(item_ids)
            if (named < 0).any():  # never -1 in the state: the events of an item nobody could name wait aside
                for rec, item, index in zip(kept, item_ids, named.tolist()):
                    if index < 0:
                        self.dead_letters.send(rec, InvalidEvent("unnamed_item", f"item {item!r} could not be named "
                                                                 f"in the catalogue {self.catalogue.topic}"))
                good, kept = [ev for ev, i in zip(good, named) if i >= 0], [r for r, i in zip(kept, named) if i >= 0]
                named = named[named >= 0]
            parts, offsets, stamps = [r.partition for r in kept], [r.offset for r in kept], [r.timestamp for r in kept]
        t1 = time.perf_counter()
        self.seconds["decode"] += t1 - t0
        if good:
            user_ids, _, ts, event_ids, weights = zip(*good)
            parts = torch.tensor(parts, dtype=torch.int64)
            if self.cfg.evicts:
                self._rehydrate(user_ids, parts)
            rows = self.users.rows(list(user_ids), parts)
            items = torch.from_numpy(named)
            ts = torch.tensor(ts, dtype=torch.int64)
            weights = torch.tensor(weights, dtype=torch.float32)
            offsets = torch.tensor(offsets, dtype=torch.int64)
            stamps = np.asarray(stamps, dtype=np.int64)
            new = self.users.unapplied(rows, offsets, event_ids)
            if not new.all():
                rows, items, ts, weights, offsets, parts = rows[new], items[new], ts[new], weights[new], offsets[new], parts[new]
                stamps = stamps[new.numpy()]
        if good and len(rows):
            self.users.applied(rows, offsets)
            items, ts = items.to(self.device), ts.to(self.device)
            # Kinds of feedback (`recsys.feedback`); a stream of views alone runs exactly as before kinds.
            weights = None if is_plain(weights.numpy()) else weights.to(self.device)
            rows = rows.to(self.device)
            self.state = self.model.grow_state(self.state, int(rows.max()) + 1, int(items.max()) + 1)
            before = self.model.before_each(self.state, rows, items, weights)  # what each event follows
            self.state = self.model.update(self.state, rows, items, ts, population=False, donate=True, weight=weights)
            touched = parts.unique().tolist()
            moved = time.monotonic()
            for p in touched:
                mine = (parts == p).to(self.device)
                self.levels[p] = self.model.update_population(self._level(p), items[mine], ts[mine], donate=True,
                                                              weight=None if weights is None else weights[mine],
                                                              before=None if before is None else before[mine])
                if self.association_log is not None:  # the rows it changed: sources and successors
                    self.association_log.touched(p, torch.cat([items[mine], before[mine].flatten()]))
                self.clock_moved[p] = moved
            self.features.touched(rows, touched, stamps)
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

    def _check_clock(self, ev, partition: int, host_horizon: float, horizons: dict[int, tuple[int, float]]):
        """The event, or why its time cannot be right. Two guards: the host's clock (a 2099
        stamp), and the partition's own clock, which a backfill or a replay keeps years
        behind the host: a stamp more than ``max_clock_jump_s`` past the partition's latest
        accepted event (plus the wall time since it came) would decay every count of the
        partition to nothing at once, so one client's wrong clock cannot move it."""
        ts = ev[2]
        if ts > host_horizon:
            return InvalidEvent("future_timestamp", f"ts={ts} is more than {self.cfg.max_clock_skew_s:.0f}s ahead "
                                                    f"of the worker's clock ({host_horizon:.0f})")
        if partition not in horizons:  # the clock as of this batch: the level's, then each event accepted
            level = self.levels.get(partition)
            clock = level.level_clock() if level is not None else -1
            since = self.clock_moved.setdefault(partition, time.monotonic())
            horizons[partition] = (clock, self.cfg.max_clock_jump_s + time.monotonic() - since)
        clock, allowed = horizons[partition]
        if clock >= 0 and ts > clock + allowed:
            return InvalidEvent("clock_jump", f"ts={ts} is more than {self.cfg.max_clock_jump_s:.0f}s past partition "
                                              f"{partition}'s stream clock; a longer real gap: raise --max-clock-jump")
        horizons[partition] = (max(clock, ts), allowed)
        return ev

    def _level(self, partition: int) -> FastState:
        """The partition's population level, over every item known now."""
        level = self.levels.get(partition) or self.model.init_state(0, len(self.items), device=self.device)
        return self.model.grow_state(level, 0, len(self.items))

    def serving_view(self) -> ServingView:
        """What the online store gets of the state now (references, no copy)."""
        return ServingView(self.model, self.state, self.users.ids, self.levels)

    def push(self, wait: bool = False) -> None:
        t0 = time.perf_counter()
        self.features.push(self.serving_view(), wait=wait)
        self.seconds["push"] += time.perf_counter() - t0

    # -- observability -------------------------------------------------------------------------
    def log_line(self, rate: float) -> None:
        lag = self.lag()
        fresh = self.features.fresh_s[-10_000:]
        fq = (f"{np.quantile(fresh, 0.5) * 1e3:.0f}/{np.quantile(fresh, 0.99) * 1e3:.0f} ms"
              if len(fresh) else "n/a")
        log.info("%s ev/s | applied %s | dead letters %s | lag %s | users %s | freshness p50/p99 %s",
                 f"{rate:,.0f}", f"{self.applied:,}", f"{self.dead_letters.total:,}",
                 f"{sum(lag.values()):,}" if lag else "n/a", f"{len(self.users):,}", fq)


def run_worker(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [stream] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    return StreamWorker(cfg).run()
