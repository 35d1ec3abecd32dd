"""`make demo`: the whole product on the embedded local stack, in a few minutes on 2 cores.

    data → broker → train the slow level → export to ONNX → Feast apply + materialize
         → stream worker + HTTP server (real processes) → the log streamed live
         → one user's recommendations before and after new events → replay report

Everything started is stopped on the way out, Ctrl-C included: the worker and the
server get SIGTERM (the worker writes its last checkpoint), then the broker stops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from commands.train import train_artifact
from features.sources import write_sources
from features.store import FeatureRepo
from offline_eval.oracle import true_probabilities
from offline_eval.report import ReplayConfig, markdown_table, run_replay
from recsys.datasets import load_dataset
from recsys.nested import NestedModel, load_item_ids, write_log
from recsys.train import TrainConfig
from serving.export import export_onnx
from streaming.broker import EmbeddedBroker, die_with_parent, free_port
from streaming.producer import ProducerConfig, produce


@dataclass(frozen=True)
class DemoConfig:
    data: str = "synthetic"
    events: int | None = 100_000  # synthetic only; keeps the demo to a few minutes on 2 cores
    out: Path = Path("runs/demo")
    topic: str = "interactions"
    # As `recsys train` trains (TrainConfig's default): with 1, the personal part read after six
    # events of a cluster put 4.2 of its top 10 in it on average (100 users of the demo's log), with 2, 8.7.
    epochs: int = TrainConfig.epochs
    new_events: int = 6  # the demo user's fresh events
    seed: int = 0  # which of the group's items those are
    k: int = 10
    replay_models: tuple[str, ...] = ("pop_static", "pop_online_decay", "itemknn_online", "nested")


def run_demo(cfg: DemoConfig) -> int:

    logging.getLogger("kafka").setLevel(logging.ERROR)  # client chatter; the children keep their own logs
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # libraries' notices, not the demo's news
    warnings.filterwarnings("ignore", category=UserWarning)
    # Ctrl-C and SIGTERM unwind through the `finally`s, even where the shell started us with
    # SIGINT ignored (background jobs): every child and the broker are stopped on the way out.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    t0 = time.perf_counter()
    kwargs = {"n_events": cfg.events} if cfg.data == "synthetic" and cfg.events else {}
    ds = load_dataset(cfg.data, **kwargs)
    inter = ds.interactions
    print(f"[data] {ds.name}: {inter.height:,} events, {inter['user_id'].n_unique():,} users, "
          f"{inter['item_id'].n_unique():,} items")
    for part in ("broker", "checkpoints", "features", "model"):  # a fresh start: no stale offsets or state
        shutil.rmtree(cfg.out / part, ignore_errors=True)
    model = cfg.out / "model" / "model.safetensors"
    t = time.perf_counter()
    print(f"[train] slow level + fast rule on the first 80% of the log, {cfg.epochs} epoch(s) "
          f"(progress below; a few minutes on 2 cores)")
    nested = train_artifact(ds, model, TrainConfig(epochs=cfg.epochs, progress=True))
    print(f"[train] done in {time.perf_counter() - t:.0f}s → {model}; {nested.describe()['summary']}")
    with contextlib.ExitStack() as stack:  # unwinds in reverse: processes, then the broker
        ok = _live_part(ds, cfg, model, stack)
    print("[demo] worker, server and broker stopped")

    print(f"[replay] {', '.join(cfg.replay_models)} (EVAL_PROTOCOL.md, B = 256), the nested model as just trained")
    report = run_replay(ds, ReplayConfig(models=cfg.replay_models, out=cfg.out / "replay"), fitted={"nested": nested})
    print(markdown_table(report))
    print(report["best"])
    print(f"[replay] report.md, report.json and plots in {cfg.out / 'replay'}")
    print(f"[demo] {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.0f}s")
    print(YOUR_OWN_LOG)
    return 0 if ok else 1


# The demo's last words: the same three jobs on the reader's own log (docs/data.md has the contract).
YOUR_OWN_LOG = """
The same on your own log (a CSV with user_id, item_id and timestamp columns; docs/data.md):
  recsys replay --data your-log.csv                        # offline replay vs the baselines
  recsys train --data your-log.csv && recsys export        # the model, exported for serving
  recsys features apply --data your-log.csv && recsys features materialize
  recsys broker start && recsys stream --feature-repo runs/features &   # online updates from Kafka
  recsys produce --data your-log.csv                       # (or your own producers, keyed by user)
  RECSYS_API_KEY=… recsys serve --feature-repo runs/features --bootstrap-servers 127.0.0.1:9092
  curl localhost:8000/recommendations/<your user id>
