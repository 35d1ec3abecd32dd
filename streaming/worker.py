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

The population level is kept per partition: each partition's partial level is applied,
checkpointed and handed over with the partition's users and offsets (so it too holds each
event exactly once), and pushed under its own key; serving sums them. With a
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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from kafka import ConsumerRebalanceListener, TopicPartition

from recsys.nested_model import POPULATION_FIELDS, USER_FIELDS, FastState, NestedModel, load_item_ids, sum_levels
from recsys.vocab import Vocab
from streaming.catalogue import Catalogue
from streaming.checkpoint import (CheckpointWriter, Snapshot, UserRow, decode_user_row, encode_user_row, read_own,
                                  restore)
from streaming.clients import make_consumer
from streaming.dead_letters import DeadLetters
from streaming.events import InvalidEvent, decode_fields
from streaming.metrics import Metrics
from streaming.push import FeaturePush
from streaming.user_rows import UserRows

log = logging.getLogger("recsys.stream")
PAST_END_GRACE_S = 2.0  # a position past the log's end this long means the topic was recreated


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


@dataclass(frozen=True)
class Held:
    """What the worker holds now, for scoring beside it (the in-process replay)."""

    model: NestedModel
    state: FastState
    users: Vocab  # row -> user id
    items: Vocab  # index -> item id (the model's table, then items first seen online)
    population: torch.Tensor  # (N,) the worker's partitions' population levels, summed


@dataclass(frozen=True)
class WorkerStats:
    applied: int  # valid events handled (applied, or already in the state)
    dead_letters: int
    seconds: dict[str, float]  # where the loop's time went: poll, decode, update, push, checkpoint
    first_apply: float | None  # monotonic times, for sustained-throughput figures
    last_apply: float | None
    freshness_s: np.ndarray  # recent samples: produced → in the online store
    applied_s: np.ndarray  # recent samples: produced → applied in the state


