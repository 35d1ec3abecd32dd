"""The command line as a new user meets it: defaults in --help, one-line errors that name
the command to run, and a diverging training that saves nothing."""

import pytest
import torch

from commands.cli import main
from offline_eval.report import ReplayConfig, run_replay
from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel
from recsys.train import NonFiniteLoss, TrainConfig


def help_text(capsys, *command) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def test_help_shows_every_default_and_the_model_names(capsys):
    replay = help_text(capsys, "replay")
    assert "(default: 256)" in replay and "(default: auto)" in replay  # --batch-size, --ts-unit
    assert "nested_no_user_fast" in replay and "sasrec_static" in replay
    assert "(default: 9092)" in help_text(capsys, "broker")


@pytest.mark.parametrize("command", ["train", "replay", "produce"])
def test_commands_that_read_a_log_require_data_instead_of_using_the_synthetic_one(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command])
    assert done.value.code == 2 and "--data" in capsys.readouterr().err


def test_serving_a_training_file_says_to_export_it_first(tmp_path, capsys):
    path = tmp_path / "model.safetensors"
    NestedModel(NestedConfig(n_items=5)).save(path, item_ids=list("abcde"))
    assert main(["serve", "--model", str(path)]) == 2
    err = capsys.readouterr().err
    assert "recsys export" in err and "INVALID_PROTOBUF" not in err
    assert main(["serve", "--model", str(tmp_path / "missing.onnx")]) == 2
    assert "run `recsys export" in capsys.readouterr().err


def test_a_diverging_training_exits_nonzero_and_leaves_no_model_and_no_fit(tmp_path, capsys):
    ds = load_dataset("synthetic", n_users=100, n_items=120, n_events=2_000, seed=1)
    csv = tmp_path / "log.csv"
    ds.interactions.write_csv(csv)
    out = tmp_path / "model.safetensors"
    assert main(["train", "--data", str(csv), "--lr", "1e30", "--epochs", "1", "--out", str(out)]) == 2
    assert "training loss became nan" in capsys.readouterr().err and not out.exists()
    cache = tmp_path / "fits"
    with pytest.raises(NonFiniteLoss):
        run_replay(ds, ReplayConfig(models=("nested",), progress=False, fit_cache=cache,
                                    train=TrainConfig(lr=1e30, epochs=1)))
    assert not cache.exists() or not any(cache.iterdir())
