"""Logs as a shop writes them, for the tests that run the product the way a new user does."""

from __future__ import annotations

import polars as pl

from recsys.datasets import load_dataset

KINDS = ("view", "view", "cart", "view", "purchase")


def shop_log(path, n_users: int = 300, n_items: int = 400, n_events: int = 8_000,
             end_s: int | None = None) -> pl.DataFrame:
    """The generator's log as a shop writes it: `cust-…`, `sku-…`, ms since the epoch, kinds,
    prices. ``end_s``: shift the log so its last event is at that time (seconds), as a live
    shop's log ends about now."""
    log = load_dataset("synthetic", n_users=n_users, n_items=n_items, n_events=n_events, seed=11).interactions
    shift = 0 if end_s is None else end_s - int(log["ts"].max())
    shop = log.select(
        user_id=pl.lit("cust-") + pl.col("user_id").cast(pl.Utf8),
        item_id=pl.lit("sku-") + pl.col("item_id").cast(pl.Utf8),
        timestamp=(pl.col("ts") + shift) * 1000,
        event_type=pl.Series([KINDS[n % len(KINDS)] for n in range(log.height)]),
        price=(pl.col("item_id") % 50).cast(pl.Float64) + 0.99,
    )
    shop.write_csv(path)
    return shop
