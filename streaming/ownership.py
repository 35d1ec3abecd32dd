"""What a stream worker owns, and how it changes hands: its partitions (assigned, revoked,
restarted when the topic was recreated), the checkpoint that carries them, and idle users
leaving for the online store and coming back.

`Ownership` is the part of `StreamWorker` (streaming/worker.py) that the loop calls between
micro-batches and that kafka-python calls on a rebalance. It works on the worker's state:
``offsets`` (owned partition -> next offset), ``users`` (`UserRows`), ``state`` (the user
rows' fast state), ``levels`` (partition -> population levels), ``catalogue``, ``consumer``,
``checkpoints`` (`CheckpointWriter`), ``features`` (`FeaturePush`), ``association_log``
(`AssociationLog`, or None), ``dead_letters``,
``metrics`` and ``pending``, all set up by the worker.

Exactly once: a partition's user rows, population level and offset travel together, in one
checkpoint file; whoever takes the partition over restores all three from the newest file
that holds it, and reads the log on from that offset.
"""

from __future__ import annotations

import logging
import time

import torch
from kafka import ConsumerRebalanceListener, TopicPartition

from recsys.nested import FastState
from streaming.checkpoint import Snapshot, UserRow, decode_user_row, encode_user_row, read_own, restore

log = logging.getLogger("recsys.stream")
PAST_END_GRACE_S = 2.0  # a position past the log's end this long means the topic was recreated


class Ownership:
    # -- idle users: out to the online store and back ------------------------------------------
    def evict_idle(self) -> None:
        """Users idle for ``user_ttl_s``, and past ``max_users`` the least recently active
        (down to 90 % of it), leave memory (and the next checkpoint) once their whole row is
        in the online store; an unpushed or unwritten user stays until a later try."""
        ttl, bound = self.cfg.user_ttl_s, self.cfg.max_users
        if not self.cfg.evicts or not len(self.users):
            return
        idle = self.users.idle(ttl) if ttl is not None else torch.zeros(len(self.users.touched), dtype=torch.bool)
        if bound is not None and len(self.users) > bound:
            idle[self.users.least_recent(len(self.users) - int(0.9 * bound))] = True
        if not idle.any():
            return
        unsettled = self.features.settled(self.serving_view())
        if unsettled:
            idle[sorted(unsettled)] = False
        rows = idle.nonzero().flatten()
        if not len(rows):
            return
        ids = [self.users.ids.ids[r] for r in rows.tolist()]
        fields, latest = self.state.split_items({k: v.cpu() for k, v in self.state.user_rows(rows.to(self.device)).items()})
        fields["event_ids"] = self.users.event_ids[rows]
        blobs = [encode_user_row(UserRow({k: v[j] for k, v in fields.items()},
                                         [self.items.ids[i] if i >= 0 else None for i in latest[j].tolist()],
                                         int(self.users.through[r]), self.topic_id))
                 for j, r in enumerate(rows.tolist())]
        if not self.features.evict(ids, blobs):
            return
        self.evicted_from.update(self.users.partition[rows].tolist())
        self._keep_rows(~idle)
        self.changed = True
        self.metrics.evicted.inc(len(ids))
        self.metrics.users.set(len(self.users))

    def _rehydrate(self, user_ids, partitions: torch.Tensor) -> None:
        """Users this worker does not hold take their rows back from the online store, if an
        eviction left one there; the others start empty, as new users do."""
        known = self.users.find(user_ids)
        # Only partitions some user left (checkpoints carry the set): no store read per new user otherwise.
        missing = {u: p for u, p, r in zip(user_ids, partitions.tolist(), known.tolist())
                   if r < 0 and (p in self.evicted_from or self.cfg.user_ttl_s is not None)}
        if not missing:
            return
        back = [(u, decode_user_row(b)) for u, b in zip(missing, self.features.evicted(list(missing)))
                if b is not None]
        if not back:
            return
        rows = self.users.rows([u for u, _ in back], torch.tensor([missing[u] for u, _ in back], dtype=torch.int64))
        named = self.catalogue.index([i for _, row in back for i in row.latest if i is not None])
        index = dict(zip((i for _, row in back for i in row.latest if i is not None), named.tolist()))
        latest = torch.tensor([[-1 if i is None else index[i] for i in row.latest] for _, row in back],
                              dtype=torch.int64)
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        fields = {name: torch.stack([row.fields[name] for _, row in back]) for name in back[0][1].fields
                  if name != "event_ids"}
        self.state.put_user_rows(rows.to(self.device), self.state.join_items(fields, latest))
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
            users={k: _cpu_copy(v) for k, v in self.state.user_rows(slice(0, n)).items()},
            population={p: {k: _cpu_copy(v) for k, v in level.population().items()} for p, level in self.levels.items()},
            item_ids=list(self.items.ids),
            topic_id=self.topic_id, ends=self._highwaters(), event_ids=self.users.event_ids.clone(),
            model=self.identity, evicted_from=sorted(self.evicted_from & set(self.offsets)))
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
            if self.association_log is not None:  # its new owner sends its level
                self.association_log.forget(p)
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
            if self.association_log is not None:  # serving gets the whole level from its new owner
                self.association_log.take_over(p)
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
        if (remap < 0).any():  # this runs in the rebalance callback: a data-dependent raise here would crash-loop
            log.warning("%d items of the checkpoint could not be named in the catalogue %s: their counts are "
                        "left out", int((remap < 0).sum()), self.catalogue.topic)
        users = FastState.renumber_items(users, remap)  # indices past the model's table are each worker's own
        self.state = self.model.grow_state(self.state, len(self.users), len(self.items))
        self.state.put_user_rows(rows.to(self.device), {name: value[take] for name, value in users.items()})
        if snap.event_ids is not None:
            self.users.event_ids[rows] = snap.event_ids[take]
        self.evicted_from.update(set(snap.evicted_from) & set(partitions))
        for p in partitions:  # each partition's population level comes with its users and offsets
            if p in snap.population:  # counts by item id: indices past the model's table are per file
                empty = self.model.init_state(0, len(self.items), device=self.device)
                self.levels[p] = empty.with_population(snap.population[p], remap)

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


class Rebalance(ConsumerRebalanceListener):
    """kafka-python calls these inside poll(); no commits here (they deadlock: RECIPES.md)."""

    def __init__(self, worker: Ownership):
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
