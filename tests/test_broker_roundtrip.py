import subprocess
from collections import Counter

import pytest

from recsys.synthetic import SyntheticConfig, generate
from streaming.broker import EmbeddedBroker
from streaming.consumer import ReaderConfig, read_topic
from streaming.producer import ProducerConfig, produce


def test_broker_starts_stops_and_reports_status(tmp_path):
    b = EmbeddedBroker.start(log_dir=tmp_path)
    assert b.is_running()
    b.stop()
    assert not b.is_running()


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
