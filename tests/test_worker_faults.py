"""The stream worker under attack, against the real broker: poison messages, a recreated
topic, a future clock, a clock jump on a lagging stream, a catalogue re-created with four
partitions, damaged checkpoints, a failing disk and a locked online store.

In each case the worker goes on, loses nothing, and says what happened: the user rows in
its checkpoints are compared with the same events applied in-process (`reference_rows`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from kafka.serializer import Serializer

from recsys.nested import NestedConfig, NestedModel, load_item_ids
from recsys.nested.state import ITEM_FIELDS
from streaming.broker import EmbeddedBroker, free_port
from streaming.catalogue import catalogue_topic
from streaming.checkpoint import previous, read_checkpoint
from streaming.clients import create_topic, make_producer
from streaming.producer import ProducerConfig, produce
from waiting import wait_until
from workers import (RedisServer, Worker, assert_exactly_once, checkpointed, dead_letters, held_users,
                     merged_checkpoints, metric, reference_rows)

pytestmark = pytest.mark.slow

YEAR_2099 = 4_102_444_799


class NullAs(Serializer):
    """b"NULL" serialises to null: a record with neither key nor value, which send() refuses to build."""

    def serialize(self, topic, value):
        return None if value == b"NULL" else value


def test_poison_a_broker_would_refuse_as_a_dead_letter_never_stops_the_worker(broker, topic, stream, model_path,
                                                                             tmp_path):
    good = stream.head(6_000)
    produce(good.head(3_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    producer = make_producer(broker.bootstrap_servers, key_serializer=NullAs(), value_serializer=NullAs())
    producer.send(topic, key=b"big", value=b'{"user_id": "' + b"x" * 1_500_000 + b'"}')  # 1.5 MB
    producer.send(topic, key=b"NULL", value=b"NULL")
    producer.send(topic, key=b"u-future", value=b'{"user_id": "u-future", "item_id": "1", "ts": %d}' % YEAR_2099)
    producer.flush()
    producer.close()
    produce(good.tail(3_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))

    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.5")
    w.finish_at(tmp_path / "ckpt" / "w1.safetensors", good.height + 3)  # exits 0: it never stopped
    assert_exactly_once(merged_checkpoints(tmp_path / "ckpt", topic), good, reference_rows(model_path, good))

    letters = {dict(m.headers)["reason"].decode(): m for m in dead_letters(broker, topic)}
    assert set(letters) == {"oversized", "not_json", "future_timestamp"}
    big = letters["oversized"]
    assert int(dict(big.headers)["truncated_from"]) > 1_500_000 and 0 < len(big.value) <= 64 * 1024
    assert letters["not_json"].key is None and letters["not_json"].value == b""
    # The stream clock is moved by accepted events only: 2099 never reached the state.
    snap = read_checkpoint(tmp_path / "ckpt" / "w1.safetensors")
    assert int(snap.users["last_ts"].max()) == int(good["ts"].max())


def test_a_dead_letter_the_broker_refuses_is_counted_logged_and_skipped(broker, topic, stream, model_path, tmp_path):
    good = stream.head(2_000)
    producer = make_producer(broker.bootstrap_servers)
    producer.send(topic, key=b"bad", value=b"{not json")
    producer.flush()
    produce(good, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    port = free_port()
    # A dead-letter topic name the broker cannot create: every dead letter is refused.
    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.5",
               "--dead-letter-topic", "no spaces/allowed here", "--metrics-port", str(port))
    wait_until(lambda: metric(port, "recsys_stream_dead_letters_lost_total", reason="not_json") == 1
               or w.proc.poll() is not None, "the refused dead letter to be counted")
    w.finish_at(tmp_path / "ckpt" / "w1.safetensors", good.height + 1)
    assert_exactly_once(merged_checkpoints(tmp_path / "ckpt", topic), good)
    assert "offset" in w.text() and "not delivered, skipped" in w.text()


def test_a_recreated_topic_is_detected_and_applied_from_its_beginning(stream, model_path, tmp_path):
    port = free_port()
    ckpt = tmp_path / "ckpt" / "w1.safetensors"
    first, second = stream.head(8_000), stream.slice(8_000, 3_000)
    old = EmbeddedBroker.start(port=port, log_dir=tmp_path / "broker")
    try:
        produce(first, ProducerConfig(old.bootstrap_servers, "events", progress=False))
        w = Worker(old, "events", model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.3",
                   "--metrics-port", str(metrics := free_port()))
        wait_until(lambda: checkpointed(ckpt) == first.height or w.proc.poll() is not None, "the first log applied")
    finally:
        old.stop()
    new = EmbeddedBroker.start(port=port, log_dir=tmp_path / "broker")  # same address, empty memory
    try:
        produce(second, ProducerConfig(new.bootstrap_servers, "events", progress=False))
        # The stored offsets (8,000 in all) lie past the new log's end: the worker must notice and start over.
        wait_until(lambda: checkpointed(ckpt) == second.height and _events_held(ckpt) == 11_000
                   or w.proc.poll() is not None, "the new log applied from its beginning", timeout_s=180)
        assert w.proc.poll() is None, w.text()[-3000:]
        assert metric(metrics, "recsys_stream_partition_resets_total") >= 1
        wait_until(lambda: metric(metrics, "recsys_stream_lag") == 0, "the lag gauge to read the new log's end")
        w.proc.terminate()
        w.finish()
    finally:
        new.stop()
    assert "recreated or truncated" in w.text()
    both = pl.concat([first, second])
    assert_exactly_once(merged_checkpoints(tmp_path / "ckpt", "events"), both)  # user rows were kept


def _events_held(path: Path) -> int:
    try:
        return int(read_checkpoint(path).users["cnt"].sum())
    except Exception:
        return 0


def test_damaged_checkpoints_fall_back_to_the_previous_file_then_to_the_log(broker, topic, stream, model_path,
                                                                           tmp_path):
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    cfg = ProducerConfig(broker.bootstrap_servers, topic, progress=False)

    def run_until(events: int) -> Worker:
        w = Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.3")
        w.finish_at(own, events)
        return w

    for start in (0, 5_000):  # two runs, each ending with a checkpoint
        produce(stream.slice(start, 5_000), cfg)
        run_until(start + 5_000)
    assert 5_000 <= checkpointed(previous(own)) < checkpointed(own) == 10_000  # the last two files are kept

    own.write_bytes(own.read_bytes()[:len(own.read_bytes()) // 2])  # truncated
    produce(stream.slice(10_000, 10_000), cfg)
    w = run_until(20_000)
    assert f"skipping checkpoint: {own}: unreadable" in w.text()
    assert_exactly_once(merged_checkpoints(ckpt, topic), stream.head(20_000))

    for path in (own, previous(own)):  # bytes flipped to NaN in both files: nothing intact is left
        _poison_with_nan(path)
    produce(stream.slice(20_000, 5_000), cfg)
    w = run_until(25_000)
    assert "checksum mismatch" in w.text() and "starts from the beginning of the log" in w.text()
    head = stream.head(25_000)
    assert_exactly_once(merged_checkpoints(ckpt, topic), head, reference_rows(model_path, head))
    assert all(torch.isfinite(v).all() for v in read_checkpoint(own).users.values() if v.is_floating_point())


def _poison_with_nan(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["user.M"][: len(tensors["user.M"]) // 2] = float("nan")
    save_file(tensors, str(path), metadata=metadata)


def test_a_failing_disk_is_retried_while_events_go_on_being_applied(broker, topic, stream, model_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    port = free_port()
    cfg = ProducerConfig(broker.bootstrap_servers, topic, progress=False)
    produce(stream.head(5_000), cfg)
    w = Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.3", "--metrics-port", str(port))
    wait_until(lambda: checkpointed(own) == 5_000 or w.proc.poll() is not None, "the first checkpoint")
    blocker = ckpt / ".w1.safetensors.tmp"
    blocker.mkdir()  # the temporary file cannot be created: every write fails (root ignores read-only bits)
    produce(stream.slice(5_000, 5_000), cfg)
    wait_until(lambda: (metric(port, "recsys_stream_events_total") == 10_000
                        and metric(port, "recsys_stream_checkpoint_failures_total") >= 1) or w.proc.poll() is not None,
               "events applied while checkpoints fail")
    assert w.proc.poll() is None, w.text()[-3000:]
    assert checkpointed(own) == 5_000
    blocker.rmdir()
    w.finish_at(own, 10_000)
    assert "Is a directory" in w.text()
    head = stream.head(10_000)
    assert_exactly_once(merged_checkpoints(ckpt, topic), head)


def test_a_disk_that_stays_broken_stops_the_worker_with_a_clear_error(broker, topic, stream, model_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    (ckpt / ".w1.safetensors.tmp").mkdir(parents=True)
    produce(stream.head(1_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    w = Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.2", "--checkpoint-give-up", "2")
    assert w.proc.wait(180) != 0  # for a supervisor to restart it elsewhere
    assert "no checkpoint written to" in w.text() and "exiting for a restart" in w.text()


def test_a_locked_online_store_delays_pushes_but_loses_no_user(broker, topic, stream, model_path, tmp_path):
    from features.store import FeatureRepo

    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    port = free_port()
    cfg = ProducerConfig(broker.bootstrap_servers, topic, progress=False)
    produce(stream.head(3_000), cfg)
    w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--feature-repo", str(repo.path),
               "--metrics-port", str(port))
    wait_until(lambda: metric(port, "recsys_stream_push_rows_count") >= 1 or w.proc.poll() is not None,
               "the first push")
    lock = sqlite3.connect(repo.path / "data" / "online.db")
    lock.execute("BEGIN EXCLUSIVE")  # held by another writer: every push fails meanwhile
    try:
        produce(stream.slice(3_000, 3_000), cfg)
        wait_until(lambda: (metric(port, "recsys_stream_events_total") == 6_000
                            and metric(port, "recsys_stream_push_failures_total") >= 1) or w.proc.poll() is not None,
                   "pushes failing while events are applied")
    finally:
        lock.rollback()
        lock.close()
    assert w.proc.poll() is None, w.text()[-3000:]
    expected = Counter(stream.head(6_000)["user_id"].cast(pl.Utf8).to_list())
    users = sorted(expected)

    def store_is_current() -> bool:
        return repo.user_state(users)["events"] == [expected[u] for u in users]

    wait_until(store_is_current, "every user's latest vector in the online store")
    w.proc.terminate()
    w.finish()


def test_an_idle_worker_writes_no_checkpoint(broker, topic, stream, model_path, tmp_path):
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    produce(stream.head(2_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    port = free_port()
    w = Worker(broker, topic, model_path, ckpt, "w1", "--checkpoint-every", "0.1", "--metrics-port", str(port))
    wait_until(lambda: checkpointed(own) == 2_000 or w.proc.poll() is not None, "the stream applied")
    stamp = own.stat().st_mtime_ns
    # Twenty checkpoint intervals of silence, by the worker's own checkpoint-age gauge (a rewrite resets it).
    wait_until(lambda: metric(port, "recsys_stream_checkpoint_age_seconds") > 2.0 or own.stat().st_mtime_ns != stamp,
               "twenty idle checkpoint intervals")
    assert own.stat().st_mtime_ns == stamp, "an idle worker rewrote its checkpoint"
    assert metric(port, "recsys_stream_users") == stream.head(2_000)["user_id"].n_unique()
    w.proc.terminate()
    w.finish()


def assert_held_or_evicted_exactly_once(ckpt: Path, topic: str, repo, head: pl.DataFrame, model_path: Path) -> None:
    """Each user's row — in a checkpoint, or evicted to the online store — equals ``head``
    applied in one pass without eviction."""
    from streaming.checkpoint import decode_user_row

    rows = merged_checkpoints(ckpt, topic)
    away = sorted(set(head["user_id"].cast(pl.Utf8).to_list()) - set(rows))
    cfg = NestedModel.load(model_path).cfg  # a stored row names its latest, negative and shown items, in turn
    ends = np.cumsum([0, cfg.recent_items, cfg.negative_items, cfg.shown_items])
    for uid, blob in zip(away, repo.evicted(away)):
        assert blob is not None, f"user {uid} is neither held nor in the online store"
        row = decode_user_row(blob)
        rows[uid] = row.fields | {name: [i for i in row.latest[lo:hi] if i is not None]
                                  for name, lo, hi in zip(ITEM_FIELDS, ends[:-1], ends[1:])}
    assert_exactly_once(rows, head, reference_rows(model_path, head))


def test_idle_users_leave_memory_for_the_online_store_and_return_where_they_left(broker, topic, stream, model_path,
                                                                                 tmp_path):
    from features.store import FeatureRepo

    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    port = free_port()
    cfg = ProducerConfig(broker.bootstrap_servers, topic, progress=False)
    first = stream.head(4_000)
    produce(first, cfg)
    w = Worker(broker, topic, model_path, ckpt, "w1", "--feature-repo", str(repo.path), "--user-ttl", "1",
               "--checkpoint-every", "0.3", "--metrics-port", str(port))
    # Everyone idles past the TTL: memory and the checkpoint hold no user, the online store holds them all.
    wait_until(lambda: checkpointed(own) == first.height and held_users(own) == 0
               or w.proc.poll() is not None, "every idle user evicted", timeout_s=180)
    assert w.proc.poll() is None, w.text()[-3000:]
    assert metric(port, "recsys_stream_users") == 0
    assert metric(port, "recsys_stream_users_evicted_total") == first["user_id"].n_unique()

    produce(stream.slice(4_000, 4_000), cfg)  # most of them come back
    wait_until(lambda: metric(port, "recsys_stream_users_rehydrated_total") > 0 or w.proc.poll() is not None,
               "returning users taken back from the online store")
    w.finish_at(own, 8_000)

    # Every user's row, wherever it lives now, equals the same events applied without eviction.
    assert_held_or_evicted_exactly_once(ckpt, topic, repo, stream.head(8_000), model_path)


def test_past_max_users_the_least_recent_leave_for_the_online_store_and_return_where_they_left(
        broker, topic, stream, model_path, tmp_path):
    """The default bound on held users (no TTL set): a burst of new users cannot grow the
    worker without limit, and nobody's state is lost on the way out and back."""
    from features.store import FeatureRepo

    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    ckpt = tmp_path / "ckpt"
    own = ckpt / "w1.safetensors"
    port = free_port()
    cfg = ProducerConfig(broker.bootstrap_servers, topic, progress=False)
    first = stream.head(4_000)
    produce(first, cfg)
    w = Worker(broker, topic, model_path, ckpt, "w1", "--feature-repo", str(repo.path), "--max-users", "200",
               "--checkpoint-every", "0.3", "--metrics-port", str(port))
    wait_until(lambda: checkpointed(own) == first.height and (n := held_users(own)) is not None and n <= 200
               or w.proc.poll() is not None, "held users down to the bound", timeout_s=180)
    assert w.proc.poll() is None, w.text()[-3000:]
    assert metric(port, "recsys_stream_users_evicted_total") >= first["user_id"].n_unique() - 200

    produce(stream.slice(4_000, 2_000), cfg)
    wait_until(lambda: metric(port, "recsys_stream_users_rehydrated_total") > 0 or w.proc.poll() is not None,
               "returning users taken back from the online store")
    w.finish_at(own, 6_000)
    assert_held_or_evicted_exactly_once(ckpt, topic, repo, stream.head(6_000), model_path)


