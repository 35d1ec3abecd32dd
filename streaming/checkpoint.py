"""Stream-worker checkpoints: the fast state and the offsets it includes, in one file.

One safetensors file per worker (``{worker_id}.safetensors``) holds every user row the
worker owns, the partition each row belongs to, the population level, and in its
metadata the next offset of each partition — the state and the offsets can never
disagree, because they are one file written atomically (write, fsync, rename, fsync
the folder). A worker that takes over a partition reads that partition's rows from
whichever file holds it at the highest offset (its previous owner's, usually).

    >>> write_checkpoint(Path("ckpt/w1.safetensors"), snapshot)
    >>> latest_for_partitions(Path("ckpt"), topic="interactions", partitions=[0, 3])
    {0: Path("ckpt/w1.safetensors"), 3: Path("ckpt/w2.safetensors")}
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Snapshot:
    """What a checkpoint holds; tensors live on the CPU."""

    topic: str
    offsets: dict[int, int]  # partition -> next offset to read (every event before it is in the state)
    user_ids: list[str]  # row -> external user id
    partitions: torch.Tensor  # (U,) int64 row -> partition that owns the user
    users: dict[str, torch.Tensor]  # the per-user fields of FastState, (U, ...)
    population: dict[str, torch.Tensor]  # pop, pop_acc, seen
    item_ids: list[str]  # index -> external item id (the model's table, then items first seen online)


def write_checkpoint(path: Path, snap: Snapshot) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"user.{k}": v.contiguous() for k, v in snap.users.items()}
    tensors |= {f"population.{k}": v.contiguous() for k, v in snap.population.items()}
    tensors["partitions"] = snap.partitions.contiguous()
    metadata = {"topic": snap.topic, "offsets": json.dumps({str(p): o for p, o in snap.offsets.items()}),
                "user_ids": json.dumps(snap.user_ids), "item_ids": json.dumps(snap.item_ids),
                "written_at": f"{time.time():.3f}"}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a mix
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _offsets(meta: dict[str, str]) -> dict[int, int]:
    return {int(p): o for p, o in json.loads(meta["offsets"]).items()}


def read_offsets(path: Path) -> tuple[str, dict[int, int]]:
    """(topic, offsets) from the metadata alone: cheap enough to scan every worker's file."""
    meta = _metadata(path)
    return meta["topic"], _offsets(meta)


def read_checkpoint(path: Path) -> Snapshot:
    from safetensors.torch import load_file

    meta = _metadata(path)
    tensors = load_file(str(path))
    return Snapshot(topic=meta["topic"], offsets=_offsets(meta),
                    user_ids=json.loads(meta["user_ids"]), partitions=tensors["partitions"],
                    users={k.removeprefix("user."): v for k, v in tensors.items() if k.startswith("user.")},
                    population={k.removeprefix("population."): v for k, v in tensors.items()
                                if k.startswith("population.")},
                    item_ids=json.loads(meta["item_ids"]))


def latest_for_partitions(folder: Path, topic: str, partitions) -> dict[int, Path]:
    """For each partition, the checkpoint file that holds it at the highest offset.

    Offsets only grow, so the highest one is the newest owner's last word on it."""
    best: dict[int, tuple[int, Path]] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            file_topic, offsets = read_offsets(path)
        except Exception as e:  # a foreign or damaged file must not stop the worker
            print(f"[checkpoint] skipping unreadable {path}: {e}")
            continue
        for p, off in offsets.items():
            if file_topic == topic and p in partitions and off > best.get(p, (-1, None))[0]:
                best[p] = (off, path)
    return {p: path for p, (_, path) in best.items()}
