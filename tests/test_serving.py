"""Serving: a real ONNX Runtime session behind a real HTTP server on loopback, a real Feast repo."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import torch

from features.sources import write_sources
from features.store import POPULATION_KEY, FeatureRepo, population_key
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel
from serving.app import BackgroundServer, ServeConfig, create_app
from serving.export import Scorer, check_export, export_onnx, scorer_from_model, write_graph
from streaming.broker import EmbeddedBroker, free_port
from waiting import wait_until

# Every request waits generously (httpx's own default is 5 s): a loaded CI machine answers slowly, not wrongly.
get, post = partial(httpx.get, timeout=60), partial(httpx.post, timeout=60)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_users=200, n_items=300, n_events=5_000, seed=3)


def save_model(data, path: Path, seed: int, n_items: int | None = None, population_vector: bool = True,
               dim: int = 64) -> Path:
    torch.manual_seed(seed)
    items = data.interactions["item_id"].unique(maintain_order=True)
    items = items.head(n_items) if n_items else items
    model = NestedModel(NestedConfig(n_items=len(items), dim=dim))
    if population_vector:
        with torch.no_grad():
            model.user0.normal_()  # a distinct population ranking per model
    model.save(path, item_ids=items.to_list())
    return path


@pytest.fixture(scope="module")
def model(data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    check = export_onnx(save_model(data, folder / "model.safetensors", seed=1), folder / "model.onnx")
    assert check.max_abs_diff <= 1e-4 and check.same_items
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def repo(data, tmp_path_factory) -> FeatureRepo:
    repo = FeatureRepo.create(tmp_path_factory.mktemp("features"))
    write_sources(data, repo.path)
    repo.apply()
    return repo


def test_export_matches_torch_on_random_inputs(data, tmp_path):
    check = export_onnx(save_model(data, tmp_path / "m.safetensors", seed=5), tmp_path / "m.onnx")
    assert check.max_abs_diff <= 1e-4 and check.same_items and check.n_items == data.interactions[
        "item_id"].n_unique()


def test_recommendations_rank_by_the_pushed_user_vector(data, model, repo):
    scorer, item_ids, _ = scorer_from_model(model.with_suffix(".safetensors"))
    vector = np.random.default_rng(0).normal(size=64).astype(np.float32)
    population = np.linspace(0, 50, len(item_ids), dtype=np.float32)  # item counts of the one partition
    clock, away = 1_700_000_000, 3 * 86400  # alice's latest event was 3 days before the stream's clock
    repo.push_user_state(["alice", population_key(0)], [vector, population], events=[3, 100],
                         last_ts=[clock - away, clock])
    with torch.no_grad():
        want = scorer(torch.from_numpy(vector)[None], torch.tensor([float(away)]), torch.from_numpy(population),
                      torch.zeros(1, len(item_ids), dtype=torch.bool), torch.zeros(0))[1][0, :5]
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        got = get(f"{url}/recommendations/alice", params={"k": 5}).json()
        assert got["source"] == "user"
        assert [r["item_id"] for r in got["items"]] == [item_ids[i] for i in want.tolist()]
        scores = [r["score"] for r in got["items"]]
        assert scores == sorted(scores, reverse=True)

        top = got["items"][0]["item_id"]
        again = get(f"{url}/recommendations/alice", params={"k": 5, "exclude": top}).json()
        assert top not in [r["item_id"] for r in again["items"]]  # excluded by the request

        repo.push_user_state(["bob"], [vector], events=[1], recent_items=[[item_ids.index(top)]])
        bob = get(f"{url}/recommendations/bob", params={"k": 5}).json()
        assert top not in [r["item_id"] for r in bob["items"]]  # bob just saw it: masked from the store

        stranger = get(f"{url}/recommendations/nobody-knows-me", params={"k": 10})
        assert stranger.status_code == 200 and stranger.json()["source"] == "population"
        assert len(stranger.json()["items"]) == 10

        health = get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        assert "recsys_serve_requests" in get(f"{url}/metrics").text


def test_bad_requests_get_a_clear_4xx(model, repo):
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path, api_key="s3cret"))) as url:
        assert get(f"{url}/recommendations/alice", params={"k": 0}).status_code == 422
        assert get(f"{url}/recommendations/alice", params={"k": 5000}).status_code == 422
        assert get(f"{url}/recommendations/alice", params={"k": "ten"}).status_code == 422
        json_with = lambda key: {"Content-Type": "application/json", "X-API-Key": key}  # noqa: E731
        no_key = post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}')
        assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
        wrong = post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}',
                           headers=json_with("s3cre7"))
        assert wrong.status_code == 401
        bad = post(f"{url}/events", content=b'{"user_id": "a", "ts": 1}', headers=json_with("s3cret"))
        assert bad.status_code == 400 and bad.json()["error"] == "missing_field"
        plain = post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}',
                           headers={"Content-Type": "text/plain", "X-API-Key": "s3cret"})
        assert plain.status_code == 415  # a web page's form post is not an event
        no_kafka = post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}',
                              headers=json_with("s3cret"))
        assert no_kafka.status_code == 503  # a clear answer, not a hang, when no broker is configured

        big = b'{"user_id": "' + b"x" * (1 << 20) + b'"}'
        assert post(f"{url}/events", content=big, headers=json_with("s3cret")).status_code == 413
        chunked = post(f"{url}/events", content=iter([big[i:i + 4096] for i in range(0, len(big), 4096)]),
                             headers=json_with("s3cret"))
        assert chunked.status_code == 413  # no Content-Length: still cut off at the limit
        for reserved in (POPULATION_KEY, "nul\x00byte", "bidi\u202eevil"):
            assert get(f"{url}/recommendations/{quote(reserved, safe='')}").status_code == 422, reserved
        many = ",".join(f"i{n}" for n in range(501))
        assert get(f"{url}/recommendations/alice", params={"exclude": many}).status_code == 422


def test_docs_load_from_the_server_itself_and_no_answer_shows_a_server_path(model, repo):
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        page = get(f"{url}/docs")
        assert page.status_code == 200 and "swagger-ui-bundle.js" in page.text
        assert "cdn" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere
        for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
            assert get(f"{url}/static/docs/{asset}").status_code == 200
        answers = get(f"{url}/recommendations/alice").text + get(f"{url}/healthz").text
    assert str(model.parent) not in answers and str(repo.path) not in answers


def test_docs_show_a_typed_schema_for_every_routes_answer_and_the_event_body(model, repo):
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        api = get(f"{url}/openapi.json").json()
    ok = {"get": "200", "post": "202"}
    routes = {(path, method): op for path, ops in api["paths"].items() for method, op in ops.items()}
    assert {p for p, _ in routes} == {"/recommendations/{user_id}", "/events", "/healthz", "/readyz", "/metrics"}
    for (path, method), op in routes.items():
        (schema,) = [c["schema"] for c in op["responses"][ok[method]]["content"].values()]
        assert schema.get("$ref") or schema.get("type") == "string", (path, schema)  # a model, or /metrics' text
    item = api["components"]["schemas"]["RecommendedItem"]
    assert {"item_id", "score"} <= set(item["properties"]) and item["additionalProperties"] is True
    body = routes["/events", "post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"user_id", "item_id", "ts"} <= set(body["required"])


def test_the_server_process_loads_no_torch(model, repo):
    """`recsys serve` ranks through ONNX Runtime and reads the population level in numpy: torch
    (300 MB, seconds of import) is never mapped into its process, not even by Feast."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "commands.cli", "serve", "--model", str(model),
                               "--feature-repo", str(repo.path), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        def answered():
            try:
                return get(f"http://127.0.0.1:{port}/recommendations/alice").status_code == 200
            except httpx.TransportError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                return False

        wait_until(answered, "`recsys serve` to answer a recommendation", 180)
        assert get(f"http://127.0.0.1:{port}/healthz").json()["feature_repo"]
        mapped = Path(f"/proc/{server.pid}/maps").read_text()
        assert "onnxruntime" in mapped  # the check sees the libraries the server did load
        assert "libtorch" not in mapped and "/torch/" not in mapped
    finally:
        server.terminate()
        server.wait(60)


