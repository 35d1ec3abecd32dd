"""A checkpoint file is rewritten in place of the old one: readers never find it missing."""

import os

import torch

from streaming.checkpoint import Snapshot, previous, read_checkpoint, write_checkpoint


def snapshot(offset: int) -> Snapshot:
    return Snapshot(topic="interactions", offsets={0: offset}, user_ids=["u1"], partitions=torch.zeros(1, dtype=torch.long),
                    users={"S": torch.full((1, 4), float(offset))}, population={}, item_ids=["i1"])


def test_a_rewrite_keeps_the_file_readable_at_every_rename_and_the_last_one_as_previous(tmp_path, monkeypatch):
    path = tmp_path / "w1.safetensors"
    write_checkpoint(path, snapshot(10))
    seen = []
    replace = os.replace

    def watched(src, dst):
        seen.append(read_checkpoint(path).offsets)  # raises if the name is missing at this moment
        replace(src, dst)

    monkeypatch.setattr(os, "replace", watched)
    write_checkpoint(path, snapshot(20))

    assert seen and all(offsets == {0: 10} for offsets in seen)
    assert read_checkpoint(path).offsets == {0: 20}
    assert read_checkpoint(previous(path)).offsets == {0: 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w1.safetensors", "w1.safetensors.prev"]
