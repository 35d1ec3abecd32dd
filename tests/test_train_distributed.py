"""`recsys train` under torchrun: data parallel over two CPU processes (gloo)."""

import re
import subprocess
import sys

import pytest
import torch

from recsys.nested_model import NestedModel


@pytest.mark.slow
def test_torchrun_trains_identical_replicas_and_saves_once(tmp_path):
    out = tmp_path / "model.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "recsys.cli", "train", "--data", "synthetic", "--events", "6000", "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d)/2: parameter checksum (\S+)", run.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # each rank saw other users, same weights
    model = NestedModel.load(out)
    assert torch.isfinite(model.item_table()).all()
