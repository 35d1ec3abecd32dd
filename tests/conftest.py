"""Shared fixtures: a real Kafka-protocol broker on loopback for the whole test session."""

from __future__ import annotations

import uuid

import pytest

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