def test_a_client_retry_under_the_same_event_id_is_applied_once(broker, topic, model_path, tmp_path):
    own = tmp_path / "ckpt" / "w1.safetensors"
    producer = make_producer(broker.bootstrap_servers)

    def send(item: str, event_id: str | None = None) -> None:
        event = {"user_id": "frank", "item_id": item, "ts": 1_700_000_000} | ({"event_id": event_id} if event_id else {})
        producer.send(topic, key=b"frank", value=json.dumps(event).encode())

    send("1", "a"), send("1", "a"), send("2", "b"), send("3"), send("2", "b")  # two retries among them
    producer.flush()
    Worker(broker, topic, model_path, tmp_path / "ckpt", "w1").finish_at(own, 5)
    snap = read_checkpoint(own)
    assert int(snap.users["cnt"][snap.user_ids.index("frank")]) == 3

    send("1", "a")  # retried again after a restart: the ids are in the checkpoint
    producer.flush()
    Worker(broker, topic, model_path, tmp_path / "ckpt", "w1").finish_at(own, 6)
    snap = read_checkpoint(own)
    assert int(snap.users["cnt"][snap.user_ids.index("frank")]) == 3
    producer.close()


def test_a_catalogue_topic_re_created_with_four_partitions_still_names_every_new_item(broker, topic, model_path,
                                                                                     tmp_path):
    # What a broker that restarted empty leaves: the catalogue re-created by a client's
    # auto-creation, with the broker's default partition count.
    create_topic(broker.bootstrap_servers, catalogue_topic(topic), partitions=4)
    own = tmp_path / "ckpt" / "w1.safetensors"
    producer = make_producer(broker.bootstrap_servers)
    for i in range(20):
        event = {"user_id": f"u{i % 5}", "item_id": f"new-{i}", "ts": 1_700_000_000 + i}
        producer.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
    producer.flush()
    Worker(broker, topic, model_path, tmp_path / "ckpt", "w1").finish_at(own, 20)
    snap = read_checkpoint(own)
    assert {f"new-{i}" for i in range(20)} <= set(snap.item_ids)
    assert int(snap.users["cnt"].sum()) == 20

    # A restart restores the partitions (the rebalance callback) and goes on with more new items.
    for i in range(20, 25):
        producer.send(topic, key=b"u0", value=json.dumps({"user_id": "u0", "item_id": f"new-{i}",
                                                          "ts": 1_700_000_100 + i}).encode())
    producer.flush()
    again = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1")
    again.finish_at(own, 25)
    snap = read_checkpoint(own)
    assert int(snap.users["cnt"].sum()) == 25 and "new-24" in snap.item_ids
    assert "partitions" in again.text() and "only partition 0 is read" in again.text()
    producer.close()


