"""`make demo`: the main job on the embedded local stack, shut down cleanly even on Ctrl-C.

Today: data → broker up → produce the stream → consume and validate it → broker
down → a replay report (baselines and the nested model side by side, with plots).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    data: str = "synthetic"
    events: int | None = 100_000  # synthetic only; keeps the demo to a few minutes on 2 cores
    out: Path = Path("runs/demo")
    topic: str = "interactions"
    replay_models: tuple[str, ...] = ("pop_static", "pop_online_decay", "itemknn_online", "nested")


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

    from offline_eval.report import ReplayConfig, markdown_table, run_replay

    print(f"[replay] {', '.join(cfg.replay_models)} (EVAL_PROTOCOL.md, B = 256)")
    report = run_replay(ds, ReplayConfig(models=cfg.replay_models, out=cfg.out / "replay"))
    print(markdown_table(report))
    print(f"[replay] report and plots in {cfg.out / 'replay'}")
    print(f"[demo] {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1