def test_writes_are_refused_unless_a_key_is_set_or_anonymous_writes_are_allowed(model, repo):
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        r = post(f"{url}/events", json={"user_id": "a", "item_id": "b", "ts": 1})
        assert r.status_code == 403 and "--allow-anonymous-writes" in r.json()["detail"]
    open_cfg = ServeConfig(model=model, feature_repo=repo.path, allow_anonymous_writes=True)
    with BackgroundServer(create_app(open_cfg)) as url:
        r = post(f"{url}/events", json={"user_id": "a", "item_id": "b", "ts": 1})
        assert r.status_code == 503  # past the key check; no broker configured


def test_a_new_model_file_is_hot_swapped_under_load_with_no_failed_request(data, repo, tmp_path):
    live = tmp_path / "live.onnx"
    export_onnx(save_model(data, tmp_path / "a.safetensors", seed=1), live)
    export_onnx(save_model(data, tmp_path / "b.safetensors", seed=2, n_items=100), tmp_path / "b.onnx")
    statuses, stop, answered = [], threading.Event(), threading.Condition()
    cfg = ServeConfig(model=live, feature_repo=repo.path, reload_every_s=0.1)

    def answers(n: int) -> None:
        with answered:
            assert answered.wait_for(lambda: len(statuses) >= n, timeout=60), f"only {len(statuses)} of {n} answers"

    with BackgroundServer(create_app(cfg)) as url:
        def hammer():
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    status = client.get(f"{url}/recommendations/anyone", params={"k": 10}).status_code
                    with answered:
                        statuses.append(status)
                        answered.notify_all()

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        answers(20)  # under way before the swap
        os.replace(tmp_path / "b.onnx", live)  # atomic, as a deploy should do it
        wait_until(lambda: get(f"{url}/healthz").json()["items"] == 100, "the new model to be swapped in")
        answers(len(statuses) + 20)  # served by the new model
        stop.set()
        for t in threads:
            t.join()
    assert set(statuses) == {200}, "no request fails during a hot swap"


