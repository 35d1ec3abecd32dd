"""Serving: HTTP load over loopback at rising request rates, and torch eager vs ONNX Runtime.

    python bench/serving_load.py [--seconds 30] [--rates 50,100,200,400]

The ML-1M catalogue (3,416 items), k = 10, user vectors for 2,000 users in a SQLite
Feast online store; `recsys serve` runs as its own process (one uvicorn worker) and an
open-loop asyncio client fires requests on a fixed schedule, so a slow server cannot
slow the offered load. Prints a table and writes bench/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from features.sources import write_sources
from features.store import POPULATION_KEY, FeatureRepo
from recsys.datasets import load_dataset
from recsys.nested_model import NestedConfig, NestedModel
from serving.export import export_onnx, scorer_from_checkpoint
from streaming.broker import free_port


async def load_level(url: str, users: list[str], rate: float, seconds: float) -> dict:
    latencies, errors = [], 0
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=500)) as client:
        async def one(user: str) -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                r = await client.get(f"{url}/recommendations/{user}", params={"k": 10}, timeout=10)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

        start, tasks = time.perf_counter(), []
        for n in range(int(rate * seconds)):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(users[n % len(users)])))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    lat = np.asarray(latencies) * 1e3
    return {"rate": rate, "requests": len(lat), "achieved_rps": len(lat) / wall, "errors": errors,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def eager_vs_onnx(checkpoint: Path, onnx_path: Path, repeats: int = 2000) -> dict:
    import onnxruntime as ort

    scorer, _, _ = scorer_from_checkpoint(checkpoint)
    N, D = scorer.E.shape
    user, absent, pop, mask = torch.randn(1, D), torch.zeros(1), torch.zeros(N), torch.zeros(1, N, dtype=torch.bool)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {"user": user.numpy(), "absent_s": absent.numpy(), "population": pop.numpy(), "exclude": mask.numpy()}
    torch.set_num_threads(1)
    out = {}
    for name, fn in (("torch eager", lambda: scorer(user, absent, pop, mask)), ("onnx runtime", lambda: session.run(None, feeds))):
        with torch.no_grad():
            for _ in range(100):
                fn()
            t = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                t.append(time.perf_counter() - t0)
        out[name] = {"p50_us": 1e6 * float(np.median(t)), "p99_us": 1e6 * float(np.percentile(t, 99))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="per load level")
    ap.add_argument("--rates", default="50,100,200,400", help="requests per second, comma-separated")
    ap.add_argument("--out", default="bench/results/serving_load.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ds = load_dataset("ml-1m")
    items = ds.interactions["item_id"].unique(maintain_order=True)
    ckpt = work / "model.safetensors"
    NestedModel(NestedConfig(n_items=len(items))).save(ckpt, item_ids=items.to_list())
    check = export_onnx(ckpt, work / "model.onnx")
    repo = FeatureRepo.create(work / "features")
    write_sources(ds, repo.path)
    repo.apply()
    users = [str(u) for u in ds.interactions["user_id"].unique().head(2000).to_list()]
    vectors = np.random.default_rng(0).normal(size=(len(users), 64)).astype(np.float32)
    repo.push_user_state(users + [POPULATION_KEY], [*vectors, np.zeros(len(items), np.float32)])

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "recsys.cli", "serve", "--model", str(work / "model.onnx"),
                               "--feature-repo", str(repo.path), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/healthz").json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and server.poll() is None, "server did not start"
                time.sleep(0.2)
        levels = [asyncio.run(load_level(url, users, float(r), args.seconds)) for r in args.rates.split(",")]
    finally:
        server.terminate()
        server.wait(30)
    scoring = eager_vs_onnx(ckpt, work / "model.onnx")

    print(f"ML-1M catalogue {check.n_items:,} items, k = 10, provider {health['provider']}, "
          f"{args.seconds:.0f} s per level, export max |diff| {check.max_abs_diff:.1e}")
    print(f"{'offered rps':>12}{'achieved':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}")
    for lv in levels:
        print(f"{lv['rate']:>12,.0f}{lv['achieved_rps']:>10,.0f}{lv['errors']:>8}{lv['p50_ms']:>9.2f}"
              f"{lv['p99_ms']:>9.2f}")
    print(f"{'scoring, batch 1':<18}{'p50 µs':>9}{'p99 µs':>9}")
    for name, r in scoring.items():
        print(f"{name:<18}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"levels": levels, "scoring_batch1": scoring, "provider": health["provider"],
                               "seconds_per_level": args.seconds}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
