"""End-to-end stream worker: broker → fast state → Feast online store, and freshness.

    python bench/stream_throughput.py [--events 100000] [--rate 5000] [--seconds 20]

1. Sustained throughput at micro-batch 256 and 4096: the topic is filled first, then
   one worker drains it (decode, update, push to the SQLite online store, checkpoints);
   events/s counts from its first applied batch to its last, with where the time went.
   Then a group of ``--workers`` processes (one per core) drains it at 4096.
2. Freshness at a steady produce rate: event produced → its user's vector visible in
   the online store, p50/p99 over every event.

Prints a table and writes bench/results/stream_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from features.sources import write_sources
from features.store import FeatureRepo
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel
from streaming.broker import EmbeddedBroker, die_with_parent
from streaming.producer import ProducerConfig, produce
from streaming.worker import StreamWorker, WorkerConfig


def drain(cfg: WorkerConfig) -> StreamWorker:
    worker = StreamWorker(cfg)
    worker.run()
    return worker


def drain_group(cfg: WorkerConfig, n: int, work: Path) -> dict:
    """``n`` `recsys stream` processes in one group drain the topic together (one per core:
    a worker is one Python thread of work); events/s over the union of their apply spans."""
    procs = [subprocess.Popen(
        [sys.executable, "-m", "commands.cli", "stream", "--bootstrap-servers", cfg.bootstrap_servers, "--topic",
         cfg.topic, "--group", cfg.group, "--model", str(cfg.model), "--checkpoint-dir", str(cfg.checkpoint_dir),
         "--feature-repo", str(cfg.feature_repo), "--batch-size", str(cfg.batch_size), "--device", "cpu",
         "--worker-id", f"w{i}", "--idle-exit", str(cfg.idle_exit_s)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent) for i in range(n)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    done = [re.search(r"(\d+) events applied.*monotonic ([\d.]+) to ([\d.]+)", log) for log in logs]
    if not all(done):
        raise RuntimeError("a worker did not stop cleanly:\n" + "\n".join(log[-1500:] for log in logs))
    applied = sum(int(m[1]) for m in done)
    span = max(float(m[3]) for m in done) - min(float(m[2]) for m in done)
    return {"events": applied, "events_per_s": applied / span, "per_worker": [int(m[1]) for m in done]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=5000.0, help="produce rate for the freshness run")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the freshness run")
    ap.add_argument("--fresh-batch", type=int, default=1024, help="micro-batch of the freshness run")
    ap.add_argument("--freshness-only", action="store_true", help="skip the drain runs")
    ap.add_argument("--workers", type=int, default=2, help="processes in the group drain (one per core)")
    ap.add_argument("--out", default="bench/results/stream_throughput.json")
    args = ap.parse_args()

    import logging

    logging.basicConfig(level=logging.WARNING)
    ds = load_dataset("synthetic", n_events=args.events)
    frame = ds.interactions
    work = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    items = frame["item_id"].unique(maintain_order=True)
    model_path = work / "model.safetensors"
    NestedModel(NestedConfig(n_items=len(items))).save(model_path, item_ids=items.to_list())
    repo = FeatureRepo.create(work / "features")
    write_sources(ds, repo.path)
    repo.apply()

    broker = EmbeddedBroker.start(log_dir=work / "broker")
    rows = []
    try:
        for batch in () if args.freshness_only else (256, 4096):
            topic = f"bench-{batch}"
            produce(frame, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
            w = drain(WorkerConfig(model=model_path, checkpoint_dir=work / f"ckpt-{batch}", topic=topic,
                                        bootstrap_servers=broker.bootstrap_servers, group=topic,
                                        batch_size=batch, feature_repo=repo.path, idle_exit_s=3.0,
                                        device="cpu", log_every_s=1e9))
            s = w.stats()
            rows.append({"run": "drain", "batch": batch, "events": s.applied,
                         "events_per_s": s.applied / (s.last_apply - s.first_apply),
                         "us_per_event": {k: 1e6 * v / s.applied for k, v in s.seconds.items()}})

        for batch in () if args.freshness_only else (256, 4096):
            topic = f"bench-group-{batch}"
            produce(frame, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
            g = drain_group(WorkerConfig(model=model_path, checkpoint_dir=work / f"ckpt-group-{batch}", topic=topic,
                                         bootstrap_servers=broker.bootstrap_servers, group=topic, batch_size=batch,
                                         feature_repo=repo.path, idle_exit_s=3.0), args.workers, work)
            rows.append({"run": f"drain, {args.workers} workers", "batch": batch, **g, "us_per_event": {}})

        topic = "bench-fresh"
        n = int(args.rate * args.seconds)
        w = StreamWorker(WorkerConfig(model=model_path, checkpoint_dir=work / "ckpt-fresh", topic=topic,
                                      bootstrap_servers=broker.bootstrap_servers, group=topic,
                                      batch_size=args.fresh_batch, feature_repo=repo.path, idle_exit_s=3.0,
                                      device="cpu", log_every_s=1e9))

        def flow() -> None:
            """A producer process (not a thread: it would share the worker's GIL), started
            once the worker has joined the group and owns the partitions."""
            while not w.joined:
                time.sleep(0.05)
            subprocess.run([sys.executable, "-m", "commands.cli", "produce", "--data", "synthetic", "--bootstrap-servers",
                            broker.bootstrap_servers, "--topic", topic, "--events", str(args.events),
                            "--limit", str(n), "--rate", str(args.rate)], check=True, capture_output=True)

        producer = threading.Thread(target=flow)
        producer.start()
        w.run()
        producer.join()
        sums = {s.name: s.value for m in w.metrics.registry.collect() for s in m.samples}
        writes = sums["recsys_stream_push_seconds_count"]
        s = w.stats()
        rows.append({"run": f"freshness @ {args.rate:,.0f} ev/s", "batch": args.fresh_batch, "events": s.applied,
                     "events_per_s": s.applied / (s.last_apply - s.first_apply),
                     "freshness_p50_ms": 1e3 * float(np.quantile(s.freshness_s, 0.5)),
                     "freshness_p99_ms": 1e3 * float(np.quantile(s.freshness_s, 0.99)),
                     "applied_p50_ms": 1e3 * float(np.quantile(s.applied_s, 0.5)),
                     "applied_p99_ms": 1e3 * float(np.quantile(s.applied_s, 0.99)),
                     "store_writes": writes, "store_write_ms_mean": 1e3 * sums["recsys_stream_push_seconds_sum"] / writes,
                     "store_write_rows_mean": sums["recsys_stream_push_rows_sum"] / writes,
                     "us_per_event": {k: 1e6 * v / s.applied for k, v in s.seconds.items()}})
    finally:
        broker.stop()

    print(f"stream worker, synthetic {args.events:,} events, SQLite online store, torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'run':<24}{'batch':>6}{'events':>9}{'ev/s':>9}  {'µs/event: poll decode update push ckpt':<40}"
          f"{'applied p50/p99 ms':>20}{'in store p50/p99 ms':>21}")
    for r in rows:
        us = r["us_per_event"]
        parts = " ".join(f"{us.get(k, 0):.0f}" for k in ("poll", "decode", "update", "push", "checkpoint"))
        applied, fresh = ((f"{r['applied_p50_ms']:.0f}/{r['applied_p99_ms']:.0f}",
                           f"{r['freshness_p50_ms']:.0f}/{r['freshness_p99_ms']:.0f}") if "freshness_p50_ms" in r else ("", ""))
        print(f"{r['run']:<24}{r['batch']:>6}{r['events']:>9,}{r['events_per_s']:>9,.0f}  {parts:<40}"
              f"{applied:>20}{fresh:>21}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"events": args.events, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