@pytest.mark.slow
def test_a_posted_event_changes_the_users_recommendations(data, repo, broker, topic, tmp_path):
    # How fast is a benchmark's question (bench/stream_throughput.py: freshness p50/p99); here, that it happens.
    # No population vector: the ranking a user gets is theirs alone, untrained as the model is.
    checkpoint = save_model(data, tmp_path / "model.safetensors", seed=4, population_vector=False)
    model = tmp_path / "model.onnx"
    export_onnx(checkpoint, model)
    worker = subprocess.Popen(
        [sys.executable, "-m", "commands.cli", "stream", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
         topic, "--group", f"g-{topic}", "--model", str(checkpoint), "--checkpoint-dir",
         str(tmp_path / "ckpt"), "--feature-repo", str(repo.path), "--log-every", "1"],
        stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT)
    try:
        cfg = ServeConfig(model=model, feature_repo=repo.path, bootstrap_servers=broker.bootstrap_servers,
                          topic=topic, population_every_s=0.1, allow_anonymous_writes=True)
        with BackgroundServer(create_app(cfg)) as url:
            log = tmp_path / "worker.log"
            wait_until(lambda: "assigned partitions" in log.read_text() or worker.poll() is not None,
                       "the worker to join its group")
            assert worker.poll() is None, log.read_text()
            before = get(f"{url}/recommendations/carol", params={"k": 10}).json()
            assert before["source"] == "population"

            items = data.interactions["item_id"].unique(maintain_order=True).cast(str).to_list()[:3]
            wait_until(lambda: get(f"{url}/healthz").json()["kafka"], "the server to connect to Kafka")
            for n, item in enumerate(items):
                r = post(f"{url}/events", json={"user_id": "carol", "item_id": item, "ts": 1_700_000_000 + n})
                assert r.status_code == 202, r.text
            ranked = lambda answer: [r["item_id"] for r in answer["items"]]  # noqa: E731

            def changed():  # from her own state, and what she just saw is not recommended back
                after = get(f"{url}/recommendations/carol", params={"k": 10}).json()
                return (after["source"] == "user" and ranked(after) != ranked(before)
                        and not set(items) & set(ranked(after)))

            wait_until(changed, "carol's events to change her recommendations")
    finally:
        worker.terminate()
        assert worker.wait(120) == 0, (tmp_path / "worker.log").read_text()[-3000:]  # SIGTERM: a clean stop


