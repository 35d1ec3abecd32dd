"""Produce an interaction log to a Kafka topic, keyed by user (one partition owns a user).

    >>> produce(dataset.interactions, ProducerConfig(bootstrap_servers="127.0.0.1:9092"))
    ProduceSummary(sent=200000, seconds=17.9, events_per_second=11173.2)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import polars as pl
from tqdm import tqdm

from streaming.clients import make_producer


@dataclass(frozen=True)
class ProducerConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "interactions"
    rate: float | None = None  # events per second; None: as fast as possible
    event_type: str = "view"  # for logs that carry none
    progress: bool = True
    linger_ms: int = 5

    def __post_init__(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be positive (events per second), got {self.rate}")


@dataclass(frozen=True)
class ProduceSummary:
    sent: int
    seconds: float

    @property
    def events_per_second(self) -> float:
        return self.sent / max(self.seconds, 1e-9)


def encode_frame(frame: pl.DataFrame, event_type: str = "view") -> pl.DataFrame:
    """The wire form of every row, built column-wise by polars (no per-event Python):
    columns ``key`` and ``value`` (the `Event` JSON, same bytes as ``Event.to_json``)."""
    kind = pl.col("event_type").fill_null(event_type) if "event_type" in frame.columns else pl.lit(event_type)
    value = (pl.when(pl.col("value").is_finite()).then(pl.lit(',"value":') + pl.col("value").cast(pl.Utf8))
             .otherwise(pl.lit("")) if "value" in frame.columns else pl.lit(""))
    # The log's own ids, exactly as written, JSON-quoted (a quote or backslash in an id stays one).
    uid, iid = (pl.col(c).cast(pl.Utf8).map_elements(json.dumps, return_dtype=pl.Utf8) if _needs_escape(frame[c])
                else pl.lit('"') + pl.col(c).cast(pl.Utf8) + pl.lit('"') for c in ("user_id", "item_id"))
    wire = pl.concat_str([
        pl.lit('{"user_id":'), uid, pl.lit(',"item_id":'), iid, pl.lit(',"ts":'),
        pl.col("ts").cast(pl.Utf8), pl.lit(',"event_type":"'), kind, pl.lit('"'), value, pl.lit("}"),
    ])
    return frame.select(key=pl.col("user_id").cast(pl.Utf8), value=wire)


def _needs_escape(ids: pl.Series) -> bool:
    return bool(ids.dtype == pl.Utf8 and ids.str.contains(r'["\\\x00-\x1f]').any())


def produce(frame: pl.DataFrame, cfg: ProducerConfig) -> ProduceSummary:
    wire = encode_frame(frame, cfg.event_type)
    producer = make_producer(cfg.bootstrap_servers, cfg.linger_ms)
    start = time.perf_counter()
    try:
        with tqdm(total=wire.height, unit="ev", mininterval=1.0, disable=not cfg.progress, desc=f"produce → {cfg.topic}") as bar:
            for n, (key, value) in enumerate(wire.iter_rows()):
                producer.send(cfg.topic, key=key.encode(), value=value.encode())
                if cfg.rate is not None:  # pace against the wall clock, not per-message sleeps
                    ahead = (n + 1) / cfg.rate - (time.perf_counter() - start)
                    if ahead > 0.005:
                        time.sleep(ahead)
                if n % 1000 == 999:
                    bar.update(1000)
            producer.flush()
            bar.update(wire.height - bar.n)
    finally:
        producer.close()
    return ProduceSummary(wire.height, time.perf_counter() - start)
