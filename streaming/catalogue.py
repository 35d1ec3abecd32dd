"""One item catalogue for a worker group and its servers: an item first seen on the
stream gets the same index in every worker and server, across restarts and rebalances.

The catalogue is partition 0 of the topic ``<topic>.catalogue``, which only grows. A
worker that meets items it cannot name produces them there (acks=all), then reads the
partition to its end. The topic is made with one partition, but a broker that restarted
empty lets any client re-create it with its default count: so proposals name partition 0
and readers read only it, and the other partitions stay empty and unread.

Indices are the model's table first, then every other item in the order of its *first*
record: two workers proposing one item at the same moment only add a later
duplicate, which every reader skips. Whoever reads the same log with the same model
computes the same indices; nothing else is coordinated.

    >>> catalogue = Catalogue("127.0.0.1:9092", "interactions", model_item_ids)
    >>> catalogue.index(["1193", "brand-new-item"])      # proposes the new one, waits for it
    array([   0, 3706])
"""

from __future__ import annotations

import logging
import time

import numpy as np

from recsys.vocab import Vocab
from streaming.clients import create_topic, make_consumer, make_producer

log = logging.getLogger("recsys.stream")


def catalogue_topic(topic: str) -> str:
    return f"{topic}.catalogue"


class Catalogue:
    def __init__(self, bootstrap_servers: str, topic: str, model_items: list[str], timeout_s: float = 30.0):
        from kafka import TopicPartition

        self.bootstrap_servers, self.topic, self.timeout_s = bootstrap_servers, catalogue_topic(topic), timeout_s
        self.items = Vocab(model_items)  # index -> item id: the model's table, then the catalogue's order
        self.n_model = len(model_items)
        try:
            create_topic(bootstrap_servers, self.topic, partitions=1)
        except Exception as e:  # created already (by another worker, or before): read it as it is
            if "TopicAlreadyExists" not in type(e).__name__ + str(e):
                raise
        self.partition = TopicPartition(self.topic, 0)
        self.consumer = make_consumer(bootstrap_servers)
        partitions = self.consumer.partitions_for_topic(self.topic) or {0}
        if len(partitions) > 1:
            log.warning("the item catalogue topic %s has %d partitions (re-created by a client's auto-creation?): "
                        "only partition 0 is read and written", self.topic, len(partitions))
        self.consumer.assign([self.partition])
        self.consumer.seek_to_beginning(self.partition)
        self.producer = None
        self.refresh()

    def refresh(self) -> int:
        """Read the topic to its end; returns how many items it added."""
        before = len(self.items)
        deadline = time.monotonic() + self.timeout_s
        end = self.consumer.end_offsets([self.partition])[self.partition]
        while self.consumer.position(self.partition) < end:
            for records in self.consumer.poll(timeout_ms=100).values():
                self.items.index([r.value.decode() for r in records])  # a known id keeps its index
            if time.monotonic() > deadline:
                raise TimeoutError(f"the item catalogue {self.topic} could not be read to its end ({end}) "
                                   f"within {self.timeout_s:.0f}s")
        return len(self.items) - before

    def index(self, item_ids: list[str]) -> np.ndarray:
        """Every item's index; items new to the catalogue are proposed and read back first.
        An item the catalogue still cannot name (its proposal not in the log) is -1: the
        caller decides what becomes of its events."""
        rows = self.items.index(item_ids, add=False)
        if (rows >= 0).all():
            return rows
        new = list(dict.fromkeys(i for i, r in zip(item_ids, rows.tolist()) if r < 0))
        if self.producer is None:
            self.producer = make_producer(self.bootstrap_servers, linger_ms=0, acks="all")
        for item in new:
            self.producer.send(self.topic, value=item.encode(), partition=self.partition.partition)
        self.producer.flush(timeout=self.timeout_s)
        self.refresh()  # our records are in the log now: reading to its end names them
        return self.items.index(item_ids, add=False)

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        if self.producer is not None:
            self.producer.close()