class StreamWorker:
    def __init__(self, cfg: WorkerConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.model = NestedModel.load(cfg.model).to(self.device).eval()
        self.items = Vocab(load_item_ids(cfg.model))  # the catalogue's, once the loop has connected
        self.catalogue: Catalogue | None = None
        self.users = UserRows()
        self.state = self.model.init_state(0, len(self.items), device=self.device)  # the user rows
        self.levels: dict[int, FastState] = {}  # owned partition -> its population level (no user rows)
        self.stream_clock = -1  # the latest accepted event's time
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
        levels = [(level.pop, level.pop_ts if int(level.pop_ts) >= 0 else self.clock()) for level in self.levels.values()]
        population = torch.zeros(max(len(self.items), *(len(c) for c, _ in levels)), dtype=self.state.pop.dtype)
        if levels:
            summed = sum_levels(levels, self.model.cfg.pop_half_life_s)[0]
            population[:len(summed)] = summed
        return Held(self.model, self.state, self.users.ids, self.items, population.to(self.device))

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
        self.dead_letters.connect()
        self.catalogue = Catalogue(self.cfg.bootstrap_servers, self.cfg.topic, list(self.items.ids))
        self.items = self.catalogue.items
        self.consumer.subscribe([self.cfg.topic], listener=_Rebalance(self))
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
                if now - last_ckpt >= self.checkpoints.interval():
                    self.checkpoints.give_up_if_stale()
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
            self.features.last_push(self.model, self.state, self.users.ids, self.clock(), self.levels)
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
        good, parts, offsets, stamps = [], [], [], []
        horizon = time.time() + self.cfg.max_clock_skew_s  # the stream clock moves only with accepted events
        for rec in records:
            ev = decode_fields(rec.value if rec.value is not None else b"")
            if not isinstance(ev, InvalidEvent) and ev[2] > horizon:
                ev = InvalidEvent("future_timestamp", f"ts={ev[2]} is more than {self.cfg.max_clock_skew_s:.0f}s "
                                                      f"ahead of the worker's clock ({horizon:.0f})")
            if isinstance(ev, InvalidEvent):
                self.dead_letters.send(rec, ev)
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
            rows = self.users.rows(list(user_ids), parts)
            items = torch.from_numpy(self.catalogue.index(list(item_ids)))
            ts = torch.tensor(ts, dtype=torch.int64)
            offsets = torch.tensor(offsets, dtype=torch.int64)
            stamps = np.asarray(stamps, dtype=np.int64)
            new = self.users.unapplied(rows, offsets, event_ids)
            if not new.all():
                rows, items, ts, offsets, parts = rows[new], items[new], ts[new], offsets[new], parts[new]
                stamps = stamps[new.numpy()]
        if good and len(rows):
            self.users.applied(rows, offsets)
            self.stream_clock = max(self.stream_clock, int(ts.max()))
            items, ts = items.to(self.device), ts.to(self.device)
            self.state = self.model.update(self.state, rows.to(self.device), items, ts, population=False)
            touched = parts.unique().tolist()
            for p in touched:
                mine = (parts == p).to(self.device)
                self.levels[p] = self.model.update_population(self._level(p), items[mine], ts[mine])
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

    def _level(self, partition: int) -> FastState:
        """The partition's population level, over every item known now."""
        level = self.levels.get(partition) or self.model.init_state(0, len(self.items), device=self.device)
        return self.model.grow_state(level, 0, len(self.items))

    def push(self, wait: bool = False) -> None:
        t0 = time.perf_counter()
        self.features.push(self.model, self.state, self.users.ids, self.clock(), self.levels, wait=wait)
        self.seconds["push"] += time.perf_counter() - t0

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
        unsettled = self.features.settled(self.model, self.state, self.users.ids, self.clock(), self.levels)
        idle = self.users.idle(self.cfg.user_ttl_s)
        if unsettled:
            idle[sorted(unsettled)] = False
        rows = idle.nonzero().flatten()
        if not len(rows):
            return
        ids = [self.users.ids.ids[r] for r in rows.tolist()]
        values = {k: getattr(self.state, k)[rows.to(self.device)].cpu() for k in USER_FIELDS}
        values["event_ids"] = self.users.event_ids[rows]
        blobs = [encode_user_row(UserRow({k: v[j] for k, v in values.items() if k != "recent"},
                                         [self.items.ids[i] if i >= 0 else None for i in values["recent"][j].tolist()],
                                         int(self.users.through[r]), self.topic_id))
                 for j, r in enumerate(rows.tolist())]
        if not self.features.evict(ids, blobs):
            return
        self._keep_rows(~idle)
        self.changed = True
        self.metrics.evicted.inc(len(ids))
        self.metrics.users.set(len(self.users))

    def _rehydrate(self, user_ids, partitions: torch.Tensor) -> None:
        """Users this worker does not hold take their rows back from the online store, if an
        eviction left one there; the others start empty, as new users do."""
        known = self.users.find(user_ids)
        missing = {u: p for u, p, r in zip(user_ids, partitions.tolist(), known.tolist()) if r < 0}
        if not missing:
            return
        back = [(u, decode_user_row(b)) for u, b in zip(missing, self.features.evicted(list(missing)))
                if b is not None]
        if not back:
            return
        rows = self.users.rows([u for u, _ in back], torch.tensor([missing[u] for u, _ in back], dtype=torch.int64))
        named = self.catalogue.index([i for _, row in back for i in row.recent if i is not None])
        index = dict(zip((i for _, row in back for i in row.recent if i is not None), named.tolist()))
        recent = torch.tensor([[-1 if i is None else index[i] for i in row.recent] for _, row in back],
                              dtype=torch.int64)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        dev = rows.to(self.device)
        for name in USER_FIELDS:
            value = recent if name == "recent" else torch.stack([row.fields[name] for _, row in back])
            getattr(self.state, name)[dev] = value.to(self.device)
        # An offset counts in the log it was read from: a recreated topic starts over.
        self.users.through[rows] = torch.tensor([row.through if row.topic_id == self.topic_id else -1
                                                 for _, row in back], dtype=torch.int64)
        self.users.event_ids[rows] = torch.stack([row.fields["event_ids"] for _, row in back])
        self.metrics.rehydrated.inc(len(back))

    # -- checkpoints and rebalances ------------------------------------------------------------
    def checkpoint(self, wait: bool = False) -> bool:
        """State + offsets in one atomic file; dead letters are flushed first, so a message
        is never past a checkpointed offset without being in the state or the DLQ (or
        counted as lost). Returns whether the state is on disk (``wait``) or on its way.
        An idle worker writes nothing: only a changed state makes a new file."""
        if not self.offsets or self.broken:
            return True
        self.checkpoints.wait()  # a failure of the write in flight leaves its state to write again
        if not (self.changed or self.checkpoints.retry):
            return True
        t0 = time.perf_counter()
        try:
            self.dead_letters.flush()
        except Exception as e:  # the broker is away: try again at the next interval
            log.warning("checkpoint postponed: dead letters not flushed (%s)", e)
            return False
        self.changed = False
        n = len(self.users)  # rows past n are spare capacity (amortised growth)
        snap = Snapshot(
            topic=self.cfg.topic, offsets=dict(self.offsets), user_ids=list(self.users.ids.ids),
            partitions=self.users.partition.clone(),
            users={k: _cpu_copy(getattr(self.state, k)[:n]) for k in USER_FIELDS},
            population={p: {k: _cpu_copy(getattr(level, k)) for k in POPULATION_FIELDS} for p, level in self.levels.items()},
            item_ids=list(self.items.ids),
            topic_id=self.topic_id, ends=self._highwaters(), event_ids=self.users.event_ids.clone())
        ok = self.checkpoints.write(snap, wait)
        self.seconds["checkpoint"] += time.perf_counter() - t0
        return ok

    def on_revoked(self, partitions: set[int]) -> None:
        self.pending = []  # not applied: the next owner reads them again from the checkpoint
        self.push(wait=True)  # the next owner does not know which of these users are unpushed
        on_disk = self.checkpoint(wait=True)  # before the partitions change hands
        self._keep_rows(~self.users.on(partitions))
        for p in partitions:
            self.offsets.pop(p, None)
            self.levels.pop(p, None)
        log.info("revoked partitions %s (%s)", sorted(partitions),
                 "checkpointed" if on_disk else "NOT checkpointed: the next owner re-applies from the last file")

    def on_assigned(self, partitions: set[int]) -> None:
        self.pending = []
        self.last_msg = time.monotonic()  # idle time counts from joining, not from start
        path = self.checkpoints.path
        if not self.restored_own:
            own = read_own(path)
            # A damaged newest file is overwritten, not kept as the previous one: that stays good.
            self.checkpoints.keep_previous = own is not None and own[0] == path
            self.restored_own = True
        new = sorted(set(partitions) - set(self.offsets))
        self.topic_id = _topic_id(self.consumer, self.cfg.topic)
        restored = restore(path.parent, self.cfg.topic, new, self.topic_id)
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
        self.users.restart_log(partition)
        if seek:
            self.pending = [r for r in self.pending if r.partition != partition]
            self.consumer.seek_to_beginning(TopicPartition(self.cfg.topic, partition))
        self.changed = True

    def _import_rows(self, snap: Snapshot, partitions: list[int]) -> None:
        take = torch.isin(snap.partitions, torch.tensor(partitions, dtype=torch.int64)).nonzero().flatten()
        rows = self.users.rows([snap.user_ids[i] for i in take.tolist()], snap.partitions[take])
        users = dict(snap.users)
        remap = torch.from_numpy(self.catalogue.index(snap.item_ids))  # the file's item indices -> the catalogue's
        if "recent" in users:  # item indices past the model's table are each worker's own naming
            users["recent"] = torch.where(users["recent"] >= 0, remap[users["recent"].clamp(min=0)], -1)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        for name, value in users.items():
            getattr(self.state, name)[rows.to(self.device)] = value[take].to(self.device)
        if snap.event_ids is not None:
            self.users.event_ids[rows] = snap.event_ids[take]
        for p in partitions:  # each partition's population level comes with its users and offsets
            if p in snap.population:
                level = self.model.init_state(0, len(self.items), device=self.device)
                for name, value in snap.population[p].items():
                    if name in ("pop", "pop_acc"):  # by item id: indices past the model's table are per file
                        n = min(len(value), len(remap))  # a level may hold spare capacity past its items
                        value = torch.zeros(len(self.items), dtype=value.dtype).index_add_(0, remap[:n], value[:n])
                    setattr(level, name, value.to(self.device))
                self.levels[p] = level

    def _keep_rows(self, keep: torch.Tensor) -> None:
        rows = keep.nonzero().flatten()
        self.state = self.state.with_user_rows(self.state.user_rows(rows.to(self.device)))
        self.features.renumber(self.users.keep(keep))

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
        fresh = self.features.fresh_s[-10_000:]
        fq = (f"{np.quantile(fresh, 0.5) * 1e3:.0f}/{np.quantile(fresh, 0.99) * 1e3:.0f} ms"
              if len(fresh) else "n/a")
        log.info("%s ev/s | applied %s | dead letters %s | lag %s | users %s | freshness p50/p99 %s",
                 f"{rate:,.0f}", f"{self.applied:,}", f"{self.dead_letters.total:,}",
                 f"{sum(lag.values()):,}" if lag else "n/a", f"{len(self.users):,}", fq)


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python calls these inside poll(); no commits here (they deadlock: RECIPES.md)."""

    def __init__(self, worker: StreamWorker):
        self.worker = worker

    def on_partitions_revoked(self, revoked):
        self.worker.on_revoked({tp.partition for tp in revoked})

    def on_partitions_assigned(self, assigned):
        self.worker.on_assigned({tp.partition for tp in assigned})


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


def run_worker(cfg: WorkerConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [stream] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO is per-connection chatter
    return StreamWorker(cfg).run()
