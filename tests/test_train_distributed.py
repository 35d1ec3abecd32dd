"""`recsys train` under torchrun: data parallel over two CPU processes (gloo)."""

import re
import subprocess
import sys

import pytest
import torch

from recsys.nested import NestedModel


@pytest.mark.slow
def test_torchrun_trains_identical_replicas_and_saves_once(tmp_path):
    out = tmp_path / "model.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "commands.cli", "train", "--data", "synthetic", "--events", "6000", "--epochs", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sums = dict(re.findall(r"rank (\d)/2: parameter checksum (\S+)", run.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # each rank saw other users, same weights
    model = NestedModel.load(out)
    assert torch.isfinite(model.item_table()).all()


@pytest.mark.slow
def test_torchrun_shards_the_item_table_across_processes(tmp_path):
    """Model parallel: each process holds half the table's columns, trains it through all-to-all
    lookups, and the gathered table is saved once."""

    out = tmp_path / "model.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "commands.cli", "train", "--data", "synthetic", "--events", "6000", "--epochs", "1", "--shard",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    shards = {int(r): (int(a), int(b)) for r, a, b in re.findall(r"rank (\d)/2: item table shard rows \S+ columns (\d+):(\d+)",
                                                               run.stdout)}
    model = NestedModel.load(out)
    assert sorted(shards.values()) == [(0, model.cfg.dim // 2), (model.cfg.dim // 2, model.cfg.dim)]
    sums = dict(re.findall(r"rank (\d)/2: parameter checksum (\S+)", run.stdout))
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]  # the gathered table and the dense replicas agree
    torch.manual_seed(0)  # the table every rank started from (TrainConfig.seed)
    initial = NestedModel(model.cfg).item_table()
    trained = model.item_table()
    assert torch.isfinite(trained).all()
    for lo, hi in shards.values():  # both shards were trained, not only the one on rank 0
        assert not torch.allclose(trained[:, lo:hi], initial[:, lo:hi])
