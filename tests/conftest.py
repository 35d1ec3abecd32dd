"""Shared fixtures: a real Kafka-protocol broker on loopback for the whole test session,
and the stream and untrained model that the stream-worker tests feed it."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import torch

from recsys.datasets import load_dataset
from recsys.nested import NestedConfig, NestedModel
from streaming.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    b = EmbeddedBroker.start(log_dir=tmp_path_factory.mktemp("broker"))
    yield b
    b.stop()


@pytest.fixture
def topic() -> str:
    """A fresh topic per test, so tests never see each other's messages."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def stream():
    return load_dataset("synthetic", n_users=1500, n_items=2000, n_events=100_000, seed=5).interactions


@pytest.fixture(scope="session")
def model_path(stream, tmp_path_factory) -> Path:
    """An untrained model is enough: the test is about delivery, not quality."""
    torch.manual_seed(0)
    items = stream["item_id"].unique(maintain_order=True).head(1500)  # the rest arrive as new items
    model = NestedModel(NestedConfig(n_items=len(items), c_pop=100, pop_half_life=2000.0))
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    model.save(path, item_ids=items.to_list())
    return path
