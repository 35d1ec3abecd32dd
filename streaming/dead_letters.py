"""Poison messages, copied to the dead-letter topic with why they were refused and where
they came from. Whatever happens to a copy, the worker's loop goes on: a body too large for
the broker is truncated first, and a copy the broker refuses is counted and logged with
its offset (``recsys_stream_dead_letters_lost_total``).
"""

from __future__ import annotations

import logging
from collections import Counter

from streaming.clients import make_dead_letter_producer
from streaming.events import InvalidEvent

log = logging.getLogger("recsys.stream")
MAX_KEY_BYTES = 1024  # a dead letter keeps at most this much of a poison message's key


class DeadLetters:
    def __init__(self, bootstrap_servers: str, topic: str, max_body_bytes: int, metrics):
        self.bootstrap_servers, self.topic, self.max_body_bytes, self.metrics = (bootstrap_servers, topic,
                                                                                 max_body_bytes, metrics)
        self.producer = None  # connected by the loop, after the worker forked its online-store writer
        self.sent = Counter()  # reason -> messages dead-lettered

    def connect(self) -> None:
        self.producer = make_dead_letter_producer(self.bootstrap_servers, self.max_body_bytes)

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def send(self, rec, err: InvalidEvent) -> None:
        body = rec.value if rec.value is not None else b""  # a record needs a key or a value
        headers = [("reason", err.reason.encode()), ("detail", str(err.detail)[:500].encode()),
                   ("source", f"{rec.topic}/{rec.partition}/{rec.offset}".encode())]
        if len(body) > self.max_body_bytes:
            headers.append(("truncated_from", str(len(body)).encode()))
            body = body[:self.max_body_bytes]
        key = rec.key[:MAX_KEY_BYTES] if rec.key is not None else None
        self.sent[err.reason] += 1
        self.metrics.dead.labels(err.reason).inc()
        try:
            future = self.producer.send(self.topic, key=key, value=body, headers=headers)
        except Exception as e:  # refused before it left (too large, broker unknown for max_block_ms)
            self._lost(e, rec, err.reason)
        else:
            future.add_errback(self._lost, rec, err.reason)

    def flush(self) -> None:
        """Every copy sent (or counted lost); raises when the broker is away."""
        self.producer.flush(timeout=30)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()

    def _lost(self, error: BaseException, rec, reason: str) -> None:
        self.metrics.dead_lost.labels(reason).inc()
        log.error("dead letter for %s/%d offset %d (%s) not delivered, skipped: %s", rec.topic, rec.partition,
                  rec.offset, reason, error)
