"""Stream-worker checkpoints: the fast state and the offsets it includes, in one file.

One safetensors file per worker (``{worker_id}.safetensors``) holds every user row the
worker owns, the partition each row belongs to, the population level, and in its
metadata the next offset of each partition — the state and the offsets can never
disagree, because they are one file written atomically (write, fsync, rename, fsync
the folder). A worker that takes over a partition reads that partition's rows from
whichever file holds it at the highest offset (its previous owner's, usually).

Files are checked, not trusted: each carries a SHA-256 of its tensors and metadata, and
the previous file is kept beside it (``….safetensors.prev``). A file that is truncated,
altered or holds a non-finite number is skipped with one log line naming it, and the
next-best file for those partitions is used; with none left, the partition starts from
the beginning of the log.

    >>> write_checkpoint(Path("ckpt/w1.safetensors"), snapshot)
    >>> restore(Path("ckpt"), topic="interactions", partitions=[0, 3, 5])
    Restored(snapshots=[(Path("ckpt/w1.safetensors"), Snapshot(...), [0, 3])], missing=[5])
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger("recsys.stream")

SUFFIXES = (".safetensors", ".safetensors.prev")


class CorruptCheckpoint(ValueError):
    """A checkpoint file that cannot be trusted; the message names the file and the fault."""


@dataclass
class Snapshot:
    """What a checkpoint holds; tensors live on the CPU."""

    topic: str
    offsets: dict[int, int]  # partition -> next offset to read (every event before it is in the state)
    user_ids: list[str]  # row -> external user id
    partitions: torch.Tensor  # (U,) int64 row -> partition that owns the user
    users: dict[str, torch.Tensor]  # the per-user fields of FastState, (U, ...)
    population: dict[int, dict[str, torch.Tensor]]  # partition -> its partial population level (pop, …)
    item_ids: list[str]  # index -> external item id (the model's table, then items first seen online)
    topic_id: str | None = None  # the broker's id of the topic: a recreated topic gets a new one
    ends: dict[int, int] = field(default_factory=dict)  # partition -> log end offset seen at write time
    event_ids: torch.Tensor | None = None  # (U, K) hashes of each user's latest client event ids
    model: str = ""  # which model wrote it: its file and a digest of its config (`model_identity`)
    evicted_from: list[int] = field(default_factory=list)  # partitions with users waiting in the online store


def previous(path: Path) -> Path:
    """Where the file before ``path`` is kept."""
    return path.with_name(path.name + ".prev")


def write_checkpoint(path: Path, snap: Snapshot, keep_previous: bool = True) -> None:
    """Write ``snap`` to ``path`` atomically; the file it replaces becomes the previous one
    (``keep_previous``: pass False when that file is known damaged, to keep the good one)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"user.{k}": v.contiguous() for k, v in snap.users.items()}
    tensors |= {f"population.{p}.{k}": v.contiguous() for p, level in snap.population.items() for k, v in level.items()}
    tensors["partitions"] = snap.partitions.contiguous()
    if snap.event_ids is not None:
        tensors["event_ids"] = snap.event_ids.contiguous()
    metadata = {"topic": snap.topic, "topic_id": snap.topic_id or "",
                "offsets": json.dumps({str(p): o for p, o in snap.offsets.items()}),
                "ends": json.dumps({str(p): o for p, o in snap.ends.items()}),
                "user_ids": json.dumps(snap.user_ids), "item_ids": json.dumps(snap.item_ids),
                "written_at": f"{time.time():.3f}", "model": snap.model,
                "evicted_from": json.dumps(snap.evicted_from)}
    metadata["sha256"] = _digest(tensors, metadata)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    if keep_previous and path.exists():
        # The last good file stays, should the new one be damaged. Linked, not moved: a reader
        # must never find ``path`` missing between the two renames.
        kept = path.with_name(f".{path.name}.kept")
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:  # a file system without hard links: a copy costs one more write
            shutil.copyfile(path, kept)
        os.replace(kept, previous(path))
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the renames themselves survive a power cut
    finally:
        os.close(dir_fd)


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for key in sorted(metadata):
        if key != "sha256":
            h.update(f"{key}={metadata[key]}\0".encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _int_map(text: str | None) -> dict[int, int]:
    return {int(p): o for p, o in json.loads(text or "{}").items()}


def read_offsets(path: Path) -> tuple[str, dict[int, int]]:
    """(topic, offsets) from the metadata alone: cheap enough to scan every worker's file."""
    meta = _metadata(path)
    return meta["topic"], _int_map(meta["offsets"])


def read_checkpoint(path: Path) -> Snapshot:
    """The file's snapshot, verified: raises `CorruptCheckpoint` naming the file and the fault."""
    from safetensors.torch import load_file

    try:
        meta = _metadata(path)
        tensors = load_file(str(path))
    except Exception as e:  # truncated, not safetensors, unreadable
        raise CorruptCheckpoint(f"{path}: unreadable ({e})") from None
    if "sha256" in meta and meta["sha256"] != _digest(tensors, meta):
        raise CorruptCheckpoint(f"{path}: checksum mismatch (the file was altered after it was written)")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CorruptCheckpoint(f"{path}: non-finite values in {', '.join(bad)}")
    population: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith("population."):
            partition, _, name = key.removeprefix("population.").partition(".")
            if name:  # a file before per-partition levels holds one global level: not a partition's
                population.setdefault(int(partition), {})[name] = v
    return Snapshot(topic=meta["topic"], offsets=_int_map(meta["offsets"]),
                    user_ids=json.loads(meta["user_ids"]), partitions=tensors["partitions"],
                    users={k.removeprefix("user."): v for k, v in tensors.items() if k.startswith("user.")},
                    population=population,
                    item_ids=json.loads(meta["item_ids"]), topic_id=meta.get("topic_id") or None,
                    ends=_int_map(meta.get("ends")), event_ids=tensors.get("event_ids"), model=meta.get("model", ""),
                    evicted_from=json.loads(meta.get("evicted_from", "[]")))


class CheckpointMismatch(ValueError):
    """A checkpoint of user rows another model's shapes: restoring it cannot work."""


def model_identity(model_path: Path, config: dict) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{model_path} (config {digest})"


def check_rows_fit(folder: Path, topic: str, row_shapes: dict[str, tuple[int, ...]], identity: str) -> None:
    """Before a worker joins its group: every checkpoint of ``topic`` in ``folder`` must hold
    user rows of this model's shapes (``row_shapes``: field -> shape of one row), or the
    restore inside the rebalance would fail on the first tensor. Reads headers only."""
    from safetensors import safe_open

    for path in checkpoint_files(folder):
        try:
            meta = _metadata(path)
            if meta.get("topic") != topic:
                continue
            with safe_open(str(path), framework="pt") as f:
                shapes = {k.removeprefix("user."): tuple(f.get_slice(k).get_shape()[1:])
                          for k in f.keys() if k.startswith("user.")}
        except Exception:  # damaged: the restore skips it with its own log line
            continue
        wrong = {k: v for k, v in shapes.items() if k in row_shapes and v != tuple(row_shapes[k])}
        if wrong:
            field, shape = next(iter(wrong.items()))
            raise CheckpointMismatch(
                f"{path} holds user rows of another model ({field}: {list(shape)} per user, this model's "
                f"{list(row_shapes[field])}); it was written by {meta.get('model') or 'a model before identities'}, "
                f"this worker runs {identity}. Point --model at the model that wrote it, or start from the log "
                f"with an empty --checkpoint-dir")


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(p for suffix in SUFFIXES for p in Path(folder).glob(f"*{suffix}"))


def _candidates(folder: Path, topic: str, partitions, topic_id: str | None = None) -> dict[int, list[tuple[int, Path]]]:
    """For each partition, the files holding it, best first: those of the topic's current
    log (``topic_id``; unknown: the log of the file written last), then the highest offset
    (offsets only grow within a log, so the highest is the newest owner's last word on it).
    Offsets of a recreated topic's old log compare with nothing."""
    metas = []
    for path in checkpoint_files(folder):
        try:
            meta = _metadata(path)
        except Exception as e:  # a foreign or damaged file must not stop the worker
            log.warning("checkpoint %s is unreadable, skipped: %s", path, e)
            continue
        if meta.get("topic") == topic:
            metas.append((path, meta))
    if topic_id is None and metas:
        topic_id = max(metas, key=lambda pm: float(pm[1].get("written_at", 0)))[1].get("topic_id")
    found: dict[int, list[tuple[tuple, Path]]] = {}
    for path, meta in metas:
        for p, off in _int_map(meta["offsets"]).items():
            if p in partitions:
                rank = (meta.get("topic_id") == topic_id, off, path.suffix != ".prev")
                found.setdefault(p, []).append((rank, path))
    return {p: [(rank[1], path) for rank, path in sorted(c, key=lambda rp: rp[0], reverse=True)]
            for p, c in found.items()}


def latest_for_partitions(folder: Path, topic: str, partitions, topic_id: str | None = None) -> dict[int, Path]:
    """For each partition, the file that holds it best (metadata only): see `_candidates`."""
    return {p: c[0][1] for p, c in _candidates(folder, topic, set(partitions), topic_id).items()}


@dataclass
class Restored:
    snapshots: list[tuple[Path, Snapshot, list[int]]]  # each verified file and the partitions taken from it
    missing: list[int]  # partitions no good file holds: they start from the beginning of the log


def restore(folder: Path, topic: str, partitions, topic_id: str | None = None) -> Restored:
    """Each partition from the best file that verifies, falling back file by file."""
    partitions = set(partitions)
    loaded: dict[Path, Snapshot | None] = {}
    taken: dict[Path, list[int]] = {}
    for p, candidates in sorted(_candidates(folder, topic, partitions, topic_id).items()):
        for _, path in candidates:
            if path not in loaded:
                loaded[path] = read_or_none(path)
            if loaded[path] is not None:
                taken.setdefault(path, []).append(p)
                break
        else:
            log.warning("partition %d: no checkpoint file that holds it is intact; it starts from the beginning "
                        "of the log", p)
    missing = sorted(partitions - {p for ps in taken.values() for p in ps})
    return Restored([(path, loaded[path], ps) for path, ps in taken.items()], missing)


def read_or_none(path: Path) -> Snapshot | None:
    """The verified snapshot, or None after one log line naming the file and the fault."""
    try:
        return read_checkpoint(path)
    except CorruptCheckpoint as e:
        log.warning("skipping checkpoint: %s", e)
        return None


def read_own(path: Path) -> tuple[Path, Snapshot] | None:
    """A worker's own newest good file and its snapshot: ``path``, else the one kept before it."""
    for candidate in (path, previous(path)):
        if candidate.exists() and (snap := read_or_none(candidate)) is not None:
            return candidate, snap
    return None


class CheckpointWriter:
    """One worker's file, written off the loop: the loop takes the snapshot (consistent with
    its offsets), a thread serialises and fsyncs it — a 6,000-user state is ~50 MB, and its
    write paused every event behind it. One write at a time; a failed one is retried at the
    next interval, doubled per failure in a row (at most a minute), and after ``give_up_s``
    without a file on disk the worker exits for a supervisor to restart it elsewhere."""

    def __init__(self, path: Path, every_s: float, give_up_s: float, metrics):
        self.path, self.every_s, self.give_up_s, self.metrics = Path(path), every_s, give_up_s, metrics
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self.job = None
        self.failures = 0  # in a row
        self.retry = False  # the last write failed: its state is still to be written
        self.written_at = time.monotonic()  # the last file on disk (or the start)
        self.keep_previous = False  # whether the file at ``path`` is good, to be kept as the previous one
        metrics.checkpoint_age.set_function(lambda: time.monotonic() - self.written_at)

    def interval(self) -> float:
        return min(self.every_s * 2 ** self.failures, max(self.every_s, 60.0))

    def wait(self) -> None:
        """Until the write in flight, if any, is done."""
        if self.job is not None:
            self.job.result()

    def write(self, snap: Snapshot, wait: bool = False) -> bool:
        """Whether the file is on disk (``wait``) or on its way."""
        self.wait()
        self.retry = False
        self.job = self.thread.submit(self._write, snap, time.perf_counter())
        return self.job.result() if wait else True

    def give_up_if_stale(self) -> None:
        stale = time.monotonic() - self.written_at
        if self.failures and stale > self.give_up_s:
            raise RuntimeError(f"no checkpoint written to {self.path} for {stale:.0f}s "
                               f"(checkpoint_give_up_s={self.give_up_s:.0f}); exiting for a restart")

    def close(self) -> None:
        self.thread.shutdown(wait=True)

    def _write(self, snap: Snapshot, t0: float) -> bool:
        try:
            write_checkpoint(self.path, snap, keep_previous=self.keep_previous)
        except Exception as e:  # disk full, read-only, gone: the loop goes on and the next interval retries
            self.retry = True
            self.failures += 1
            self.metrics.checkpoint_failures.inc()
            log.error("checkpoint %s failed (%s: %s), %d in a row, the last one on disk %.0fs ago; retrying in "
                      "%.0fs", self.path, type(e).__name__, e, self.failures, time.monotonic() - self.written_at,
                      self.interval())
            return False
        self.failures = 0
        self.written_at = time.monotonic()
        self.keep_previous = True
        self.metrics.checkpoint.observe(time.perf_counter() - t0)
        return True


@dataclass
class UserRow:
    """One user's whole fast state, as an evicted user keeps it in the online store."""

    fields: dict[str, torch.Tensor]  # the user's rows but their items (`FastState.split_items`), and ``event_ids``
    latest: list[str | None]  # the user's latest items (None: an empty slot), by id: indices are per worker
    through: int  # the offset of the latest event the row holds, in the user's partition ...
    topic_id: str | None = None  # ... of this topic (a recreated topic starts its offsets over)


def encode_user_row(row: UserRow) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in row.fields.items()},
                metadata={"recent": json.dumps(row.latest), "through": str(row.through),
                          "topic_id": row.topic_id or ""})


def decode_user_row(blob: bytes) -> UserRow:
    from safetensors.torch import load

    # safetensors has no reader for the metadata of in-memory bytes: its header is 8 bytes of
    # length, then JSON holding "__metadata__" (the format's spec).
    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(blob[8:8 + n])["__metadata__"]
    return UserRow(load(blob), json.loads(meta["recent"]), int(meta["through"]), meta.get("topic_id") or None)
