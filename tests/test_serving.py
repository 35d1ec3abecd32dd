"""Serving: a real ONNX Runtime session behind a real HTTP server on loopback, a real Feast repo."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from features.sources import write_sources
from features.store import POPULATION_KEY, FeatureRepo
from recsys.datasets import load_dataset
from recsys.nested_model import NestedConfig, NestedModel
from serving.app import BackgroundServer, ServeConfig, create_app
from serving.export import export_onnx, scorer_from_checkpoint
from waiting import wait_until


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic", n_users=200, n_items=300, n_events=5_000, seed=3)


def save_model(data, path: Path, seed: int, n_items: int | None = None, population_vector: bool = True) -> Path:
    torch.manual_seed(seed)
    items = data.interactions["item_id"].unique(maintain_order=True)
    items = items.head(n_items) if n_items else items
    model = NestedModel(NestedConfig(n_items=len(items)))
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
    scorer, item_ids, _ = scorer_from_checkpoint(model.with_suffix(".safetensors"))
    vector = np.random.default_rng(0).normal(size=64).astype(np.float32)
    population = np.linspace(0, 1, len(item_ids), dtype=np.float32)
    clock, away = 1_700_000_000, 3 * 86400  # alice's latest event was 3 days before the stream's clock
    repo.push_user_state(["alice", POPULATION_KEY], [vector, population], events=[3, 100],
                         last_ts=[clock - away, clock])
    with torch.no_grad():
        want = scorer(torch.from_numpy(vector)[None], torch.tensor([float(away)]), torch.from_numpy(population),
                      torch.zeros(1, len(item_ids), dtype=torch.bool))[1][0, :5]
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path))) as url:
        got = httpx.get(f"{url}/recommendations/alice", params={"k": 5}).json()
        assert got["source"] == "user"
        assert [r["item_id"] for r in got["items"]] == [item_ids[i] for i in want.tolist()]
        scores = [r["score"] for r in got["items"]]
        assert scores == sorted(scores, reverse=True)

        top = got["items"][0]["item_id"]
        again = httpx.get(f"{url}/recommendations/alice", params={"k": 5, "exclude": top}).json()
        assert top not in [r["item_id"] for r in again["items"]]  # excluded by the request

        repo.push_user_state(["bob"], [vector], events=[1], recent_items=[[item_ids.index(top)]])
        bob = httpx.get(f"{url}/recommendations/bob", params={"k": 5}).json()
        assert top not in [r["item_id"] for r in bob["items"]]  # bob just saw it: masked from the store

        stranger = httpx.get(f"{url}/recommendations/nobody-knows-me", params={"k": 10})
        assert stranger.status_code == 200 and stranger.json()["source"] == "population"
        assert len(stranger.json()["items"]) == 10

        health = httpx.get(f"{url}/healthz").json()
        assert health["status"] == "ok" and health["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
        assert "recsys_serve_requests" in httpx.get(f"{url}/metrics").text


def test_bad_requests_get_a_clear_4xx(model, repo):
    with BackgroundServer(create_app(ServeConfig(model=model, feature_repo=repo.path, api_key="s3cret"))) as url:
        assert httpx.get(f"{url}/recommendations/alice", params={"k": 0}).status_code == 422
        assert httpx.get(f"{url}/recommendations/alice", params={"k": 5000}).status_code == 422
        assert httpx.get(f"{url}/recommendations/alice", params={"k": "ten"}).status_code == 422
        no_key = httpx.post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}')
        assert no_key.status_code == 401 and "X-API-Key" in no_key.json()["detail"]
        bad = httpx.post(f"{url}/events", content=b'{"user_id": "a", "ts": 1}', headers={"X-API-Key": "s3cret"})
        assert bad.status_code == 400 and bad.json()["error"] == "missing_field"
        no_kafka = httpx.post(f"{url}/events", content=b'{"user_id": "a", "item_id": "b", "ts": 1}',
                              headers={"X-API-Key": "s3cret"})
        assert no_kafka.status_code == 503  # a clear answer, not a hang, when no broker is configured


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
            with httpx.Client() as client:
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
        wait_until(lambda: httpx.get(f"{url}/healthz").json()["items"] == 100, "the new model to be swapped in")
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
        [sys.executable, "-m", "recsys.cli", "stream", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
         topic, "--group", f"g-{topic}", "--model", str(checkpoint), "--checkpoint-dir",
         str(tmp_path / "ckpt"), "--feature-repo", str(repo.path), "--log-every", "1"],
        stdout=(tmp_path / "worker.log").open("w"), stderr=subprocess.STDOUT)
    try:
        cfg = ServeConfig(model=model, feature_repo=repo.path, bootstrap_servers=broker.bootstrap_servers,
                          topic=topic, population_every_s=0.1)
        with BackgroundServer(create_app(cfg)) as url:
            log = tmp_path / "worker.log"
            wait_until(lambda: "assigned partitions" in log.read_text() or worker.poll() is not None,
                       "the worker to join its group")
            assert worker.poll() is None, log.read_text()
            before = httpx.get(f"{url}/recommendations/carol", params={"k": 10}).json()
            assert before["source"] == "population"

            items = data.interactions["item_id"].unique(maintain_order=True).cast(str).to_list()[:3]
            for n, item in enumerate(items):
                r = httpx.post(f"{url}/events", json={"user_id": "carol", "item_id": item, "ts": 1_700_000_000 + n})
                assert r.status_code == 202, r.text
            ranked = lambda answer: [r["item_id"] for r in answer["items"]]  # noqa: E731

            def changed():  # from her own state, and what she just saw is not recommended back
                after = httpx.get(f"{url}/recommendations/carol", params={"k": 10}).json()
                return (after["source"] == "user" and ranked(after) != ranked(before)
                        and not set(items) & set(ranked(after)))

            wait_until(changed, "carol's events to change her recommendations")
    finally:
        worker.terminate()
        assert worker.wait(30) == 0  # SIGTERM: a clean stop with a last checkpoint