def test_export_check_lets_exactly_tied_items_come_in_either_order(tmp_path):
    E = torch.randn(40, 8)
    E[1::2] = E[::2]  # every item has a twin that scores exactly as it does, for any user
    scorer = Scorer(E, torch.zeros(40), torch.tensor(0.5))
    check = check_export(scorer, write_graph(scorer, tmp_path / "twins.onnx"), torch.Generator().manual_seed(0))
    assert check.same_items and check.max_abs_diff <= 1e-4


def test_a_mixed_score_exports_with_the_items_past_the_table_in_its_softmax(tmp_path):
    E = torch.randn(40, 8)
    mixed = Scorer(E, torch.zeros(40), torch.tensor(0.5), pop_weight=torch.tensor(2.0), share=torch.tensor(0.25))
    check = check_export(mixed, write_graph(mixed, tmp_path / "mixed.onnx"), torch.Generator().manual_seed(0))
    assert check.same_items and check.max_abs_diff <= 1e-4
    user, away, population, exclude = torch.randn(1, 8), torch.zeros(1), torch.rand(40), torch.zeros(1, 40).bool()
    with torch.no_grad():
        alone = mixed.scores(user, away, population, exclude, torch.zeros(0))
        launched = mixed.scores(user, away, population, exclude, torch.tensor([1e4]))  # one hit past the table
    # Probabilities over the whole catalogue: the hit takes nearly all the population's share (¼)
    # from the table's items.
    assert launched[0, 40].exp() > 0.24
    assert torch.all(launched[0, :40] < alone[0])
    assert torch.allclose(alone.exp().sum(), torch.tensor(1.0), atol=1e-5)


def rollback_journal_store(path: Path, users: list[str]) -> Path:
    """A repo whose SQLite store uses the rollback journal, where a writer's lock holds every
    reader off: a user's own repo, made by another tool (ours are WAL)."""
    import gc

    repo = FeatureRepo.create(path)
    repo.apply()
    repo.push_user_state(users, [np.ones(64, dtype=np.float32)] * len(users), events=[1] * len(users))
    del repo
    gc.collect()  # Feast's connection to the store is closed: the journal mode can change
    with sqlite3.connect(path / "data" / "online.db") as db:
        assert db.execute("PRAGMA journal_mode=DELETE").fetchone() == ("delete",)
    return path


def test_a_rollback_journal_store_is_opened_in_wal_and_another_writers_lock_stalls_no_answer(model, tmp_path):
    path = rollback_journal_store(tmp_path / "features", ["dave"])
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=path))) as url:
        with sqlite3.connect(path / "data" / "online.db") as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        lock = sqlite3.connect(path / "data" / "online.db", isolation_level=None, timeout=60)
        lock.execute("BEGIN EXCLUSIVE")  # another process writing: in WAL, readers go on
        try:
            answers, health_s = [], []
            for _ in range(5):
                answers.append(get(f"{url}/recommendations/dave"))
                t0 = time.perf_counter()
                assert get(f"{url}/healthz").status_code == 200 and get(f"{url}/metrics").status_code == 200
                health_s.append(time.perf_counter() - t0)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    assert all(a.status_code == 200 and a.json()["source"] == "user" for a in answers), answers[-1].text
    assert max(health_s) < 0.5, health_s  # the probe saw 4.6 s


def test_a_store_locked_in_its_rollback_journal_degrades_to_the_population_ranking_never_a_500(model, tmp_path):
    path = rollback_journal_store(tmp_path / "features", ["dave"])
    lock = sqlite3.connect(path / "data" / "online.db", isolation_level=None, timeout=60)
    lock.execute("BEGIN EXCLUSIVE")  # held from before the server starts: its mode cannot change
    try:
        with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=path))) as url:
            answers = [get(f"{url}/recommendations/dave") for _ in range(3)]
            health = get(f"{url}/healthz").json()
            lock.execute("ROLLBACK")
            for a in answers:
                assert a.status_code == 200 and a.json()["source"] == "population" and a.json()["degraded"], a.text
                assert len(a.json()["items"]) == 10
            assert health["status"] == "degraded" and "online store slow" in health["reasons"]
            assert 'recsys_serve_degraded_total{reason="online store slow"}' in get(f"{url}/metrics").text
            wait_until(lambda: get(f"{url}/recommendations/dave").json()["source"] == "user",
                       "dave's own ranking once the store is free")
    finally:
        lock.close()


