"""How far the served ranking follows a fresh session: the demo's check over many users.

    python bench/demo_reaction.py [--events 100000] [--users 200] [--model PATH]

`make demo` posts six events of one taste group for one user and counts that group's items
in the served top 10 before and after. One user is one draw; this runs the same step for
``--users`` users on the demo's synthetic log (`commands.demo.session_reaction`) and prints
the distribution beside what the log's own generator ranks for the same session (the
`oracle`) and what the personal part alone ranks. The model is trained as the demo trains
it (the first 80 % of the log; ``--model``: a saved one). Prints a table and writes
bench/results/demo_reaction.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from commands.demo import DemoConfig, session_reaction
from commands.train import train_artifact
from recsys.datasets import load_dataset
from recsys.nested import NestedModel
from recsys.train import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=DemoConfig.events)
    ap.add_argument("--users", type=int, default=200)
    ap.add_argument("--model", type=Path, help="a saved model (default: train one as the demo does)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/demo_reaction.json"))
    args = ap.parse_args()
    cfg = DemoConfig(events=args.events)

    ds = load_dataset("synthetic", n_events=args.events)
    path = args.model
    if path is None:
        path = Path(tempfile.mkdtemp()) / "model.safetensors"
        train_artifact(ds, path, TrainConfig(epochs=cfg.epochs, progress=False))
    counted = session_reaction(ds, path, args.users, cfg)

    rows = {name: {"mean": float(np.mean(c)), "at_least_3": float(np.mean(np.array(c) >= 3)),
                   "histogram": np.bincount(c, minlength=cfg.k + 1).tolist()} for name, c in counted.items()}
    model = NestedModel.load(path)
    mix = {"population_weight": round(model.pop_weight.item(), 4), "share": float(model.pop_share),
           "fade": model.fade.item()}
    print(f"{len(counted['served'])} users of the synthetic log ({args.events:,} events), {cfg.new_events} events of "
          f"one group each; the served mix: {mix}")
    print(f"| ranking | the group's items in the top {cfg.k}, mean | users with ≥ 3 | users with 0 … {cfg.k} |")
    print("| --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['mean']:.2f} | {r['at_least_3']:.0%} | {r['histogram']} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"events": args.events, "mix": mix, "rankings": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
