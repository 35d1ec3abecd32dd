"""The Feast offline sources, written with polars from the protocol's history only: the
items' attributes (served beside each recommended item, whatever columns the catalogue
has), and the empty batch log of the user-state push source.

    >>> write_sources(dataset, history_fraction=0.8, repo=Path("runs/features"))
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from recsys.dataset import HISTORY_FRACTION, Dataset


def _stamp(col: str) -> pl.Expr:
    return pl.from_epoch(pl.col(col), time_unit="s").dt.replace_time_zone("UTC").alias("event_timestamp")


def history_of(ds: Dataset, history_fraction: float = HISTORY_FRACTION) -> pl.DataFrame:
    inter = ds.interactions.sort("ts", maintain_order=True)
    return inter.head(int(history_fraction * inter.height)).with_columns(pl.col("user_id", "item_id").cast(pl.Utf8))


def item_attributes(ds: Dataset, history: pl.DataFrame) -> pl.DataFrame:
    """Each item's activity in the history and, as one JSON object, whatever the catalogue says
    of it (MovieLens' title, genres and year; a log's ``--item-columns``; the generator's
    cluster). Catalogue items without a history event are described too (activity 0): a
    shop knows its new products before anyone buys them."""
    attrs = history.group_by("item_id").agg(history_events=pl.len().cast(pl.Int64), first_ts=pl.col("ts").min(),
                                            last_ts=pl.col("ts").max())
    described = [c for c in ds.items.columns if c != "item_id"] if ds.items is not None else []
    if described:
        meta = ds.items.select(pl.col("item_id").cast(pl.Utf8), attributes=pl.struct(described).struct.json_encode())
        attrs = attrs.join(meta, on="item_id", how="full", coalesce=True)
    else:
        attrs = attrs.with_columns(attributes=pl.lit(None, pl.Utf8))
    end = int(history["ts"].max()) if history.height else 0  # an undescribed item's row is as of the history's end
    return attrs.select("item_id", pl.col("history_events").fill_null(0), pl.col("first_ts").fill_null(-1),
                        pl.col("attributes").fill_null("{}"), _stamp("last_ts").fill_null(
                            pl.from_epoch(pl.lit(end), time_unit="s").dt.replace_time_zone("UTC")))


def write_sources(ds: Dataset, repo: Path, history_fraction: float = HISTORY_FRACTION) -> dict[str, int]:
    data = Path(repo) / "data"
    data.mkdir(parents=True, exist_ok=True)
    history = history_of(ds, history_fraction)
    frames = {"item_attributes": item_attributes(ds, history)}
    for name, frame in frames.items():
        frame.write_parquet(data / f"{name}.parquet")
    log = data / "user_state.parquet"  # the push source's batch log starts empty
    schema = {"user_id": pl.Utf8, "vector": pl.List(pl.Float32), "events": pl.Int64, "recent_items": pl.List(pl.Int64),
              "last_ts": pl.Int64, "fast_state": pl.Binary, "event_timestamp": pl.Datetime("us", "UTC")}
    if not log.exists() or dict(pl.read_parquet_schema(log)) != schema:
        pl.DataFrame(schema=schema).write_parquet(log)
    return {name: frame.height for name, frame in frames.items()}