def test_beyond_max_in_flight_requests_are_shed_with_retry_after_and_health_still_answers(model, tmp_path):
    path = rollback_journal_store(tmp_path / "features", ["dave"])
    lock = sqlite3.connect(path / "data" / "online.db", isolation_level=None, timeout=60)
    lock.execute("BEGIN EXCLUSIVE")  # every read waits its whole timeout: each request stays in flight 0.25 s
    try:
        cfg = ServeConfig(model=model, feature_repo=path, max_in_flight=2)
        with BackgroundServer(create_app(cfg)) as url:
            with ThreadPoolExecutor(20) as pool:
                answers = list(pool.map(lambda _: get(f"{url}/recommendations/dave"), range(20)))
                health = pool.submit(get, f"{url}/healthz").result()
            metrics = get(f"{url}/metrics").text
    finally:
        lock.close()
    codes = Counter(a.status_code for a in answers)
    assert set(codes) == {200, 503} and codes[200] >= 2, codes
    assert all(a.headers["Retry-After"] == "1" for a in answers if a.status_code == 503)
    assert health.status_code == 200  # never shed: a supervisor sees the overload
    assert f"recsys_serve_shed_total {float(codes[503])}" in metrics


@pytest.mark.slow
def test_the_server_starts_without_kafka_and_takes_writes_once_the_broker_is_up(model, repo, tmp_path):
    port = free_port()
    cfg = ServeConfig(model=model, feature_repo=repo.path, bootstrap_servers=f"127.0.0.1:{port}", topic="late",
                      allow_anonymous_writes=True)
    event = {"user_id": "erin", "item_id": "1", "ts": 1_700_000_000}
    with BackgroundServer(create_app(cfg)) as url:
        assert get(f"{url}/recommendations/erin").status_code == 200  # reads never wait for Kafka
        early = post(f"{url}/events", json=event)
        assert early.status_code == 503 and early.headers["Retry-After"]
        assert get(f"{url}/healthz").json()["kafka"] is False
        broker = EmbeddedBroker.start(port=port, log_dir=tmp_path)
        try:
            wait_until(lambda: post(f"{url}/events", json=event).status_code == 202,
                       "writes to be acknowledged once the broker is up")
        finally:
            broker.stop()
        late = post(f"{url}/events", json=event)  # acknowledged by nobody: a 503, not a 202
        assert late.status_code == 503 and late.headers["Retry-After"]


def test_hot_swap_refuses_a_model_that_does_not_fit_what_is_served(data, repo, tmp_path):
    live = tmp_path / "live.onnx"
    export_onnx(save_model(data, tmp_path / "a.safetensors", seed=1), live)
    export_onnx(save_model(data, tmp_path / "b.safetensors", seed=2, dim=32), tmp_path / "b.onnx")
    cfg = ServeConfig(model=live, feature_repo=repo.path, reload_every_s=0.1)
    with BackgroundServer(create_app(cfg)) as url:
        before = get(f"{url}/healthz").json()
        os.replace(tmp_path / "b.onnx", live)  # user vectors of 32 dims: the store holds 64
        wait_until(lambda: "recsys_serve_models_rejected_total 1.0" in get(f"{url}/metrics").text,
                   "the new file to be refused")
        assert get(f"{url}/healthz").json()["items"] == before["items"]
        assert get(f"{url}/recommendations/alice").status_code == 200


