"""Online feature lookup latency (p50/p99) for 1 and 64 users: SQLite, and Redis when a
local `redis-server` is on PATH. Prints a table and writes bench/results/feature_lookup.json.

    .venv/bin/python bench/feature_lookup.py [--repeats 300]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features.sources import write_sources  # noqa: E402
from features.store import FeatureRepo  # noqa: E402
from recsys.datasets import load_dataset  # noqa: E402
from streaming.broker import free_port  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t) * 1000)
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def measure(online: str, repeats: int) -> list[dict]:
    ds = load_dataset("synthetic", n_users=2000, n_items=3000, n_events=100_000, seed=0)
    repo = FeatureRepo.create(Path(tempfile.mkdtemp()), online=online)
    write_sources(ds, repo.path)
    repo.apply()
    repo.materialize()
    items = ds.interactions["item_id"].unique(maintain_order=True).to_list()
    users = np.arange(1, 2001)
    repo.push_user_state(users, np.random.default_rng(0).normal(size=(len(users), 64)), events=np.ones(len(users)))
    rows = []
    for n in (1, 64):
        ids = users[:n]
        for what, fn in (("user_state", lambda: repo.user_state(ids)),
                         ("item attributes", lambda: repo.item_attributes(items[:n]))):
            p50, p99 = _timed(fn, repeats)
            rows.append({"store": online, "users": n, "features": what, "p50_ms": round(p50, 3),
                         "p99_ms": round(p99, 3)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    rows = measure("sqlite", args.repeats)
    redis = shutil.which("redis-server")
    if redis:
        import os

        port = free_port()
        proc = subprocess.Popen([redis, "--port", str(port), "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL)
        os.environ["REDIS_CONNECTION"] = f"127.0.0.1:{port}"
        time.sleep(0.5)
        try:
            rows += measure("redis", args.repeats)
        finally:
            proc.terminate()
    else:
        print("redis-server not on PATH: Redis skipped (apt-get install redis-server to include it)")
    print(f"{'store':<8}{'users':>6}  {'features':<24}{'p50 ms':>9}{'p99 ms':>9}")
    for r in rows:
        print(f"{r['store']:<8}{r['users']:>6}  {r['features']:<24}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "feature_lookup.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
