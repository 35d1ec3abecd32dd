import subprocess
import sys
from collections import Counter

import pytest

from recsys.synthetic import SyntheticConfig, generate
from streaming.broker import EmbeddedBroker
from streaming.consumer import ReaderConfig, read_topic
from streaming.producer import ProducerConfig, produce
from waiting import wait_until


def test_broker_starts_stops_and_reports_status(tmp_path):
    b = EmbeddedBroker.start(log_dir=tmp_path)
    assert b.is_running()
    b.stop()
    assert not b.is_running()


def test_a_broker_started_by_a_process_that_is_killed_stops_with_it(tmp_path):
    """A bench or test run killed by a timeout (SIGKILL: no cleanup runs) leaves no broker."""
    script = ("import sys, time; from pathlib import Path; from streaming.broker import EmbeddedBroker; "
              f"b = EmbeddedBroker.start(log_dir=Path({str(tmp_path)!r})); print(b.pid, b.port, flush=True); "
              "time.sleep(300)")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid, port = map(int, parent.stdout.readline().split())
    broker = EmbeddedBroker(pid, "127.0.0.1", port, "")
    assert broker.is_running()
    parent.kill()
    parent.wait()
    wait_until(lambda: not broker.is_ours(), "the broker to stop with the process that started it")


def test_recsys_broker_start_leaves_its_broker_running(tmp_path, capsys):
    from commands.cli import main

    assert main(["broker", "start", "--state-dir", str(tmp_path)]) == 0
    broker = EmbeddedBroker.load(tmp_path)
    try:
        assert broker.is_running()  # started for other commands: it outlives this one
    finally:
        assert main(["broker", "stop", "--state-dir", str(tmp_path)]) == 0


def test_broker_stop_never_signals_a_process_that_now_holds_a_dead_brokers_pid(tmp_path, capsys):
    from commands.cli import main

    b = EmbeddedBroker.start(log_dir=tmp_path)
    b.stop()
    stranger = subprocess.Popen(["sleep", "300"])
    try:
        EmbeddedBroker(stranger.pid, b.host, b.port, b.log_path).save(tmp_path)  # the state file, now stale
        assert main(["broker", "stop", "--state-dir", str(tmp_path)]) == 0
        assert "nothing was signalled" in capsys.readouterr().out
        assert stranger.poll() is None, "stop killed a process that is not the broker"
        assert EmbeddedBroker.load(tmp_path) is None  # the stale record is gone
    finally:
        stranger.kill()
        stranger.wait()


def test_ten_thousand_events_through_the_broker_none_lost_none_duplicated(broker, topic):
    frame = generate(SyntheticConfig(n_users=300, n_items=500, n_events=12_000, seed=3)).interactions
    assert frame.height >= 10_000
    sent = produce(frame, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    got = read_topic(ReaderConfig(broker.bootstrap_servers, topic, count=sent.sent, progress=False),
                     keep_events=True)
    assert got.messages == sent.sent == frame.height
    assert got.duplicate_offsets == 0 and not got.rejected
    expected = Counter(zip(map(str, frame["user_id"]), map(str, frame["item_id"]), frame["ts"]))
    assert Counter((e.user_id, e.item_id, e.ts) for e in got.events) == expected


def test_per_user_order_is_kept(broker, topic):
    frame = generate(SyntheticConfig(n_users=50, n_items=200, n_events=3_000, seed=4)).interactions
    produce(frame, ProducerConfig(broker.bootstrap_servers, topic, progress=False))
    got = read_topic(ReaderConfig(broker.bootstrap_servers, topic, count=frame.height, progress=False),
                     keep_events=True)
    by_user: dict[str, list[int]] = {}
    for e in got.events:
        by_user.setdefault(e.user_id, []).append(e.ts)
    assert all(ts == sorted(ts) for ts in by_user.values())


@pytest.mark.slow
def test_cli_produce_and_consume(broker, topic, capsys):
    from commands.cli import main

    assert main(["produce", "--data", "synthetic", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
                 "--events", "2000", "--limit", "500"]) == 0
    assert main(["consume", "--bootstrap-servers", broker.bootstrap_servers, "--topic", topic,
                 "--count", "500"]) == 0
    out = capsys.readouterr().out
    assert '"valid": 500' in out
