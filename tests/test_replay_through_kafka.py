"""`--through-kafka`: the nested model's stream goes broker → stream worker, and the
replay scores from the worker's state; the metrics equal the in-process replay's."""

import numpy as np

from offline_eval.protocol import ProtocolConfig, encode
from offline_eval.replay import replay_model
from offline_eval.report import ReplayConfig, run_replay
from offline_eval.through_kafka import WorkerPath
from recsys.datasets import load_dataset
from offline_eval.nested import NestedReplay
from recsys.train import TrainConfig


def small():
    return load_dataset("synthetic", n_users=120, n_items=150, n_events=4_000, seed=5)


def test_the_worker_path_ranks_every_event_as_the_in_process_replay(broker, tmp_path):
    log = encode(small())
    cfg = ProtocolConfig(batch_size=64)
    fitted = NestedReplay(train_cfg=TrainConfig(progress=False, epochs=1))
    fitted.fit(log.history())
    with WorkerPath(fitted, log, broker.bootstrap_servers, tmp_path) as through_kafka:
        via_worker = replay_model(through_kafka, log, cfg, progress=False, fitted=True)
        assert through_kafka.worker.stats().applied == log.n_events - log.n_history  # every stream event, once
    in_process = replay_model(fitted, log, cfg, progress=False, fitted=True)
    np.testing.assert_array_equal(via_worker.ranks, in_process.ranks)


def test_the_report_marks_which_models_took_the_kafka_path(broker, tmp_path):
    report = run_replay(small(), ReplayConfig(models=("pop_online", "nested"), progress=False,
                                              through_kafka=broker.bootstrap_servers, workdir=tmp_path))
    assert report["models"]["nested"]["path"] == "kafka → stream worker"
    assert report["models"]["pop_online"]["path"] == "in-process"  # no stream worker applies a baseline
