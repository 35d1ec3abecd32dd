"""`recsys`: the one command-line entry point.

Each subcommand parses its arguments into a config and calls one function; heavy
imports (torch, feast, kafka) happen inside the command that needs them, so
``recsys --help`` and ``recsys broker status`` start instantly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from commands.allocator import keep_freed_memory
from offline_eval.model_names import ABLATIONS, AVAILABLE_MODELS, DEFAULT_MODELS
from recsys.dataset import HISTORY_FRACTION
from recsys.log_contract import TS_UNITS, ReadConfig, parse_columns


def _data_args(p: argparse.ArgumentParser, default: str | None = None, required: bool = True) -> None:
    """The log a command reads, under the input contract of docs/data.md. Without a default,
    ``--data`` is required: no command silently falls back to the synthetic log."""
    p.add_argument("--data", required=required and default is None, default=default,
                   help="ml-1m | synthetic | synthetic-kinds | PATH (an ml-1m folder, or a CSV/TSV/Parquet log: docs/data.md)")
    p.add_argument("--columns", default=None,
                   help="the log's column names, e.g. user=customer,item=sku,ts=time (also event_type=, value=); "
                        "default: user_id/item_id/ts and their usual synonyms (docs/data.md)")
    p.add_argument("--ts-unit", choices=TS_UNITS, default="auto",
                   help="unit of the timestamp column; auto tells s, ms, us, ns and ISO-8601 apart by their values")
    p.add_argument("--item-columns", default="",
                   help="comma-separated columns that describe the item (e.g. price,category): served beside it")
    p.add_argument("--max-bad-rows", type=float, default=ReadConfig.max_bad_fraction,
                   help="bad rows (empty ids or ts, unparsable ts, ragged) are dropped and counted; more than this "
                        "share rejects the file")
    p.add_argument("--events", type=int, default=None, help="synthetic only: number of events")
    p.add_argument("--seed", type=int, default=0, help="synthetic only: generator seed")


def _read_config(args) -> ReadConfig:
    return ReadConfig(columns=parse_columns(args.columns), ts_unit=args.ts_unit,
                      item_columns=tuple(c.strip() for c in args.item_columns.split(",") if c.strip()),
                      max_bad_fraction=args.max_bad_rows)


def _load(args):
    from recsys.datasets import load_dataset

    kwargs = {"read": _read_config(args)}
    if args.data in ("synthetic", "synthetic-kinds"):
        kwargs = {"seed": args.seed} | ({"n_events": args.events} if args.events else {})
        print(f"recsys {args.command}: using the {args.data} log (seed {args.seed}); pass --data FILE for your own",
              file=sys.stderr)
    ds = load_dataset(args.data, **kwargs)
    if "read" in ds.extra:  # what was read, how, and what was dropped: never a silent guess
        print(f"recsys {args.command}: read {ds.extra['read'].summary()}", file=sys.stderr)
    return ds


def cmd_broker(args) -> int:
    from streaming.broker import EmbeddedBroker

    state_dir = Path(args.state_dir)
    current = EmbeddedBroker.load(state_dir)
    if args.action == "status":
        if current and current.is_running():
            print(f"running: pid {current.pid}, bootstrap servers {current.bootstrap_servers}")
            return 0
        print("not running")
        return 3
    if args.action == "stop":
        if current is None:
            print("not running")
            return 0
        stopped = current.stop()
        EmbeddedBroker.forget(state_dir)
        print(f"stopped broker pid {current.pid}" if stopped else
              f"the broker (pid {current.pid}) had already exited; that pid is not it now, so nothing was signalled")
        return 0
    if current and current.is_running():
        print(f"already running: {current.bootstrap_servers}")
        return 0
    broker = EmbeddedBroker.start(port=args.port, log_dir=state_dir, outlive_parent=True)
    broker.save(state_dir)
    print(f"broker ready: bootstrap servers {broker.bootstrap_servers} (pid {broker.pid}, log {broker.log_path})")
    return 0


def cmd_produce(args) -> int:
    from streaming.producer import ProducerConfig, produce

    ds = _load(args)
    frame = ds.interactions if args.limit is None else ds.interactions.head(args.limit)
    summary = produce(frame, ProducerConfig(args.bootstrap_servers, args.topic, rate=args.rate))
    print(f"produced {summary.sent:,} events to {args.topic!r} in {summary.seconds:.1f}s "
          f"({summary.events_per_second:,.0f} ev/s)")
    return 0


def cmd_consume(args) -> int:
    from streaming.consumer import ReaderConfig, read_topic

    s = read_topic(ReaderConfig(args.bootstrap_servers, args.topic, count=args.count,
                                idle_timeout_s=args.idle_timeout))
    print(json.dumps({"messages": s.messages, "valid": s.valid, "rejected": dict(s.rejected),
                      "duplicate_offsets": s.duplicate_offsets, "seconds": round(s.seconds, 2),
                      "events_per_second": round(s.events_per_second)}, indent=2))
    return 0 if args.count is None or s.messages >= args.count else 1


def cmd_replay(args) -> int:
    from offline_eval.protocol import ProtocolConfig
    from offline_eval.report import ReplayConfig, markdown_table, run_replay

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    names = [n for name in names for n in (ABLATIONS if name == "ablations" else (name,))]
    cfg = ReplayConfig(models=tuple(dict.fromkeys(names)),
                       protocol=ProtocolConfig(batch_size=args.batch_size, seen_filter=not args.no_seen_filter,
                                               user_freshness=args.user_freshness),
                       out=Path(args.out), fit_cache=None if args.no_fit_cache else Path(args.fit_cache))
    broker = None
    if args.through_kafka and args.bootstrap_servers is None:  # the embedded default, for this run only
        from streaming.broker import EmbeddedBroker

        broker = EmbeddedBroker.start(log_dir=Path(args.out) / "broker")
    if args.through_kafka:
        cfg = replace(cfg, through_kafka=args.bootstrap_servers or broker.bootstrap_servers,
                      workdir=Path(args.out) / "worker")
    try:
        report = run_replay(_load(args), cfg)
    finally:
        if broker is not None:
            broker.stop()
    print(markdown_table(report))
    print(f"report: {Path(args.out) / 'report.json'} (+ report.md, plots); wall {report['wall_seconds']:.0f}s")
    return 0


def cmd_train(args) -> int:
    from commands.train import train_artifact
    from recsys.train import TrainConfig

    t0 = time.perf_counter()
    device, world = args.device, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # launched by torchrun: data parallel, one replica per process
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if device == "cuda" else "gloo")
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    cfg = TrainConfig(epochs=args.epochs, device=device, lr=args.lr, shard=args.shard)
    model = train_artifact(_load(args), Path(args.out), cfg, history_fraction=args.history_fraction).model
    if world > 1:
        import torch.distributed as dist

        # Equal on every rank when the gradients were averaged: the replicas never drift apart
        # (sharded, the table is gathered back into every rank's copy before it is saved).
        checksum = sum(float(p.double().sum()) for p in model.parameters())
        print(f"rank {dist.get_rank()}/{world}: parameter checksum {checksum:.12e}")
        dist.destroy_process_group()
    print(f"trained nested model ({model.n_items:,} items, dim {model.cfg.dim}) in "
          f"{time.perf_counter() - t0:.0f}s: {args.out}")
    return 0


def cmd_features(args) -> int:
    from features.store import FeatureRepo

    if args.action == "apply":
        from features.sources import write_sources

        if args.data is None:
            raise ValueError("features apply reads the log: pass --data (the same log as `recsys train`)")
        repo = FeatureRepo.create(Path(args.repo), online=args.online)
        counts = write_sources(_load(args), repo.path)
        repo.apply()
        print(f"feature repo {repo.path}: applied; offline sources {counts}")
    else:
        FeatureRepo(Path(args.repo)).materialize()
        print(f"feature repo {args.repo}: materialized to the online store")
    return 0


def cmd_stream(args) -> int:
    from streaming.worker import WorkerConfig, run_worker

    cfg = WorkerConfig(model=Path(args.model), checkpoint_dir=Path(args.checkpoint_dir),
                       bootstrap_servers=args.bootstrap_servers, topic=args.topic, group=args.group,
                       dead_letter_topic=args.dead_letter_topic, worker_id=args.worker_id or socket.gethostname(),
                       batch_size=args.batch_size, max_wait_s=args.max_wait_ms / 1000,
                       checkpoint_every_s=args.checkpoint_every, feature_repo=args.feature_repo and Path(args.feature_repo),
                       device=args.device or WorkerConfig.device, metrics_port=args.metrics_port,
                       metrics_host=args.metrics_host, log_every_s=args.log_every, idle_exit_s=args.idle_exit,
                       max_clock_skew_s=args.max_clock_skew,
                       max_clock_jump_s=args.max_clock_jump, checkpoint_give_up_s=args.checkpoint_give_up,
                       user_ttl_s=args.user_ttl, max_users=args.max_users or None)
    return run_worker(cfg)


def cmd_export(args) -> int:
    from serving.export import export_onnx

    check = export_onnx(Path(args.model), Path(args.out))
    ok = check.max_abs_diff <= 1e-4 and check.same_items
    print(f"exported {check.path} ({check.n_items:,} items): ONNX Runtime vs torch max |diff| "
          f"{check.max_abs_diff:.2e}, top-K items score alike (ties in either order): {check.same_items} "
          f"-> {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


def cmd_serve(args) -> int:
    from serving.app import ServeConfig, check_exported, serve

    check_exported(Path(args.model))  # before the server starts: "run `recsys export`", not a traceback
    flags = {}  # the key is never a flag (command lines are visible to every user): RECSYS_API_KEY, or a file
    if args.api_key_file:
        flags["api_key"] = Path(args.api_key_file).read_text().strip() or None
        if flags["api_key"] is None:
            raise ValueError(f"--api-key-file {args.api_key_file} is empty")
    cfg = ServeConfig(model=Path(args.model), feature_repo=args.feature_repo and Path(args.feature_repo),
                      bootstrap_servers=args.bootstrap_servers, topic=args.topic,
                      allow_anonymous_writes=args.allow_anonymous_writes, max_body_bytes=args.max_body_bytes,
                      max_in_flight=args.max_in_flight, **flags)
    return serve(cfg, host=args.host, port=args.port)


def cmd_demo(args) -> int:
    from commands.demo import DemoConfig, run_demo

    return run_demo(DemoConfig(data=args.data, events=args.events or DemoConfig.events, out=Path(args.out),
                               epochs=args.epochs or DemoConfig.epochs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the end-to-end demo on the embedded local stack")
    _data_args(p, default="synthetic")
    p.add_argument("--epochs", type=int, help="slow-level training epochs (default: as `recsys train`)")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("replay", help="offline replay evaluation (EVAL_PROTOCOL.md) of models side by side")
    _data_args(p)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated model names, from: {', '.join(AVAILABLE_MODELS)}; 'ablations' adds "
                        f"the nested model's level ablations")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--no-seen-filter", action="store_true", help="rank already-seen items too (re-consumption)")
    p.add_argument("--user-freshness", choices=("event", "batch"), default="event",
                   help="event (protocol v2, default): each event ranked from its user's state after all their "
                        "earlier events; batch (v1): every event of a batch from the batch-start state")
    p.add_argument("--out", default="runs/replay")
    p.add_argument("--fit-cache", default="runs/cache/fits",
                   help="fitted models are kept here and reused for the same data, settings and code")
    p.add_argument("--no-fit-cache", action="store_true", help="fit every model afresh")
    p.add_argument("--through-kafka", action="store_true",
                   help="the nested models' stream goes through a broker and the real stream worker")
    p.add_argument("--bootstrap-servers", default=None,
                   help="with --through-kafka: this broker (default: an embedded one for the run)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("train", help="train the slow level (and the fast rule it meta-learns) on history")
    _data_args(p)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--shard", action="store_true",
                   help="under torchrun: split the item table across the processes (TorchRec model parallel)")
    p.add_argument("--history-fraction", type=float, default=HISTORY_FRACTION,
                   help="train on this first part of the log; the rest is left for the stream")
    p.add_argument("--out", default="runs/model/model.safetensors")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("features", help="Feast feature repo: apply (write sources + register) or materialize")
    p.add_argument("action", choices=["apply", "materialize"])
    _data_args(p, required=False)
    p.add_argument("--repo", default="runs/features")
    p.add_argument("--online", choices=["sqlite", "redis"], default="sqlite",
                   help="online store (redis reads REDIS_CONNECTION)")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("broker", help="start/stop/status of the embedded Kafka-protocol broker")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=9092)
    p.add_argument("--state-dir", default="runs/broker")
    p.set_defaults(func=cmd_broker)

    kafka = argparse.ArgumentParser(add_help=False)
    kafka.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    kafka.add_argument("--topic", default="interactions")

    p = sub.add_parser("produce", parents=[kafka], help="produce a log or the generator to a topic")
    _data_args(p)
    p.add_argument("--rate", type=float, default=None, help="events per second (default: as fast as possible)")
    p.add_argument("--limit", type=int, default=None, help="produce only the first N events")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("stream", parents=[kafka], help="the stream worker: consume, update fast levels, push, checkpoint")
    p.add_argument("--group", default="recsys")
    p.add_argument("--model", default="runs/model/model.safetensors", help="a `recsys train` model file")
    p.add_argument("--checkpoint-dir", default="runs/stream")
    p.add_argument("--worker-id", default=None, help="names this worker's checkpoint file (default: host name)")
    p.add_argument("--dead-letter-topic", default=None, help="default: <topic>.dead-letters")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=50)
    p.add_argument("--checkpoint-every", type=float, default=5.0, help="seconds")
    p.add_argument("--feature-repo", default=None, help="push fresh user vectors to this Feast repo")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint binds (0.0.0.0: all)")
    p.add_argument("--max-clock-skew", type=float, default=3600.0,
                   help="seconds an event may be stamped ahead of this host's clock; later ones are dead-lettered")
    p.add_argument("--max-clock-jump", type=float, default=30 * 86400.0,
                   help="seconds an event may be stamped past its partition's stream clock (plus the wall time "
                   "since it moved); later ones are dead-lettered as clock_jump")
    p.add_argument("--checkpoint-give-up", type=float, default=600.0,
                   help="exit after failing to write a checkpoint for this many seconds (events go on meanwhile)")
    p.add_argument("--user-ttl", type=float, default=None,
                   help="seconds idle before a user's state leaves memory for the online store (needs "
                        "--feature-repo; default: keep every user)")
    p.add_argument("--max-users", type=int, default=200_000,
                   help="with --feature-repo, users held at most; past it the least recently active leave for the "
                        "online store and come back with their next event (0: no bound)")
    p.add_argument("--log-every", type=float, default=10.0, help="seconds between log lines")
    p.add_argument("--idle-exit", type=float, default=None, help="exit cleanly after this many idle seconds")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("export", help="export the scoring graph to ONNX and check it against torch")
    p.add_argument("--model", default="runs/model/model.safetensors", help="a `recsys train` model file")
    p.add_argument("--out", default="runs/model/model.onnx")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="HTTP API: recommendations (Feast + ONNX Runtime), events, health, metrics")
    p.add_argument("--model", default="runs/model/model.onnx", help="an exported model; replaced files hot-swap")
    p.add_argument("--feature-repo", default=None, help="Feast repo the stream worker pushes to")
    p.add_argument("--bootstrap-servers", default=None, help="Kafka for POST /events")
    p.add_argument("--topic", default="interactions")
    p.add_argument("--api-key-file", default=None,
                   help="a file holding the key POST /events needs (X-API-Key); or set RECSYS_API_KEY. Never a flag: "
                        "command lines are visible to every user of the host")
    p.add_argument("--allow-anonymous-writes", action="store_true",
                   help="accept POST /events without a key (without a key and this flag, writes are refused)")
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="larger request bodies are refused unread")
    p.add_argument("--max-in-flight", type=int, default=32,
                   help="requests in the app at once; more are answered 503 with Retry-After (admission control)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("consume", parents=[kafka], help="read a topic back, validate and count")
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--idle-timeout", type=float, default=5.0)
    p.set_defaults(func=cmd_consume)
    for command in sub.choices.values():
        command.allow_abbrev = False  # `--api-key` must not pass for `--api-key-file`, nor any prefix
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter  # every flag's default in --help
        for action in command._actions:  # flags without a help text show their default too
            if action.help is None and action.default not in (None, argparse.SUPPRESS):
                action.help = "(default: %(default)s)"
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()
    # TorchRec's modules ask torch.fx whether it is tracing, and torch logs a notice about that
    # question once per process: a library's note to library authors, not news for a user.
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"recsys {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
