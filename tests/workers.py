"""Stream workers as real processes, and the truth read back from their checkpoints.

`Worker` runs `recsys stream` with its log in a file; `reference_rows` applies the same
events in-process with the model's own `update`; `assert_exactly_once` compares the two.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest
import torch

from recsys.feedback import FEEDBACK
from recsys.nested import NestedModel
from recsys.nested.state import ITEM_FIELDS
from recsys.vocab import Vocab
from streaming.broker import die_with_parent
from streaming.checkpoint import latest_for_partitions, read_checkpoint, read_offsets
from waiting import wait_until


class RedisServer:
    """A real `redis-server` on loopback, without persistence: a restart comes back empty."""

    def __init__(self, port: int, folder: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (`apt-get install redis-server`; `make test` installs it "
                        "where apt-get is available)")
        self.port = port
        self.proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                      "no", "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     preexec_fn=die_with_parent)
        wait_until(lambda: _listening(port) or self.proc.poll() is not None, "redis-server to listen")
        assert self.proc.poll() is None, "redis-server exited at start"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Worker:
    """One `recsys stream` process, its log in a file."""

    def __init__(self, broker, topic, model_path, ckpt_dir, worker_id, *extra: str):
        self.log = Path(ckpt_dir).parent / f"{worker_id}-{time.monotonic_ns()}.log"
        cmd = [sys.executable, "-m", "commands.cli", "stream", "--bootstrap-servers", broker.bootstrap_servers,
               "--topic", topic, "--group", f"g-{topic}", "--model", str(model_path), "--checkpoint-dir",
               str(ckpt_dir), "--worker-id", worker_id, "--log-every", "1", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, preexec_fn=die_with_parent)

    def text(self) -> str:
        return self.log.read_text()

    def assigned(self) -> set[int]:
        """The partitions of the worker's latest assignment, from its log."""
        lines = [ln for ln in self.text().splitlines() if "assigned partitions [" in ln]
        if not lines:
            return set()
        listed = lines[-1].split("assigned partitions [", 1)[1].split("]", 1)[0]
        return {int(p) for p in listed.split(",") if p.strip()}

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no last checkpoint, no leaving the group
        self.proc.wait()

    def finish(self, timeout_s: float = 180) -> None:
        assert self.proc.wait(timeout_s) == 0, self.text()[-3000:]

    def finish_at(self, ckpt: Path, events: int, timeout_s: float = 180) -> None:
        """Once the worker's checkpoint includes ``events`` messages, a clean stop (SIGTERM)."""
        wait_until(lambda: checkpointed(ckpt) >= events or self.proc.poll() is not None,
                   f"a checkpoint of {events} messages", timeout_s)
        self.proc.terminate()
        self.finish()


def reference_rows(model_path: Path, frame: pl.DataFrame) -> dict[str, dict[str, torch.Tensor]]:
    """Every user's rows after all of ``frame`` applied in one in-process pass."""
    from recsys.nested import load_item_ids

    model = NestedModel.load(model_path).eval()
    users, items = Vocab(), Vocab(load_item_ids(model_path))
    state = model.init_state(0, len(items))
    u = torch.from_numpy(users.index(frame["user_id"].cast(pl.Utf8)))
    i = torch.from_numpy(items.index(frame["item_id"].cast(pl.Utf8)))
    ts = torch.from_numpy(frame["ts"].to_numpy().copy())
    kinds = frame["event_type"].to_numpy() if "event_type" in frame.columns else None
    w = None if kinds is None else torch.from_numpy(FEEDBACK.weights(kinds))
    for lo in range(0, len(u), 4096):
        state = model.update(state, u[lo:lo + 4096], i[lo:lo + 4096], ts[lo:lo + 4096], donate=True,
                             weight=None if w is None else w[lo:lo + 4096])
    rows = state.user_rows(torch.arange(len(users.ids)))
    return {uid: _named({f: v[r] for f, v in rows.items()}, items.ids) for r, uid in enumerate(users.ids)}


def _named(row: dict, item_ids: list[str]) -> dict:
    """The latest items by id: beyond the model's table, item indices are each worker's own naming."""
    fields = {k: v for k, v in row.items() if k not in ITEM_FIELDS}
    return fields | {name: [item_ids[i] for i in row[name].tolist() if i >= 0] for name in ITEM_FIELDS}


def merged_checkpoints(ckpt_dir: Path, topic: str) -> dict[str, dict[str, torch.Tensor]]:
    """User rows as the group would restore them: each partition from its newest file."""
    rows = {}
    for p, path in latest_for_partitions(ckpt_dir, topic, range(64)).items():
        snap = read_checkpoint(path)
        for r in (snap.partitions == p).nonzero().flatten().tolist():
            rows[snap.user_ids[r]] = _named({f: v[r] for f, v in snap.users.items()}, snap.item_ids)
    return rows


def assert_exactly_once(rows, stream: pl.DataFrame, reference=None) -> None:
    """Each user's row counts their events once (their positive ones, where the stream has
    kinds) and, given a ``reference``, equals it."""
    if "event_type" in stream.columns:
        stream = stream.filter(pl.Series(FEEDBACK.weights(stream["event_type"].to_numpy()) > 0))
    expected = Counter(stream["user_id"].cast(pl.Utf8).to_list())
    got = {uid: int(r["cnt"]) for uid, r in rows.items()}
    assert got == dict(expected), "some user's events were lost or applied twice"
    for uid, ref in (reference or {}).items():
        for f in ITEM_FIELDS:
            assert rows[uid][f] == ref[f], (uid, f)
        for f in set(ref) - set(ITEM_FIELDS):
            assert torch.allclose(rows[uid][f].double(), ref[f].double(), atol=1e-4, rtol=1e-4), (uid, f)


def checkpointed(path: Path) -> int:
    """Messages a worker's checkpoint includes (0 before its first, or while it is unreadable)."""
    try:
        return sum(read_offsets(path)[1].values())
    except Exception:
        return 0


def held_users(path: Path) -> int | None:
    """Users a worker's checkpoint holds (None while it is unreadable: a read racing the
    worker's rename of a newer file sees the old header and the new file)."""
    try:
        return len(read_checkpoint(path).user_ids)
    except Exception:
        return None


def metric(port: int, name: str, **labels: str) -> float:
    """The sum of a worker's Prometheus samples called ``name`` with these labels (0 if none yet)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:  # not listening yet
        return 0.0
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and labels.items() <= s.labels.items())


def dead_letters(broker, topic: str) -> list:
    """Every record of ``topic``'s dead-letter topic, from its beginning."""
    from streaming.clients import make_consumer

    dlq = make_consumer(broker.bootstrap_servers, consumer_timeout_ms=5000)
    dlq.subscribe([f"{topic}.dead-letters"])
    letters = list(dlq)
    dlq.close()
    return letters