"""


def _live_part(ds, cfg: DemoConfig, model: Path, stack: contextlib.ExitStack) -> bool:
    import httpx

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # after imports that reset the filters
    broker = EmbeddedBroker.start(log_dir=cfg.out / "broker")
    stack.callback(broker.stop)
    print(f"[broker] Kafka-protocol broker on {broker.bootstrap_servers}")

    check = export_onnx(model, model.with_suffix(".onnx"))
    print(f"[export] {check.path}: ONNX Runtime vs torch max |diff| {check.max_abs_diff:.1e}")

    repo = FeatureRepo.create(cfg.out / "features")
    write_sources(ds, repo.path)
    repo.apply()
    with contextlib.redirect_stdout(io.StringIO()):  # Feast prints a progress line per view
        repo.materialize()
    print(f"[feast] repo {repo.path} applied and materialized (SQLite online store)")

    port = free_port()
    worker = stack.enter_context(_Process("worker", cfg.out / "worker.log", [
        "stream", "--bootstrap-servers", broker.bootstrap_servers, "--topic", cfg.topic, "--model", str(model),
        "--checkpoint-dir", str(cfg.out / "checkpoints"), "--feature-repo", str(repo.path),
        "--worker-id", "demo", "--batch-size", "1024", "--log-every", "5"]))
    key = secrets.token_urlsafe(24)  # writes need a key; this one lives as long as the demo
    server = stack.enter_context(_Process("server", cfg.out / "server.log", [
        "serve", "--model", str(model.with_suffix(".onnx")), "--feature-repo", str(repo.path),
        "--bootstrap-servers", broker.bootstrap_servers, "--topic", cfg.topic, "--port", str(port)],
        env={"RECSYS_API_KEY": key}))
    url = f"http://127.0.0.1:{port}"
    worker.wait_for("assigned partitions", lambda: True)
    server.wait_for(None, lambda: httpx.get(f"{url}/healthz", timeout=1).status_code == 200)
    print(f"[start] stream worker (log {worker.log}) and HTTP server on {url} (log {server.log})")

    with warnings.catch_warnings():  # kafka-python loads its protocol tables with a deprecated importlib call
        warnings.simplefilter("ignore", DeprecationWarning)
        sent = produce(ds.interactions, ProducerConfig(broker.bootstrap_servers, cfg.topic, progress=False))
    print(f"[stream] {sent.sent:,} events produced live in {sent.seconds:.1f}s "
          f"({sent.events_per_second:,.0f} ev/s); the worker applies them as they arrive")
    t = time.perf_counter()
    worker.wait_for(None, lambda: sum(events for _, _, events, _ in repo.populations()) >= sent.sent, 300)
    print(f"[stream] all {sent.sent:,} applied and in the online store "
          f"{time.perf_counter() - t:.1f}s after the last was produced")

    ok = _before_and_after(ds, cfg, url, key, model, repo)
    for proc in (worker, server):
        proc.stop()
    # uvicorn re-raises SIGTERM after its graceful shutdown, so -15 is its clean exit.
    clean = worker.returncode == 0 and server.returncode in (0, -15)
    print(f"[stop] worker and server {'stopped cleanly' if clean else 'FAILED to stop cleanly'} (worker exit "
          f"{worker.returncode}, last checkpoint written; server exit {server.returncode}); logs in {cfg.out}")
    return ok and clean


def _before_and_after(ds, cfg: DemoConfig, url: str, key: str, model: Path, repo) -> bool:
    """Take an active user, show their ranking, post a few events from one taste group
    absent from it, and show the ranking once the worker's push makes the change visible.
    The whole served list (top 100) is compared, so movement below the top k shows too;
    so is the personal part of the score alone, the levels the events wrote to."""
    import httpx
    import polars as pl


    inter = ds.interactions
    activity = inter.group_by("user_id").len().sort(["len", "user_id"])
    user = str(activity["user_id"][int(0.9 * (activity.height - 1))])  # active, not an outlier
    group, label = item_groups(ds)
    seen = set(inter.filter(pl.col("user_id").cast(pl.Utf8) == user)["item_id"].cast(str).to_list())

    def ranking() -> tuple[str, list[dict]]:
        answer = httpx.get(f"{url}/recommendations/{user}", params={"k": 100}, timeout=5).json()
        return answer["source"], answer["items"]

    nested, item_ids = NestedModel.load(model), load_item_ids(model)
    table = nested.item_table().detach().numpy()
    source, before = ranking()
    personal_before = _personal_top(table, item_ids, repo, user, cfg.k, seen)
    counts = item_counts(inter)
    target, fresh = fresh_session(counts, group, [r["item_id"] for r in before[:cfg.k]], seen, cfg)

    print(f"\n[user {user}] {len(seen)} past events; top {cfg.k} now (from the {source} state):")
    _print_items(before[:cfg.k], label)
    print(f"[user {user}] new events, all from {target!r}: {', '.join(label(i) for i in fresh)}")
    now = int(inter["ts"].max()) + 60
    t = time.perf_counter()
    for n, item in enumerate(fresh):
        httpx.post(f"{url}/events", json={"user_id": user, "item_id": item, "ts": now + n},
                   headers={"X-API-Key": key}, timeout=5).raise_for_status()
    ids = lambda items: [r["item_id"] for r in items]  # noqa: E731
    after, deadline = before, time.monotonic() + 10
    while ids(after) == ids(before) and time.monotonic() < deadline:
        time.sleep(0.05)
        after = ranking()[1]
    seconds = time.perf_counter() - t
    print(f"[user {user}] top {cfg.k} {seconds:.2f}s after posting (POST /events → Kafka → worker → Feast → "
          f"ONNX Runtime); 'new' marks entries that were not there before:")
    _print_items(after[:cfg.k], label, mark=set(ids(before[:cfg.k])))

    def place(items):  # best position of the group's other items (the posted ones are masked after)
        at = [n for n, r in enumerate(items, 1) if group.get(r["item_id"]) == target and r["item_id"] not in fresh]
        return (f"#{at[0]}" if at else "absent"), len(at)

    (b_best, b_n), (a_best, a_n) = place(before), place(after)
    moved = len(set(ids(before[:cfg.k])) - set(ids(after[:cfg.k])))
    in_target = lambda items: sum(group.get(i) == target for i in items)  # noqa: E731
    print(f"[user {user}] served top {cfg.k}: {in_target(ids(before[:cfg.k]))} → {in_target(ids(after[:cfg.k]))} "
          f"from {target!r}; its other items: best rank {b_best} → {a_best}, {b_n} → {a_n} of the top "
          f"{len(after)}; {moved} of the top {cfg.k} replaced; the items just seen are masked from the list")
    personal_after = _personal_top(table, item_ids, repo, user, cfg.k, seen | set(fresh))
    share, weight = float(nested.pop_share), nested.pop_weight.item()
    form = (f"mixes the population's ranking ({weight:.2f} × log(1 + count), share {share:g}) and the personal "
            f"part's in probability" if share else f"adds the population term {weight:.2f} × log(1 + count)")
    print(f"[user {user}] the personal part alone (slow + user levels, without the population level): "
          f"{in_target(personal_before)} → {in_target(personal_after)} of its top {cfg.k} from {target!r}; "
          f"the mix calibrated on the history {form} and fades a returning user's personal part with fade "
          f"{nested.fade.item():g}")
    if "session_cluster" in (ds.extra or {}):
        truth = true_top(ds.extra, user, fresh, now, seen | set(fresh), cfg.k)
        print(f"[user {user}] the log's own generator, for this user certainly in a {target!r} session: "
              f"{in_target(truth)} of its top {cfg.k} from {target!r} (the `oracle`'s ranking; trending items "
              f"are likelier than the group's less popular ones)")
    print()
    return ids(after) != ids(before)


def item_counts(inter) -> list[tuple[str, int]]:
    """Each item's events, most first (ties by id: `value_counts` alone has no stable order)."""
    by_item = inter["item_id"].cast(str).value_counts().sort(["count", "item_id"], descending=[True, False])
    return list(zip(by_item["item_id"].to_list(), by_item["count"].to_list()))


