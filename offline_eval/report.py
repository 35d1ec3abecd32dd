"""Run the replay for several models side by side and write report.json, report.md and plots.

The JSON shape is the one in EVAL_PROTOCOL.md, so any tool can read it.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from offline_eval.fit_cache import FitCache, cacheable
from offline_eval.hybrid import Hybrid
from offline_eval.metrics import summarize
from offline_eval.model_names import AVAILABLE_MODELS, DEFAULT_MODELS
from offline_eval.nested import NestedReplay
from offline_eval.oracle import Oracle
from offline_eval.protocol import EncodedLog, ProtocolConfig, encode
from offline_eval.replay import ReplayResult, replay_model
from offline_eval.baselines import DecayedPop, ItemKNNOnline, PopOnline, PopStatic
from recsys.dataset import Dataset
from offline_eval.mf import mf_online, mf_static
from offline_eval.sasrec import SASRecConfig, SASRecStatic
from offline_eval.sknn import SKNNOnline
from recsys.train import TrainConfig


def _registry(log: EncodedLog, progress: bool, truth: dict,
              train: TrainConfig = TrainConfig()) -> dict[str, Callable[[], object]]:
    """Every model by name; ``progress``: the fits show progress bars (a long fit is never silent);
    ``truth``: a synthetic log's ground truth, for the oracle; ``train``: the nested models' training."""

    train = replace(train, progress=progress)
    return {
        "pop_static": PopStatic,
        "pop_online": PopOnline,
        "pop_online_decay": DecayedPop,
        "itemknn_online": ItemKNNOnline,
        "sknn_online": SKNNOnline,
        "hybrid": lambda: Hybrid(progress=progress),
        "mf_static": lambda: mf_static(progress=progress),
        "mf_online": lambda: mf_online(progress=progress),
        "sasrec_static": lambda: SASRecStatic(SASRecConfig(progress=progress)),
        "nested": lambda: NestedReplay(train_cfg=train),
        "nested_slow_only": lambda: NestedReplay(use_fast=False, train_cfg=train),
        "nested_no_user_fast": lambda: NestedReplay(train_cfg=train, user_fast=False),
        "nested_no_user_mid": lambda: NestedReplay(train_cfg=train, user_mid=False),
        "nested_no_population": lambda: NestedReplay(train_cfg=train, population=False),
        "nested_no_sequence": lambda: NestedReplay(train_cfg=train, sequence_items=0),
        "nested_no_association": lambda: NestedReplay(train_cfg=train, association=False),
        "nested_pop_by_time": lambda: NestedReplay(train_cfg=train, population_clock="time"),
        "nested_pop_by_events": lambda: NestedReplay(train_cfg=train, population_clock="events"),
        "nested_as_views": lambda: NestedReplay(train_cfg=train, feedback="views"),  # the ablation of kinds
        "oracle": lambda: Oracle(truth, log),
    }


@dataclass(frozen=True)
class ReplayConfig:
    models: tuple[str, ...] = DEFAULT_MODELS
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    out: Path | None = None
    progress: bool = True
    fit_cache: Path | None = None  # folder of fitted models, reused by data + settings + code
    # Bootstrap servers: the nested models' stream goes through this broker and the real
    # stream worker (offline_eval/through_kafka.py); None: in-process.
    through_kafka: str | None = None
    workdir: Path = Path("runs/replay-work")  # the worker's model file and checkpoints
    train: TrainConfig = field(default_factory=TrainConfig)  # how the nested models train

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in AVAILABLE_MODELS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(AVAILABLE_MODELS)}")


COLD_WARM = ("cold: stream events of users with no event in the history; warm: of users with at least one "
             "(the cold share is the share of the stream's events, not of users)")


def ndcg_standard_error(ranks: np.ndarray, k: int = 10) -> float:
    """The standard error of NDCG@k's mean over the stream's events (each event one sample)."""
    gain = np.where(ranks <= k, 1.0 / np.log2(np.where(ranks <= k, ranks, 1) + 1), 0.0)
    return float(gain.std(ddof=1) / np.sqrt(len(gain))) if len(gain) > 1 else 0.0


def model_report(result: ReplayResult, log: EncodedLog, cfg: ProtocolConfig) -> dict:
    ranks = result.ranks
    stream_users = log.users[log.n_history:]
    if result.targets is not None:  # a log with kinds: the positive events are the targets
        stream_users = stream_users[result.targets]
    warm = np.isin(stream_users, np.unique(log.users[: log.n_history]))
    overall = summarize(ranks, cfg.ks) | {"coverage@10": round(float(result.covered.mean()), 6),
                                          "ndcg@10_se": round(ndcg_standard_error(ranks), 6)}
    slices = [summarize(part, (10,)) for part in np.array_split(ranks, cfg.slices)]
    return {
        "overall": overall,
        "cold": summarize(ranks[~warm], cfg.ks),
        "warm": summarize(ranks[warm], cfg.ks),
        "slices": [{"hr@10": s["hr@10"], "ndcg@10": s["ndcg@10"]} for s in slices],
        "fit_seconds": round(result.fit_seconds, 3),
        "replay_seconds": round(result.replay_seconds, 3),
        "replay_events_per_second": round(len(ranks) / max(result.replay_seconds, 1e-9), 1),
    } | ({} if result.negative_shown is None else {
        "negative_shown@10": round(result.negative_shown, 6), "negatives_filtered_by_replay": result.negatives_filtered})


def _versions() -> dict:
    import polars
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__, "polars": polars.__version__}
    try:
        import torchrec

        versions["torchrec"] = torchrec.__version__
    except Exception:  # torchrec is optional for the count baselines
        versions["torchrec"] = "unavailable"
    return versions


def run_replay(ds: Dataset, cfg: ReplayConfig, fitted: dict[str, object] | None = None) -> dict:
    """``fitted``: models already fitted on this log's history, by name (the demo's trained
    nested model), replayed as they are instead of fitted again."""
    t0 = time.perf_counter()
    log = encode(ds, cfg.protocol)
    factories = _registry(log, cfg.progress, ds.extra, cfg.train)
    fitted = fitted or {}
    if "oracle" in cfg.models and "session_cluster" not in ds.extra:
        raise ValueError(f"the oracle needs a synthetic log's ground truth; {ds.name!r} has none")
    if "oracle" in cfg.models and cfg.protocol.user_freshness != "event":
        raise ValueError("the oracle ranks each event from its true distribution: use --user-freshness event")
    report = {
        "dataset": {"name": ds.name, "sha256": ds.sha256, "events": log.n_events,
                    "history_events": log.n_history, "stream_events": log.n_events - log.n_history,
                    "users": int(len(log.user_ids)), "items": int(len(log.item_ids)),
                    "span": [_day(int(log.ts.min())), _day(int(log.ts.max()))] if log.n_events else None,
                    "stream_starts": _day(int(log.ts[log.n_history])) if log.n_events > log.n_history else None,
                    "read": ds.extra["read"].as_dict() if "read" in ds.extra else None},
        "cold_warm": COLD_WARM,
        "protocol": {"version": cfg.protocol.version, "user_freshness": cfg.protocol.user_freshness,
                     "batch_size": cfg.protocol.batch_size, "k": list(cfg.protocol.ks),
                     "seen_filter": cfg.protocol.seen_filter, "history_fraction": cfg.protocol.history_fraction},
        "models": {},
        "versions": _versions(),
    }
    cache = FitCache(cfg.fit_cache) if cfg.fit_cache is not None else None
    # How the file was read (columns, unit, rows kept) decides the fit as much as its bytes do.
    data_key = ds.sha256 + (json.dumps(ds.extra["read"].as_dict(), sort_keys=True) if "read" in ds.extra else "")
    if cfg.through_kafka is not None:  # imported only here: the Kafka client and the worker
        from offline_eval.through_kafka import WORKER_MODELS, WorkerPath
    for name in cfg.models:
        model = fitted[name] if name in fitted else factories[name]()
        key = cache.key(model, data_key, cfg.protocol) if cache is not None and cacheable(model) else None
        fit_seconds = (getattr(model, "fit_seconds", None) or 0.0) if name in fitted else None
        if fit_seconds is None and key is not None:
            fit_seconds = cache.load(model, key)
        cached = fit_seconds is not None and name not in fitted
        if fit_seconds is None:
            t = time.perf_counter()
            model.fit(log.history().revealed(getattr(model, "feedback", "positives")))
            fit_seconds = time.perf_counter() - t
            if key is not None:
                cache.save(model, key, fit_seconds, name)  # as fitted: the replay goes on to change it
        if cfg.through_kafka is not None and name in WORKER_MODELS:
            with WorkerPath(model, log, cfg.through_kafka, Path(cfg.workdir) / name) as via_worker:
                result = replay_model(via_worker, log, cfg.protocol, name, progress=cfg.progress, fitted=True)
            path = "kafka → stream worker"
        else:
            result = replay_model(model, log, cfg.protocol, name, progress=cfg.progress, fitted=True)
            path = "in-process"
        result.fit_seconds = fit_seconds
        report["models"][name] = model_report(result, log, cfg.protocol) | {"fit_cached": cached, "path": path}
        if name in fitted:
            report["models"][name]["fit_reused"] = True  # fitted by the caller (the demo's `recsys train`)
        if hasattr(model, "describe"):  # e.g. the mix the nested model's calibration chose
            report["models"][name]["fit"] = model.describe()
        if cfg.progress:
            o = report["models"][name]["overall"]
            print(f"  {name:<18} ndcg@10 {o['ndcg@10']:.4f}  hr@10 {o['hr@10']:.4f}  mrr {o['mrr']:.4f}")
    if "oracle" in report["models"]:  # the learnable ceiling: how much of it each model found
        ceiling = report["models"]["oracle"]["overall"]["ndcg@10"]
        for m in report["models"].values():
            m["oracle_fraction"] = round(m["overall"]["ndcg@10"] / ceiling, 4) if ceiling else None
    report["best"] = best_model_sentence(report)
    report["wall_seconds"] = round(time.perf_counter() - t0, 2)
    if cfg.out is not None:
        write_report(report, Path(cfg.out))
    return report


def _day(ts: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d")


def best_model_sentence(report: dict) -> str:
    """One sentence naming the best model by NDCG@10, and by how much (in standard errors)."""
    scored = sorted(((m["overall"]["ndcg@10"], m["overall"].get("ndcg@10_se", 0.0), n)
                     for n, m in report["models"].items() if n != "oracle"), reverse=True)
    if not scored:
        return ""
    (best, se, name), rest = scored[0], scored[1:]
    if not rest:
        return f"{name} scores NDCG@10 {best:.4f} (± {se:.4f})."
    runner, r_se, r_name = rest[0]
    ratio = f"{best / runner:.3f} ×" if runner else "∞ ×"
    gap = (best - runner) / max(np.hypot(se, r_se), 1e-12)
    return (f"Best: {name}, NDCG@10 {best:.4f} (± {se:.4f}), {ratio} the next best, {r_name} ({runner:.4f}); "
            f"the gap is {gap:.1f} standard errors.")


def markdown_table(report: dict) -> str:
    oracle = "oracle" in report["models"]
    # A log with negative feedback: the share of served top 10s holding an item the user said no to
    # ("filtered": the replay masked them for a kind-blind model).
    said_no = any("negative_shown@10" in m for m in report["models"].values())
    lines = ["| model | NDCG@10 (± se) | HR@10 | MRR | NDCG@10 cold | NDCG@10 warm | coverage@10 | fit s | replay ev/s |"
             + (" of oracle |" if oracle else "") + (" said no, in top 10 |" if said_no else ""),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |" + (" --- |" if oracle else "")
             + (" --- |" if said_no else "")]
    for name, m in report["models"].items():
        o = m["overall"]
        se = f" ± {o['ndcg@10_se']:.4f}" if "ndcg@10_se" in o else ""
        lines.append(f"| {name} | {o['ndcg@10']:.4f}{se} | {o['hr@10']:.4f} | {o['mrr']:.4f} | "
                     f"{m['cold']['ndcg@10']:.4f} | {m['warm']['ndcg@10']:.4f} | {o['coverage@10']:.3f} | "
                     f"{m['fit_seconds']:.1f}{' (cached)' if m.get('fit_cached') else ' (reused)' if m.get('fit_reused') else ''} | "
                     f"{m['replay_events_per_second']:,.0f} |" + (f" {m['oracle_fraction']:.1%} |" if oracle else "")
                     + (f" {_said_no(m)} |" if said_no else ""))
    return "\n".join(lines)


def _said_no(m: dict) -> str:
    if "negative_shown@10" not in m:
        return "–"
    return f"{m['negative_shown@10']:.2%}" + (" (filtered)" if m.get("negatives_filtered_by_replay") else "")


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    d, p = report["dataset"], report["protocol"]
    head = (f"# Replay report: {d['name']}\n\n{d['events']:,} events ({d['history_events']:,} history, "
            f"{d['stream_events']:,} stream), {d['users']:,} users, {d['items']:,} items; "
            f"B = {p['batch_size']}, seen filter {'on' if p['seen_filter'] else 'off'}; "
            f"sha256 `{d['sha256'][:16]}…`.\n\n")
    if d.get("span"):
        head += f"The log runs {d['span'][0]} .. {d['span'][1]}; the stream starts {d.get('stream_starts')}.\n"
    if d.get("read"):
        r = d["read"]
        dropped = sum(r["dropped"].values())
        head += (f"Read {r['rows']:,} rows, timestamps in {r['ts_unit']} "
                 f"({'detected' if r['ts_unit_detected'] else 'as set'}); "
                 + (f"dropped {dropped:,} bad rows ({', '.join(f'{n:,} {k}' for k, n in r['dropped'].items())}; "
                    f"first at line {r['first_bad_line']:,})" if dropped else "no bad rows") + ".\n")
    head += f"{report.get('cold_warm', COLD_WARM).capitalize()}.\n\n"
    fits = [f"- {n}: {m['fit']['summary']}" for n, m in report["models"].items() if m.get("fit", {}).get("summary")]
    tail = f"\n\n{report['best']}\n" if report.get("best") else "\n"
    if fits:
        tail += "\nWhat the fits chose:\n" + "\n".join(fits) + "\n"
    plots = "\n\n![NDCG@10 over the stream](ndcg_slices.png)\n![HR@10 over the stream](hr_slices.png)\n" \
            "![cold vs warm](cold_warm.png)\n"
    (out / "report.md").write_text(head + markdown_table(report) + tail + plots)
    _plots(report, out)


def model_colour(name: str) -> str:
    """One colour per model name, the same in every plot and every run (its place in the registry)."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"].colors
    at = AVAILABLE_MODELS.index(name) if name in AVAILABLE_MODELS else len(AVAILABLE_MODELS)
    return matplotlib.colors.to_hex(palette[at % len(palette)])


def _plots(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in ("ndcg@10", "hr@10"):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, m in report["models"].items():
            ax.plot(range(1, len(m["slices"]) + 1), [s[metric] for s in m["slices"]], marker="o", label=name,
                    color=model_colour(name))
        ax.set(xlabel="stream slice (time →)", ylabel=metric.upper(), title=f"{metric.upper()} over the stream")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"{metric.split('@')[0]}_slices.png", dpi=110)
        plt.close(fig)
    names = list(report["models"])
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [report["models"][n]["cold"]["ndcg@10"] for n in names], 0.4, label="cold users")
    ax.bar(x + 0.2, [report["models"][n]["warm"]["ndcg@10"] for n in names], 0.4, label="warm users")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="NDCG@10", title="Cold vs warm users")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cold_warm.png", dpi=110)
    plt.close(fig)
