"""Read a topic back from the beginning, validate every message and count what came.

This is the walking skeleton of the stream (``recsys consume --count N``); the stream
worker builds its consumer group loop on the same decode path.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from tqdm import tqdm

from streaming.clients import make_consumer
from streaming.events import Event, InvalidEvent, decode


@dataclass(frozen=True)
class ReaderConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "interactions"
    count: int | None = None  # stop after this many messages; None: until idle
    idle_timeout_s: float = 5.0  # stop when nothing arrives for this long
    progress: bool = True


@dataclass
class ReadSummary:
    messages: int = 0
    valid: int = 0
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    duplicate_offsets: int = 0
    seconds: float = 0.0
    events: list[Event] = field(default_factory=list, repr=False)

    @property
    def events_per_second(self) -> float:
        return self.messages / max(self.seconds, 1e-9)


def read_topic(cfg: ReaderConfig, keep_events: bool = False) -> ReadSummary:
    from kafka import TopicPartition

    consumer = make_consumer(cfg.bootstrap_servers)
    summary, seen = ReadSummary(), set()
    start = time.perf_counter()
    try:
        partitions = _wait_for_partitions(consumer, cfg.topic, cfg.idle_timeout_s)
        consumer.assign([TopicPartition(cfg.topic, p) for p in partitions])
        consumer.seek_to_beginning()
        last_data = time.monotonic()
        with tqdm(total=cfg.count, unit="msg", mininterval=1.0, disable=not cfg.progress, desc=f"consume ← {cfg.topic}") as bar:
            while cfg.count is None or summary.messages < cfg.count:
                batches = consumer.poll(timeout_ms=200, max_records=10_000)
                if not batches:
                    if time.monotonic() - last_data > cfg.idle_timeout_s:
                        break
                    continue
                last_data = time.monotonic()
                for tp, records in batches.items():
                    for r in records:
                        if (tp.partition, r.offset) in seen:
                            summary.duplicate_offsets += 1
                        seen.add((tp.partition, r.offset))
                        result = decode(r.value)
                        if isinstance(result, InvalidEvent):
                            summary.rejected[result.reason] += 1
                        else:
                            summary.valid += 1
                            if keep_events:
                                summary.events.append(result)
                    summary.messages += len(records)
                    bar.update(len(records))
    finally:
        consumer.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _wait_for_partitions(consumer, topic: str, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while True:
        partitions = consumer.partitions_for_topic(topic)
        if partitions:
            return sorted(partitions)
        if time.monotonic() > deadline:
            raise RuntimeError(f"topic {topic!r} not found on the broker after {timeout_s}s; produce to it first")
        consumer.topics()  # refresh metadata
        time.sleep(0.1)
