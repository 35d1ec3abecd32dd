"""Serving: HTTP load over loopback at rising request rates, and torch eager vs ONNX Runtime.

    python bench/serving_load.py [--seconds 30] [--rates 50,100,200,400] [--post-share 0.05]
                                 [--ingest-rate 2000]

The ML-1M catalogue (3,416 items), k = 10, user vectors for 2,000 users in a SQLite
Feast online store; `recsys serve` runs as its own process (one uvicorn worker) and an
open-loop asyncio client fires requests on a fixed schedule, so a slow server cannot
slow the offered load. The realistic mix: a share of the requests are `POST /events`
(answered once the broker acknowledged), while a stream worker applies ML-1M at
``--ingest-rate`` events/s and pushes to the same online store the server reads.
Prints a table and writes bench/results/serving_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch

from features.sources import write_sources
from features.store import FeatureRepo, population_key
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel
from serving.export import association_example, export_onnx, scorer_from_model
from streaming.broker import EmbeddedBroker, die_with_parent, free_port


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; nan elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine so far, all cores (Linux /proc/stat)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle and iowait are not busy
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


async def load_level(url: str, users: list[str], items: list[str], rate: float, seconds: float, post_share: float,
                     key: str, server_pid: int) -> dict:
    """One open-loop level. A request's latency runs from when the schedule says it is sent, so a
    client or a server that falls behind shows in the figures instead of hiding in a queue
    (no coordinated omission); ``client_late_p99_ms`` says how late the client itself was.
    Besides latencies, the CPU share (of one core) the client and the server used meanwhile,
    and how busy the whole machine was: a server well below 100 % on a machine near 100 %
    waits for a core, not for work."""
    latencies, errors, posts, post_latencies, answered, shed, late, degraded = [], 0, 0, [], [], 0, [], 0
    server_hist0 = server_latency(url)
    cpu0, server0, machine0 = time.process_time(), cpu_seconds(server_pid), machine_busy()
    rng = np.random.default_rng(int(rate))
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) as client:
        async def one(user: str, post: bool, scheduled: float) -> None:
            nonlocal errors, shed, degraded
            late.append(time.perf_counter() - scheduled)
            turned_away = ok = False
            try:
                if post:
                    event = {"user_id": user, "item_id": items[int(rng.integers(len(items)))], "ts": int(time.time())}
                    async with client.post(f"{url}/events", json=event, headers={"X-API-Key": key}) as r:
                        body = await r.text()
                        ok = r.status == 202
                else:
                    async with client.get(f"{url}/recommendations/{user}", params={"k": "10"}) as r:
                        body = await r.text()
                        ok = r.status == 200
                        degraded += ok and '"degraded"' in body  # answered, with the population's list
                turned_away = r.status == 503 and "in flight" in body  # admission control, by design
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            latencies.append(time.perf_counter() - scheduled)
            if post:
                post_latencies.append(latencies[-1])
            if turned_away:
                shed += 1
            elif ok:
                answered.append(latencies[-1])
            else:
                errors += 1

        start, tasks = time.perf_counter(), []
        for n in range(int(rate * seconds)):
            scheduled = start + n / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            post = rng.random() < post_share
            posts += post
            tasks.append(asyncio.create_task(one(users[n % len(users)], post, scheduled)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    client_cpu, server_cpu = (time.process_time() - cpu0) / wall, (cpu_seconds(server_pid) - server0) / wall
    machine1 = machine_busy()
    machine_cpu = (machine1[0] - machine0[0]) / (machine1[1] - machine0[1])
    lat, post_lat = np.asarray(latencies) * 1e3, np.asarray(post_latencies or [np.nan]) * 1e3
    ok_lat = np.asarray(answered or [np.nan]) * 1e3
    server_p99 = histogram_quantile(server_hist0, server_latency(url), 0.99)
    return {"rate": rate, "requests": len(lat), "posts": posts, "achieved_rps": len(lat) / wall, "errors": errors,
            "shed": shed, "shed_share": shed / max(len(lat), 1),
            "degraded": degraded, "degraded_share": degraded / max(len(lat), 1), "answered_rps": len(answered) / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "answered_p99_ms": float(np.percentile(ok_lat, 99)), "server_p99_ms": server_p99,
            "post_p50_ms": float(np.percentile(post_lat, 50)), "post_p99_ms": float(np.percentile(post_lat, 99)),
            "client_late_p99_ms": float(np.percentile(np.asarray(late) * 1e3, 99)),
            "client_cpu": client_cpu, "server_cpu": server_cpu, "machine_cpu": machine_cpu}


def server_latency(url: str) -> dict[float, float]:
    """The server's own latency histogram of GET /recommendations: bucket bound (s) -> count."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith("recsys_serve_latency_seconds_bucket") and "/recommendations/" in line:
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            out[float("inf") if bound == "+Inf" else float(bound)] = float(line.rsplit(" ", 1)[1])
    return out