def fresh_session(counts: list[tuple[str, int]], group: dict, shown: list[str], seen: set[str],
                  cfg: DemoConfig) -> tuple[str, list[str]]:
    """The demo's session: the taste group with the most events in the log among those absent
    from the ``shown`` top k, and ``cfg.new_events`` of its items the user has not taken."""
    volume, on_show = Counter(), Counter(group.get(i) for i in shown)
    for i, n in counts:
        volume[group.get(i)] += n
    target = next(g for g, _ in volume.most_common() if g is not None and on_show[g] == 0)
    return target, _session_items(counts, group, target, seen, cfg)


def session_reaction(ds, model_path: Path, n_users: int, cfg: DemoConfig = DemoConfig()) -> dict[str, list[int]]:
    """The demo's before/after step over ``n_users`` users (spread over the upper half by
    activity) of a synthetic log, in process: per ranking (the served one, the personal part
    alone, the generator's own `true_top`), how many of each user's top ``cfg.k`` after the
    session belong to its group. The whole log is written into the model's fast state first;
    events on items the model was not trained on are left out (the stream worker would give
    them new rows), and the session's six events go through `NestedModel.update` as the
    worker applies them."""
    import polars as pl

    model, item_ids = NestedModel.load(model_path).eval(), load_item_ids(model_path)
    row = {i: r for r, i in enumerate(item_ids)}
    inter = ds.interactions.filter(pl.col("item_id").cast(str).is_in(item_ids)).sort("ts", maintain_order=True)
    users, user_rows = np.unique(inter["user_id"].to_numpy(), return_inverse=True)
    items = np.array([row[str(i)] for i in inter["item_id"].to_list()], dtype=np.int64)
    log = SimpleNamespace(users=user_rows.astype(np.int64), items=items, ts=inter["ts"].to_numpy().astype(np.int64))
    with torch.no_grad():
        state = write_log(model, model.init_state(len(users), len(item_ids)), log, 4096)
    group, _ = item_groups(ds)
    counts, table, now = item_counts(inter), model.item_table().detach(), int(inter["ts"].max()) + 60
    activity = np.argsort(np.bincount(user_rows), kind="stable")
    picked = activity[np.linspace(len(users) // 2, len(users) - 1, min(n_users, len(users))).astype(int)]

    def top(st, r: int, exclude: set[str], personal: bool = False) -> list[str]:
        with torch.no_grad():
            if personal:  # the user vector alone, without the population level
                s = table @ model.read_users(st, torch.tensor([r]))[0]
            else:
                s = model.score(st, torch.tensor([r]), len(item_ids))[0]
        s[[row[i] for i in exclude]] = float("-inf")
        return [item_ids[i] for i in torch.topk(s, cfg.k).indices.tolist()]

    counted = {"served": [], "personal part": [], "oracle": []}
    for r in picked.tolist():
        seen = {item_ids[i] for i in items[user_rows == r]}
        target, fresh = fresh_session(counts, group, top(state, r, seen), seen, cfg)
        with torch.no_grad():
            after = model.update(state, torch.full((len(fresh),), r), torch.tensor([row[i] for i in fresh]),
                                 torch.arange(now, now + len(fresh)))
        exclude = seen | set(fresh)
        lists = {"served": top(after, r, exclude), "personal part": top(after, r, exclude, personal=True),
                 "oracle": true_top(ds.extra, str(users[r]), fresh, now, exclude, cfg.k)}
        for name, ranked in lists.items():
            counted[name].append(sum(group.get(i) == target for i in ranked))
    return counted


def _session_items(counts: list[tuple[str, int]], group: dict, target: str, seen: set[str],
                   cfg: DemoConfig) -> list[str]:
    """``cfg.new_events`` items of the group the user has not taken, drawn by the group's own
    popularity in the log (``counts``: each item's events, most first), as a session in that
    group would draw them (seeded). Not its ``k`` most popular ones: those are exactly what a
    ranking should then show (a draw by popularity took most of them, and the ranking could
    only show the group's tail)."""
    members = [(i, n) for i, n in counts if group.get(i) == target]
    pool = [(i, n) for i, n in members[cfg.k:] if i not in seen]
    weights = np.array([n for _, n in pool], dtype=np.float64)
    picks = np.random.default_rng(cfg.seed).choice(len(pool), min(cfg.new_events, len(pool)), replace=False,
                                                   p=weights / weights.sum())
    return [pool[j][0] for j in picks]


def true_top(truth: dict, user: str, session: list[str], ts: int, exclude: set[str], k: int) -> list[str]:
    """The top ``k`` items of the synthetic generator's true distribution for ``user`` at
    ``ts`` in the session cluster of the ``session`` items (the replay's `oracle`)."""
    items = torch.arange(len(truth["item_cluster"]))  # generator indices; ids are 1-based
    cluster = int(truth["item_cluster"][int(session[0]) - 1])
    p = true_probabilities(truth, torch.tensor([ts]), torch.tensor([int(user) - 1]), torch.tensor([cluster]),
                           items)[0]
    return [str(i + 1) for i in torch.argsort(p, descending=True).tolist() if str(i + 1) not in exclude][:k]


def _personal_top(table: np.ndarray, item_ids: list[str], repo, user: str, k: int, exclude: set[str]) -> list[str]:
    """The user's top items by their pushed vector alone: what the fast levels changed."""
    vector = repo.user_state([user])["vector"][0]
    if vector is None:  # no state pushed yet
        return []
    scores = table @ np.asarray(vector, dtype=np.float32)
    return [item_ids[i] for i in np.argsort(-scores) if item_ids[i] not in exclude][:k]


def item_groups(ds):
    """A taste group (the first genre) and a printable label per item id, from the
    catalogue: MovieLens' genres, the synthetic generator's clusters; without one, the id."""
    if ds.items is None or "genres" not in ds.items.columns:
        return {}, str
    titles = ds.items["title"] if "title" in ds.items.columns else ds.items["item_id"].cast(str).alias("title")
    rows = zip(ds.items["item_id"].to_list(), titles.to_list(), ds.items["genres"].to_list())
    meta = {str(i): (g[0] if g else None, f"{t} [{'|'.join(g or [])}]") for i, t, g in rows}
    return {i: g for i, (g, _) in meta.items()}, lambda i: meta.get(i, (None, i))[1]


def _print_items(items, label, mark: set | None = None) -> None:
    for n, r in enumerate(items, 1):
        new = "  new" if mark is not None and r["item_id"] not in mark else ""
        print(f"    {n:>2}. {label(r['item_id'])}  ({r['score']:.2f}){new}")


class _Process:
    """One `recsys` subcommand as a child process with its log in a file; stopped with
    SIGTERM (then SIGKILL after a grace period) when the demo leaves, however it leaves."""

    def __init__(self, name: str, log: Path, args: list[str], env: dict[str, str] | None = None):
        self.name, self.log, self.args, self.env = name, log, args, env
        self.returncode: int | None = None

    def __enter__(self) -> _Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "commands.cli", *self.args], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, env=os.environ | (self.env or {}),
                                     preexec_fn=die_with_parent)
        return self

    def wait_for(self, text: str | None, ready, timeout_s: float = 120) -> None:
        """Until ``text`` is in the log (if given) and ``ready()`` holds; fail fast if the process dies."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.name} exited ({self.proc.returncode}); see {self.log}:\n"
                                   + self.log.read_text()[-2000:])
            with contextlib.suppress(Exception):
                if (text is None or text in self.log.read_text()) and ready():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the {self.name} was not ready after {timeout_s:.0f}s; see {self.log}")
            time.sleep(0.1)

    def stop(self, grace_s: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.returncode = self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()
