"""`make demo`: the main job on the embedded local stack, shut down cleanly even on Ctrl-C.

Today: broker up → data → produce the stream → consume and validate it → replay
report → summary → broker down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    data: str = "synthetic"
    events: int | None = None  # synthetic only; None: the generator's default
    out: Path = Path("runs/demo")
    topic: str = "interactions"


def run_demo(cfg: DemoConfig) -> int:
    from recsys.datasets import load_dataset
    from streaming.broker import EmbeddedBroker
    from streaming.consumer import ReaderConfig, read_topic
    from streaming.producer import ProducerConfig, produce

    t0 = time.perf_counter()
    kwargs = {"n_events": cfg.events} if cfg.data == "synthetic" and cfg.events else {}
    ds = load_dataset(cfg.data, **kwargs)
    inter = ds.interactions
    print(f"[data] {ds.name}: {inter.height:,} events, {inter['user_id'].n_unique():,} users, "
          f"{inter['item_id'].n_unique():,} items")

    broker = EmbeddedBroker.start(log_dir=cfg.out / "broker")
    try:
        print(f"[broker] Kafka-protocol broker on {broker.bootstrap_servers}")
        sent = produce(inter, ProducerConfig(broker.bootstrap_servers, cfg.topic))
        print(f"[produce] {sent.sent:,} events in {sent.seconds:.1f}s ({sent.events_per_second:,.0f} ev/s)")
        got = read_topic(ReaderConfig(broker.bootstrap_servers, cfg.topic, count=sent.sent))
        print(f"[consume] {got.messages:,} messages, {got.valid:,} valid, {sum(got.rejected.values())} rejected, "
              f"{got.duplicate_offsets} duplicates in {got.seconds:.1f}s ({got.events_per_second:,.0f} msg/s)")
        ok = got.valid == sent.sent and got.duplicate_offsets == 0
    finally:
        broker.stop()
        print("[broker] stopped")
    print(f"[demo] {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1