def test_a_stamp_years_past_a_lagging_streams_clock_is_dead_lettered_and_moves_nothing(broker, topic, stream,
                                                                                     model_path, tmp_path):
    """The synthetic stream is stamped in 2023–24, years behind the host: a client's "now"
    passes the host's guard but not the partition's own clock."""
    good = stream.head(2_000)
    produce(good.head(1_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    producer = make_producer(broker.bootstrap_servers)
    user = str(good["user_id"][0])
    jump = {"user_id": user, "item_id": str(good["item_id"][0]), "ts": int(time.time()) + 3_500}
    producer.send(topic, key=user.encode(), value=json.dumps(jump).encode())
    producer.flush()
    producer.close()
    produce(good.tail(1_000), ProducerConfig(broker.bootstrap_servers, topic, progress=False))

    Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--checkpoint-every", "0.5").finish_at(
        tmp_path / "ckpt" / "w1.safetensors", good.height + 1)
    # Every user's rows and clock as if the jump had never been sent: every top 10 unchanged.
    assert_exactly_once(merged_checkpoints(tmp_path / "ckpt", topic), good, reference_rows(model_path, good))
    letters = [dict(m.headers)["reason"].decode() for m in dead_letters(broker, topic)]
    assert letters == ["clock_jump"]
    snap = read_checkpoint(tmp_path / "ckpt" / "w1.safetensors")
    assert max(int(level["pop_ts"]) for level in snap.population.values()) == int(good["ts"].max())


def test_a_worker_on_a_model_of_another_dimension_names_the_model_that_wrote_the_checkpoint(broker, topic, stream,
                                                                                           model_path, tmp_path):
    produce(stream.head(500), ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    Worker(broker, topic, model_path, tmp_path / "ckpt", "w1").finish_at(tmp_path / "ckpt" / "w1.safetensors", 500)
    other = tmp_path / "dim32.safetensors"
    NestedModel(NestedConfig(n_items=1500, dim=32, c_pop=100, pop_half_life=2000.0)).save(
        other, item_ids=load_item_ids(model_path))

    w = Worker(broker, topic, other, tmp_path / "ckpt", "w2")
    assert w.proc.wait(120) == 2
    text = w.text()
    assert "holds user rows of another model" in text and f"written by {model_path}" in text
    assert "empty --checkpoint-dir" in text and "Traceback" not in text


def test_a_redis_restarted_empty_gets_every_users_row_back_within_a_minute(broker, topic, stream, model_path,
                                                                          tmp_path, monkeypatch):
    from features.store import FeatureRepo

    port = free_port()
    redis = RedisServer(port, tmp_path)
    monkeypatch.setenv("REDIS_CONNECTION", f"127.0.0.1:{port}")  # the repo's yaml reads it; the worker inherits it
    try:
        repo = FeatureRepo.create(tmp_path / "features", online="redis")
        repo.apply()
        events = stream.head(3_000)
        produce(events, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
        w = Worker(broker, topic, model_path, tmp_path / "ckpt", "w1", "--feature-repo", str(repo.path),
                   "--checkpoint-every", "1")
        expected = Counter(events["user_id"].cast(pl.Utf8).to_list())
        users = sorted(expected)

        def store_is_current() -> bool:
            return repo.user_state(users)["events"] == [expected[u] for u in users]

        wait_until(lambda: store_is_current() or w.proc.poll() is not None, "every user's row in Redis")
        redis.stop()
        redis = RedisServer(port, tmp_path)  # the same address, nothing in it; no event arrives meanwhile
        assert repo.user_state(users[:1])["events"] == [None]
        wait_until(lambda: store_is_current() or w.proc.poll() is not None, "every user's row pushed again", 60)
        assert w.proc.poll() is None, w.text()[-3000:]
        assert "lost rows" in w.text()
        w.proc.terminate()
        w.finish()
    finally:
        redis.stop()


def test_writes_to_a_failing_store_back_off_instead_of_retrying_every_push(model_path, tmp_path):
    from features.store import FeatureRepo
    from recsys.nested import NestedModel, ServingView
    from recsys.vocab import Vocab
    from streaming.metrics import Metrics
    from streaming.push import FeaturePush

    repo = FeatureRepo.create(tmp_path / "features")
    repo.apply()
    for part in (repo.path / "data").glob("online.db*"):  # a store that refuses every write at once
        part.write_bytes(b"\x00garbage" * 4096)
    model = NestedModel.load(model_path)
    state = model.update(model.init_state(1, 1500), torch.tensor([0]), torch.tensor([3]), torch.tensor([1_700_000_000]))
    metrics = Metrics(None)
    push = FeaturePush(repo.path, metrics)
    view = ServingView(model, state, Vocab(["u0"]), levels={})
    try:
        push.touched(torch.tensor([0]), [], np.zeros(1))
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:  # the worker loop's pace: a push every 0.1 s
            push.push(view)
            time.sleep(0.1)
        failures = metrics.registry.get_sample_value("recsys_stream_push_failures_total")
        assert 1 <= failures <= 8, failures  # 0.2, 0.4, 0.8, 1.6 s apart; ~30 without a backoff
        assert push.pending()  # the row waits for the store, never dropped
    finally:
        push.close()
