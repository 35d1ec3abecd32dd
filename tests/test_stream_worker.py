"""The stream worker against the real broker: crashes, malformed messages, a two-worker group.

Workers run as real `recsys stream` processes and are killed with SIGKILL; the truth
is read back from their checkpoint files and compared with the same events applied
in-process by the model's own `update`.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from recsys.datasets import load_dataset
from streaming.checkpoint import read_checkpoint, read_offsets
from streaming.clients import make_consumer, make_producer
from streaming.producer import ProducerConfig, produce
from waiting import wait_until
from workers import Worker, assert_exactly_once, checkpointed, dead_letters, merged_checkpoints, reference_rows

pytestmark = pytest.mark.slow


class ProducerAhead(threading.Thread):
    """Produces the stream in chunks, never more than ``lead`` events ahead of the worker's
    checkpoint: however fast the worker drains, events are still in flight when a kill lands."""

    def __init__(self, broker, topic, frame: pl.DataFrame, ckpt: Path, lead: int = 12_000, chunk: int = 2_000):
        super().__init__(daemon=True)
        self.broker, self.topic, self.frame, self.ckpt = broker, topic, frame, ckpt
        self.lead, self.chunk = lead, chunk
        self.sent = 0
        self.unthrottled = threading.Event()  # set once no more kills are coming

    def run(self) -> None:
        cfg = ProducerConfig(self.broker.bootstrap_servers, self.topic, progress=False)
        while self.sent < self.frame.height:
            wait_until(lambda: self.unthrottled.is_set() or self.sent - checkpointed(self.ckpt) < self.lead,
                       "the worker to catch up", timeout_s=600)
            produce(self.frame.slice(self.sent, self.chunk), cfg)
            self.sent = min(self.frame.height, self.sent + self.chunk)


def test_kill_9_at_random_points_loses_nothing_and_applies_each_event_once(broker, topic, stream, model_path,
                                                                          tmp_path):
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    flowing = ProducerAhead(broker, topic, stream, own)
    flowing.start()
    # Each kill strikes once the checkpoint passes a random target: progress, not a clock, decides.
    rng = random.Random(7)
    targets = sorted(rng.sample(range(1_000, stream.height - 2 * flowing.lead), 10))
    progress = []  # events checkpointed when each kill struck
    for target in targets:
        w = Worker(broker, topic, model_path, ckpt, "w1", "--batch-size", "128", "--checkpoint-every", "0.5")
        wait_until(lambda: checkpointed(own) >= target or w.proc.poll() is not None, f"checkpoint past {target}")
        assert w.proc.poll() is None, f"worker exited early:\n{w.text()[-3000:]}"
        w.kill()
        progress.append(checkpointed(own))
    flowing.unthrottled.set()
    flowing.join()
    assert all(t <= n < stream.height for t, n in zip(targets, progress)), f"kills must strike mid-stream: {progress}"
    last = Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.5")
    last.finish_at(own, stream.height)

    _, offsets = read_offsets(own)
    assert sum(offsets.values()) == stream.height
    assert_exactly_once(merged_checkpoints(ckpt, topic), stream, reference_rows(model_path, stream))
    # Each partition's population level is checkpointed with its offsets: its events counted once too.
    levels = read_checkpoint(own).population
    assert sorted(levels) == sorted(offsets)
    assert {p: int(level["pop_events"]) for p, level in levels.items()} == offsets


def test_a_stream_with_kinds_of_feedback_gives_the_rows_the_model_gives_in_process(broker, topic, model_path,
                                                                                 tmp_path):
    """Dislikes and impressions through Kafka and the worker: each user's row, what they said no
    to and were shown included, equals the same events applied in-process."""
    stream = load_dataset("synthetic-kinds", n_users=1500, n_items=2000, n_events=6_000, seed=5).interactions
    assert {"dislike", "impression"} <= set(stream["event_type"])
    produce(stream, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    ckpt = tmp_path / "ckpt"
    Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.5").finish_at(ckpt / "w1.safetensors",
                                                                                        stream.height)
    rows = merged_checkpoints(ckpt, topic)
    assert any(r["negative"] for r in rows.values()) and any(r["shown"] for r in rows.values())
    assert_exactly_once(rows, stream, reference_rows(model_path, stream))


MALFORMED = [
    (b"\xff\xfe not utf-8", "not_utf8"),
    (b"{not json", "not_json"),
    (b'["a", "list"]', "not_an_object"),
    (b'{"user_id": "u1", "ts": 1}', "missing_field"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": "yesterday"}', "wrong_type"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": -5}', "ts_out_of_range"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": 1, "event_type": "teleport"}', "bad_event_type"),
    (b'{"user_id": "u1", "item_id": "i1", "ts": 1, "colour": "red"}', "unknown_field"),
    (b'{"user_id": "' + b"x" * 2000 + b'", "item_id": "i1", "ts": 1}', "oversized"),
]


def test_malformed_messages_go_to_the_dead_letter_topic_with_their_reason(broker, topic, stream, model_path,
                                                                         tmp_path):
    good = stream.head(20_000)
    producer = make_producer(broker.bootstrap_servers)
    rows = good.iter_rows(named=True)
    sent_bad = Counter()
    for n in range(30_000):  # every third message is malformed
        if n % 3 == 2:
            payload, reason = MALFORMED[n % len(MALFORMED)]
            producer.send(topic, key=b"bad", value=payload)
            sent_bad[reason] += 1
        else:
            r = next(rows)
            producer.send(topic, key=str(r["user_id"]).encode(), value=(
                f'{{"user_id":"{r["user_id"]}","item_id":"{r["item_id"]}","ts":{r["ts"]}}}').encode())
    producer.flush()

    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.5")
    w.finish_at(tmp_path / "ckpt" / "w1.safetensors", 30_000)  # offsets count the dead letters too
    assert_exactly_once(merged_checkpoints(tmp_path / "ckpt", topic), good)

    letters = dead_letters(broker, topic)
    reasons = Counter(dict(m.headers)["reason"].decode() for m in letters)
    assert sum(reasons.values()) == 10_000 and reasons == sent_bad
    first = letters[0]
    assert dict(first.headers)["source"].decode().startswith(f"{topic}/")  # where it came from
    assert first.value in {p for p, _ in MALFORMED}  # the original bytes, untouched


def test_a_worker_started_before_its_topic_creates_it_and_owns_every_partition_from_its_first_join(
        broker, topic, stream, model_path, tmp_path):
    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.5")
    wait_until(lambda: w.assigned() or w.proc.poll() is not None, "the worker to be assigned partitions")
    assert f"created topic '{topic}'" in w.text()
    consumer = make_consumer(broker.bootstrap_servers)
    try:
        partitions = consumer.partitions_for_topic(topic)
    finally:
        consumer.close()
    first_join = next(ln for ln in w.text().splitlines() if "assigned partitions [" in ln)
    assert len(partitions) > 1 and f"assigned partitions {sorted(partitions)}" in first_join
    produce(stream.head(1_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    w.finish_at(tmp_path / "ckpt" / "w1.safetensors", 1_000)


def test_two_workers_split_partitions_and_a_killed_one_hands_over_its_users(broker, topic, stream, model_path,
                                                                            tmp_path):
    ckpt = tmp_path / "ckpt"
    part = stream.head(60_000)
    a = Worker(broker, topic, model_path, ckpt, "a", "--checkpoint-every", "0.5")
    b = Worker(broker, topic, model_path, ckpt, "b", "--checkpoint-every", "0.5")
    # Produce only once both have joined and split the topic: who gets the first events is then fixed.
    wait_until(lambda: (a.assigned() and b.assigned() and not a.assigned() & b.assigned())
               or a.proc.poll() is not None or b.proc.poll() is not None, "both workers to own partitions")
    produce(part.head(30_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    wait_until(lambda: checkpointed(ckpt / "a.safetensors") + checkpointed(ckpt / "b.safetensors") == 30_000,
               "both workers to checkpoint the first half")
    owned_a, owned_b = read_offsets(ckpt / "a.safetensors")[1], read_offsets(ckpt / "b.safetensors")[1]
    assert owned_a and owned_b and not set(owned_a) & set(owned_b)  # the group split the partitions

    a.kill()
    produce(part.tail(30_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    b.finish_at(ckpt / "b.safetensors", part.height)
    _, offsets = read_offsets(ckpt / "b.safetensors")
    assert set(owned_a) <= set(offsets) and sum(offsets.values()) == part.height  # b took over a's partitions
    assert_exactly_once(merged_checkpoints(ckpt, topic), part, reference_rows(model_path, part))


def test_a_killed_worker_leaves_no_feast_writer_behind(broker, topic, stream, model_path, tmp_path):
    from features.store import FeatureRepo

    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    produce(stream.head(5_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--feature-repo", str(repo.path))
    # A push has landed (a population row is in the store): the writer process is up and working.
    wait_until(lambda: repo.populations(max_partitions=16) or w.proc.poll() is not None,
               "the worker's first push")
    assert w.proc.poll() is None, w.text()[-3000:]
    writers = _children(w.proc.pid)
    assert writers, "the Feast writer runs in a child process of the worker"
    w.kill()
    wait_until(lambda: not any(_running(pid) for pid in writers), f"writer processes {writers} to exit with their worker",
               timeout_s=30)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # an exited child no one has reaped yet is gone
