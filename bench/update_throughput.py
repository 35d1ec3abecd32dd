"""Fast-level update and scoring throughput of the nested model, CPU and CUDA side by side.

    python bench/update_throughput.py [--data synthetic|ml-1m] [--events 200000]

Replays the log's events in time order through `NestedModel.update` at micro-batch 256
and 4096 (the stream worker's path, no broker), then scores batches of users over the
whole catalogue. It runs the compiled recurrence (Numba on the CPU, the fused Triton
kernel on CUDA) and the eager per-step loop side by side. On the CPU it also runs replay v2
itself (`offline_eval.replay.replay_model`, B = 256: each event's user read just before it,
scored over the catalogue, seen items filtered) for the nested model (compiled and eager)
and for decayed popularity, side by side: their ratio is the figure that a shared
machine's speed does not change (the nested model is untrained here, its shapes and
population speeds as `recsys replay` sets them). Prints a table and writes
bench/results/update_throughput.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from offline_eval.nested import NestedReplay
from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from recsys import compiled_memory, fused_update
from offline_eval.baselines import DecayedPop
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel, population_defaults, write_log


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def update_rate(model, log, batch: int, device: str, max_events: int) -> dict:
    state = model.init_state(log.n_users_known, log.n_items_known, device=device)
    users, items, ts = (torch.from_numpy(a[:max_events]).to(device) for a in (log.users, log.items, log.ts))
    warm = min(len(users), 4 * batch)
    state = model.update(state, users[:warm], items[:warm], ts[:warm], donate=True)  # allocations, first-call costs
    _sync(device)
    t0, steps = time.perf_counter(), []
    for lo in range(warm, len(users), batch):
        u = users[lo:lo + batch]
        steps.append(int(torch.unique(u, return_counts=True)[1].max()))
        state = model.update(state, u, items[lo:lo + batch], ts[lo:lo + batch], donate=True)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"events_per_s": (len(users) - warm) / seconds, "mean_steps_per_batch": float(np.mean(steps)),
            "state": state}


def score_rate(model, state, n_items: int, batch: int, device: str, repeats: int = 20) -> float:
    users = torch.arange(batch, device=device) % state.n_users
    model.score(state, users, n_items)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.score(state, users, n_items)
    _sync(device)
    return batch * repeats / (time.perf_counter() - t0)


def replay_rates(log, max_events: int) -> dict[str, float]:
    """Replay v2's events/s on the log's first ``max_events`` stream events: the nested model
    (untrained, the history written into its fast state) and decayed popularity."""
    history = log.history()
    end = log.n_history + max_events
    stream = replace(log, users=log.users[:end], items=log.items[:end], ts=log.ts[:end])
    nested = NestedReplay()
    torch.manual_seed(0)
    nested.model = NestedModel(NestedConfig(n_items=history.n_items_known,
                                            **population_defaults(history.n_events, history.ts))).eval()
    with torch.no_grad():
        nested.state = write_log(nested.model, nested.model.init_state(history.n_users_known, history.n_items_known),
                                 history, 4096)
    popularity = DecayedPop()
    popularity.fit(history)
    start = copy.deepcopy(nested.state)
    rates = {}
    for name, model, compiled in (("pop_online_decay", popularity, True), ("nested", nested, True),
                                  ("nested, eager loop", nested, False)):
        compiled_memory.ENABLED = compiled
        nested.state = copy.deepcopy(start)  # each nested replay from the history's state
        result = replay_model(model, stream, ProtocolConfig(), name, progress=False, fitted=True)
        rates[name] = (stream.n_events - stream.n_history) / result.replay_seconds
    compiled_memory.ENABLED = True
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="synthetic")
    ap.add_argument("--events", type=int, default=200_000, help="events replayed per setting")
    ap.add_argument("--out", default="bench/results/update_throughput.json")
    args = ap.parse_args()

    ds = load_dataset(args.data, **({"n_events": args.events} if args.data == "synthetic" else {}))
    log = encode(ds)
    # The compiled recurrence (Numba on the CPU, Triton on CUDA) and the eager per-step loop, side by side.
    setups = [("cpu", "cpu", True), ("cpu-eager", "cpu", False)]
    if torch.cuda.is_available():
        setups += [("cuda", "cuda", True), ("cuda-eager", "cuda", False)]
    rows = []
    for label, device, compiled in setups:
        fused_update.ENABLED = compiled_memory.ENABLED = compiled
        torch.manual_seed(0)
        model = NestedModel(NestedConfig(n_items=log.n_items_known)).to(device).eval()
        for batch in (256, 4096):
            r = update_rate(model, log, batch, device, args.events)
            rows.append({"device": label, "what": "update", "batch": batch, "per_s": r["events_per_s"],
                         "mean_steps": r["mean_steps_per_batch"]})
        for batch in (1, 256):
            rows.append({"device": label, "what": "score", "batch": batch,
                         "per_s": score_rate(model, r["state"], log.n_items_known, batch, device), "mean_steps": None})

    replay = replay_rates(log, args.events)
    for name, per_s in replay.items():
        rows.append({"device": "cpu", "what": f"replay v2 {name}", "batch": 256, "per_s": per_s, "mean_steps": None})
    ratio = replay["nested"] / replay["pop_online_decay"]
    walk = replay["nested"] / replay["nested, eager loop"]

    print(f"{args.data}: {min(args.events, log.n_events):,} events, {log.n_users_known:,} users, "
          f"{log.n_items_known:,} items; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'device':<11}{'what':<30}{'batch':>7}{'per second':>14}{'steps/batch':>13}")
    for r in rows:
        steps = f"{r['mean_steps']:.1f}" if r["mean_steps"] is not None else ""
        unit = "users" if r["what"] == "score" else "events"
        print(f"{r['device']:<11}{r['what']:<30}{r['batch']:>7}{r['per_s']:>14,.0f}{steps:>13}  {unit}")
    print(f"replay v2: nested / decayed popularity = {ratio:.2f} (the same run; the issue's line is 20,000 "
          f"events/s for the nested replay of ML-1M on 2 cores)")
    print(f"replay v2: nested, compiled walk / eager loop = {walk:.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": args.data, "events": args.events, "host": platform.node(),
                               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                               "rows": rows, "replay_ratio_nested_to_pop_online_decay": ratio,
                               "replay_ratio_compiled_to_eager": walk}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