def histogram_quantile(before: dict, after: dict, q: float) -> float:
    """The upper bound (ms) of the bucket holding quantile ``q`` of what came between two reads:
    the server's view, which starts its clock when the app sees the request, after any queue."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    total = counts[-1][1] if counts else 0.0
    for bound, n in counts:
        if total and n >= q * total:
            return bound * 1e3
    return float("nan")


def _caught_up(log: Path, rate: float) -> bool:
    """The worker's latest log line says it is less than a second behind."""
    lines = [ln for ln in log.read_text().splitlines() if "| lag " in ln] if log.exists() else []
    lag = lines[-1].split("| lag ")[1].split(" |")[0].replace(",", "") if lines else "n/a"
    return lag.isdigit() and int(lag) < rate


def eager_vs_onnx(checkpoint: Path, onnx_path: Path, repeats: int = 2000) -> dict:
    import onnxruntime as ort

    scorer, _, _ = scorer_from_model(checkpoint)
    N, D = scorer.E.shape
    user, absent, pop, mask = torch.randn(1, D), torch.zeros(1), torch.zeros(N), torch.zeros(1, N, dtype=torch.bool)
    extra = torch.zeros(0)  # no items past the table
    inputs = (user, absent, pop, mask, extra)
    if scorer.association is not None:  # a read of 4 partitions × the latest 10 items × 64 slots
        inputs += association_example(1, 4 * 10 * 64, len(scorer.association.shares), N, torch.Generator())
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(scorer.input_names(), inputs)}
    torch.set_num_threads(1)
    out = {}
    for name, fn in (("torch eager", lambda: scorer(*inputs)), ("onnx runtime", lambda: session.run(None, feeds))):
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
    ap.add_argument("--post-share", type=float, default=0.05, help="share of requests that are POST /events")
    ap.add_argument("--ingest-rate", type=float, default=2000.0,
                    help="events/s a stream worker applies and pushes to the same store meanwhile (0: none)")
    ap.add_argument("--max-in-flight", type=int, default=0, help="the server's admission bound (0: its default)")
    ap.add_argument("--out", default="bench/results/serving_load.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ds = load_dataset("ml-1m")
    items = ds.interactions["item_id"].unique(maintain_order=True)
    ckpt = work / "model.safetensors"
    # As `recsys train` makes it: with the association level (its speeds as ML-1M's history sets them).
    NestedModel(NestedConfig(n_items=len(items), assoc_half_lives_s=(86400.0, 1024 * 86400.0))).save(
        ckpt, item_ids=items.to_list())
    check = export_onnx(ckpt, work / "model.onnx")
    repo = FeatureRepo.create(work / "features")
    write_sources(ds, repo.path)
    repo.apply()
    users = [str(u) for u in ds.interactions["user_id"].unique().head(2000).to_list()]
    vectors = np.random.default_rng(0).normal(size=(len(users), 64)).astype(np.float32)
    repo.push_user_state(users + [population_key(0)], [*vectors, np.zeros(len(items), np.float32)])

    broker = EmbeddedBroker.start(log_dir=work / "broker")
    recsys = [sys.executable, "-m", "commands.cli"]
    kafka = ["--bootstrap-servers", broker.bootstrap_servers, "--topic", "interactions"]
    key, port = secrets.token_urlsafe(16), free_port()
    admission = ["--max-in-flight", str(args.max_in_flight)] if args.max_in_flight else []
    procs = [subprocess.Popen([*recsys, "serve", "--model", str(work / "model.onnx"), "--feature-repo", str(repo.path),
                               "--port", str(port), *kafka, *admission], env=os.environ | {"RECSYS_API_KEY": key},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)]
    server = procs[0]
    if args.ingest_rate > 0:
        procs.append(subprocess.Popen([*recsys, "stream", *kafka, "--model", str(ckpt), "--checkpoint-dir",
                                       str(work / "ckpt"), "--feature-repo", str(repo.path), "--log-every", "2"],
                                      stdout=(work / "worker.log").open("w"), stderr=subprocess.STDOUT,
                                      preexec_fn=die_with_parent))
        procs.append(subprocess.Popen([*recsys, "produce", "--data", "ml-1m", "--rate", str(args.ingest_rate), *kafka],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent))
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
        while args.post_share and not httpx.get(f"{url}/healthz").json()["kafka"]:
            assert time.monotonic() < deadline, "the server did not connect to the broker"
            time.sleep(0.2)
        print("[bench] waiting for the worker to catch up with the producer", file=sys.stderr, flush=True)
        if args.ingest_rate > 0:  # measure the steady state: the worker has caught up with the producer
            while not _caught_up(work / "worker.log", args.ingest_rate):
                assert time.monotonic() < deadline + 300, "the worker did not catch up with the producer"
                time.sleep(0.5)
        item_ids = items.cast(str).to_list()
        levels = []
        for r in args.rates.split(","):
            print(f"[bench] {r} req/s for {args.seconds:.0f} s", file=sys.stderr, flush=True)
            levels.append(asyncio.run(load_level(url, users, item_ids, float(r), args.seconds, args.post_share, key,
                                                 server.pid)))
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(30)
        broker.stop()
    applied = [ln for ln in (work / "worker.log").read_text().splitlines() if "ev/s |" in ln] if args.ingest_rate else []
    scoring = eager_vs_onnx(ckpt, work / "model.onnx")

    print(f"ML-1M catalogue {check.n_items:,} items, k = 10, provider {health['provider']}, "
          f"{args.seconds:.0f} s per level, export max |diff| {check.max_abs_diff:.1e}, {args.post_share:.0%} POST, "
          f"worker ingesting {args.ingest_rate:,.0f} ev/s (last log line: {applied[-1].split('] ')[-1] if applied else 'n/a'})")
    print(f"{'offered rps':>12}{'answered':>10}{'shed':>7}{'degraded':>10}{'posts':>7}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'answered p99':>14}{'server p99':>12}{'POST p99':>10}{'client late':>13}{'client CPU':>12}{'server CPU':>12}{'machine':>9}")
    for lv in levels:
        print(f"{lv['rate']:>12,.0f}{lv['answered_rps']:>10,.0f}{lv['shed_share']:>7.0%}{lv['degraded_share']:>10.0%}{lv['posts']:>7}{lv['errors']:>8}"
              f"{lv['p50_ms']:>9.2f}{lv['p99_ms']:>9.2f}{lv['answered_p99_ms']:>14.2f}{lv['server_p99_ms']:>12.1f}"
              f"{lv['post_p99_ms']:>10.2f}{lv['client_late_p99_ms']:>13.1f}{lv['client_cpu']:>12.0%}{lv['server_cpu']:>12.0%}{lv['machine_cpu']:>9.0%}")
    print("p99 ms: every request, client side, from its scheduled send time (a 503 is answered fast); answered p99: "
          "the 200/202s; server p99: the server's histogram, from when the app sees a request (bucket bound); "
          "client late: p99 of how far behind its schedule the client sent (large: the client, not the server, is the limit)")
    print(f"{'scoring, batch 1':<18}{'p50 µs':>9}{'p99 µs':>9}")
    for name, r in scoring.items():
        print(f"{name:<18}{r['p50_us']:>9.0f}{r['p99_us']:>9.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"levels": levels, "scoring_batch1": scoring, "provider": health["provider"],
                               "seconds_per_level": args.seconds, "post_share": args.post_share,
                               "ingest_rate": args.ingest_rate, "worker_last_line": applied[-1] if applied else None},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