def test_a_store_that_lost_its_rows_says_re_syncing_and_ranks_by_the_last_population_read(model, data, tmp_path):
    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    n = len(data.interactions["item_id"].unique())
    level = np.zeros(n, dtype=np.float32)
    level[[5, 7, 9]] = [30.0, 20.0, 10.0]  # three items the population favours
    rows = [population_key(0), population_key(1)]
    repo.push_user_state(rows, [level, level], events=[60, 60], last_ts=[1_700_000_000] * 2)
    cfg = ServeConfig(model=model, feature_repo=repo.path, population_every_s=0.1, degraded_for_s=0.5)
    with BackgroundServer(create_app(cfg)) as url:
        def top() -> list[str]:
            return [i["item_id"] for i in get(f"{url}/recommendations/nobody").json()["items"]]

        wait_until(lambda: get(f"{url}/healthz").json()["population_partitions"] == 2, "the population level read")
        before = top()
        with sqlite3.connect(repo.path / "data" / "online.db") as db:  # a store restarted empty
            table = db.execute("SELECT name FROM sqlite_master WHERE name LIKE '%user_state'").fetchone()[0]
            db.execute(f"DELETE FROM {table}")
        wait_until(lambda: "online store lost rows: re-syncing" in get(f"{url}/healthz").json()["reasons"],
                   "healthz to say the store is re-syncing")
        assert top() == before  # the last level read stays in use meanwhile
        repo.push_user_state(rows, [level, level], events=[60, 60], last_ts=[1_700_000_000] * 2)  # the re-push
        wait_until(lambda: get(f"{url}/healthz").json()["status"] == "ok", "healthz ok once the rows are back")


def test_a_corrupted_online_store_degrades_to_the_population_ranking(model, tmp_path):
    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    repo.push_user_state(["gina"], [np.ones(64, dtype=np.float32)], events=[1])
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        assert get(f"{url}/recommendations/gina").json()["source"] == "user"
        for part in (repo.path / "data").glob("online.db*"):  # every page overwritten, the WAL's too
            with part.open("r+b") as f:
                f.write(b"\x00garbage" * (part.stat().st_size // 8))
        answer = get(f"{url}/recommendations/gina")
        assert answer.status_code == 200 and answer.json()["source"] == "population", answer.text
        assert answer.json()["degraded"] in ("online store failing", "online store slow")
        assert get(f"{url}/healthz").json()["status"] == "degraded"


def test_recommended_items_carry_their_catalogue_attributes(data, model, tmp_path):
    repo = FeatureRepo.create(tmp_path / "features")
    counts = write_sources(data, repo.path)
    repo.apply()
    repo.materialize()
    genre = {str(i + 1): [f"cluster-{c}"] for i, c in enumerate(data.extra["item_cluster"].tolist())}
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        answer = lambda: get(f"{url}/recommendations/anyone", params={"k": 50}).json()["items"]  # noqa: E731
        wait_until(lambda: any("genres" in item for item in answer()),
                   what="item attributes read from the online store")
        items = answer()
    described = [item for item in items if "genres" in item]
    assert all(item["genres"] == genre[item["item_id"]] for item in described)
    # Every item the catalogue describes has its attributes, items first seen on the stream too
    # (a shop knows its new products before anyone buys them).
    catalogue = set(data.items["item_id"].cast(str))
    assert {item["item_id"] for item in described} == {item["item_id"] for item in items} & catalogue
    assert counts["item_attributes"] == len(catalogue | set(data.interactions["item_id"].cast(str)))


def test_serving_reads_the_population_level_exactly_as_the_model_does():
    from recsys.nested import read_speeds as model_read, sum_levels as model_sum
    from serving.population import whole_population

    rng = np.random.default_rng(7)
    half_lives, memory = [3_600.0, 86_400.0, 30 * 86_400.0], 5_000.0
    clocks = [1_700_000_000, 1_700_050_000, 1_699_990_000]
    partials = [(p, rng.gamma(0.3, 20, size=(40 + 5 * p, 3)).astype(np.float32), 100, t) for p, t in enumerate(clocks)]
    got, clock = whole_population([(p, c.ravel(), n, t) for p, c, n, t in partials], half_lives, memory, 30 * 86400.0)
    total, want_clock = model_sum([(torch.from_numpy(c), t) for _, c, _, t in partials], half_lives)
    assert clock == want_clock == max(clocks)
    np.testing.assert_allclose(got, model_read(total, memory).numpy(), rtol=1e-5, atol=1e-6)

