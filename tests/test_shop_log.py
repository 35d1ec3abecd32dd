"""A shop's own log, end to end, as a new user runs it: a CSV with string ids, millisecond
timestamps, an event_type column and a price column, through `recsys train`, `export`,
`features apply/materialize`, `produce` and `stream` (real broker, worker, Feast store,
ONNX Runtime server). The shop's customer is served from their own state, under their own
id, with the shop's item ids and prices."""

from __future__ import annotations

import subprocess
import sys
from functools import partial

import httpx
import polars as pl
import pytest

from commands.cli import main
from features.store import FeatureRepo
from logs import shop_log
from serving.app import BackgroundServer, ServeConfig, create_app
from waiting import wait_until

get, post = partial(httpx.get, timeout=60), partial(httpx.post, timeout=60)


@pytest.mark.slow
def test_a_shops_customer_is_served_from_their_own_state_under_their_own_ids(broker, topic, tmp_path):
    csv = tmp_path / "shop.csv"
    shop = shop_log(csv)
    model, onnx, repo = tmp_path / "model" / "model.safetensors", tmp_path / "model" / "model.onnx", tmp_path / "fs"
    data = ["--data", str(csv), "--item-columns", "price"]
    assert main(["train", *data, "--epochs", "1", "--out", str(model)]) == 0
    assert main(["export", "--model", str(model), "--out", str(onnx)]) == 0
    assert main(["features", "apply", *data, "--repo", str(repo)]) == 0
    assert main(["features", "materialize", "--repo", str(repo)]) == 0

    worker_log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "commands.cli", "stream", "--bootstrap-servers", broker.bootstrap_servers, "--topic",
         topic, "--group", f"g-{topic}", "--model", str(model), "--checkpoint-dir", str(tmp_path / "ckpt"),
         "--feature-repo", str(repo), "--log-every", "1"], stdout=worker_log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "assigned partitions" in worker_log.read_text() or worker.poll() is not None,
                   "the worker to join its group")
        assert worker.poll() is None, worker_log.read_text()
        assert main(["produce", *data, "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic]) == 0
        store = FeatureRepo(repo)
        wait_until(lambda: sum(events for _, _, events, _ in store.populations()) >= shop.height,
                   "every event of the log applied and pushed", 300)

        customer = shop["user_id"].value_counts().sort(["count", "user_id"], descending=True)["user_id"][0]
        price = dict(shop.select("item_id", "price").unique("item_id").iter_rows())
        cfg = ServeConfig(model=onnx, feature_repo=repo, bootstrap_servers=broker.bootstrap_servers, topic=topic,
                          population_every_s=0.1, allow_anonymous_writes=True)
        with BackgroundServer(create_app(cfg)) as url:
            def served():
                answer = get(f"{url}/recommendations/{customer}", params={"k": 10}).json()
                # the items' attributes arrive with the server's first catalogue read
                return answer if all("price" in r for r in answer["items"]) else None

            before = wait_until(served, "the customer's recommendations with item attributes")
            assert before["source"] == "user" and before["user_id"] == customer
            assert all(r["item_id"].startswith("sku-") for r in before["items"])
            assert all(r["price"] == price[r["item_id"]] for r in before["items"])

            wait_until(lambda: get(f"{url}/healthz").json()["kafka"], "the server to connect to Kafka")
            ranked = lambda answer: [r["item_id"] for r in answer["items"]]  # noqa: E731
            now = int(shop["timestamp"].max()) // 1000 + 60
            fresh = [i for i in price if i not in set(shop.filter(pl.col("user_id") == customer)["item_id"])][:4]
            for n, item in enumerate(fresh):
                r = post(f"{url}/events", json={"user_id": customer, "item_id": item, "ts": now + n,
                                                "event_type": "purchase"})
                assert r.status_code == 202, r.text

            def moved():
                after = get(f"{url}/recommendations/{customer}", params={"k": 10}).json()
                return (after["source"] == "user" and ranked(after) != ranked(before)
                        and not set(fresh) & set(ranked(after)))

            wait_until(moved, "the customer's own events to move their list")
    finally:
        worker.terminate()
        assert worker.wait(120) == 0, worker_log.read_text()[-3000:]
