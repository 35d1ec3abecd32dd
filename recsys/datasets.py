"""Interaction logs as polars frames: MovieLens-1M, any CSV/Parquet log, or the synthetic set.

Every loader returns a `Dataset` whose ``interactions`` frame has the columns
``user_id, item_id, ts: i64`` (ids as the source writes them: integers for MovieLens and the
generator, strings exactly as written for a user's own log; plus ``event_type`` and
``value`` where the source has them),
ordered by ``(ts, original row order)`` as EVAL_PROTOCOL.md requires.

    >>> ds = load_dataset("ml-1m")
    >>> ds.interactions.shape
    (999611, 3)
"""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import polars as pl

from recsys.dataset import Dataset
from recsys.log_contract import SYNONYMS, ReadConfig, read_log
from recsys.synthetic import SyntheticConfig, generate

# shared/ sits beside the checkout; the data can also be named by path or env var.
DEFAULT_ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"


def _time_ordered(df: pl.DataFrame) -> pl.DataFrame:
    # A stable sort keeps file order for equal timestamps (the protocol's tie rule).
    return df.sort("ts", maintain_order=True)


def _sha256_of(path: Path) -> str:
    """Checksum of the uncompressed content, matching SHA256SUMS for `.gz` files."""
    h = hashlib.sha256()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_dat(path: Path, columns: list[str]) -> pl.DataFrame:
    """MovieLens `::`-separated latin-1 files (plain or gzipped)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("latin-1").replace("::", "\t")
    return pl.read_csv(io.StringIO(text), separator="\t", has_header=False, new_columns=columns,
                       quote_char=None, infer_schema_length=10000)


def _first_existing(root: Path, *names: str) -> Path | None:
    return next((root / n for n in names if (root / n).exists()), None)


def load_movielens(root: str | Path = DEFAULT_ML1M) -> Dataset:
    """MovieLens-1M from a folder with `interactions.csv.gz` (or the official `ratings.dat`),
    `users.dat.gz` and `movies.dat.gz`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MovieLens folder {root} does not exist; pass --data PATH to a copy of ml-1m")
    log = _first_existing(root, "interactions.csv.gz", "interactions.csv", "ratings.dat.gz", "ratings.dat")
    if log is None:
        raise FileNotFoundError(f"{root} holds neither interactions.csv(.gz) nor ratings.dat(.gz)")
    if ".dat" in log.suffixes:
        inter = _read_dat(log, ["user_id", "item_id", "rating", "ts"]).select("user_id", "item_id", "ts")
    else:
        inter = pl.read_csv(log, schema_overrides={"user_id": pl.Int64, "item_id": pl.Int64}).rename(
            {"timestamp": "ts"})
    inter = _time_ordered(inter.select(pl.col("user_id", "item_id", "ts").cast(pl.Int64)))

    users = items = None
    if (p := _first_existing(root, "users.dat.gz", "users.dat")) is not None:
        users = _read_dat(p, ["user_id", "gender", "age", "occupation", "zip"]).with_columns(
            pl.col("zip").cast(pl.Utf8).str.slice(0, 1).alias("zip1")).drop("zip")
    if (p := _first_existing(root, "movies.dat.gz", "movies.dat")) is not None:
        items = _read_dat(p, ["item_id", "title", "genres"]).with_columns(
            pl.col("title").str.extract(r"\((\d{4})\)\s*$").cast(pl.Int64).alias("year"),
            pl.col("genres").str.split("|"),
        )
    return Dataset("ml-1m", inter, users, items, sha256=_sha256_of(log))


def load_log(path: str | Path, read: ReadConfig = ReadConfig()) -> Dataset:
    """A user's own interaction log (CSV, TSV or Parquet) under the input contract of
    `recsys.log_contract`: ids kept as written, timestamps in seconds (their unit detected
    or set), bad rows dropped and counted in ``extra["read"]``; ``read.item_columns``
    become the items' attributes (each item's latest value)."""
    path = Path(path)
    frame, notes = read_log(path, read)
    items = None
    if read.item_columns:
        blank = [pl.col(c).str.strip_chars().replace("", None) for c in read.item_columns if frame[c].dtype == pl.Utf8]
        items = frame.with_columns(blank).select("item_id", *read.item_columns).group_by("item_id", maintain_order=True).agg(
            pl.col(c).drop_nulls().last() for c in read.item_columns)
        numbers = [c for c in read.item_columns  # "9.99" is served as 9.99 when the whole column is numbers
                   if items[c].cast(pl.Float64, strict=False).null_count() == items[c].null_count()]
        items = items.with_columns(pl.col(numbers).cast(pl.Float64))
        frame = frame.drop([c for c in read.item_columns if c not in SYNONYMS])
    return Dataset(path.name.split(".")[0], _time_ordered(frame), items=items, sha256=_sha256_of(path),
                   extra={"read": notes})


def load_dataset(name: str, **kwargs) -> Dataset:
    """``ml-1m`` | ``synthetic`` | ``synthetic-kinds`` | a folder holding ml-1m files | a CSV/Parquet log (``read``: a
    `ReadConfig`, how to read it)."""
    if name == "ml-1m":
        return load_movielens(kwargs.get("root", DEFAULT_ML1M))
    if name in ("synthetic", "synthetic-kinds"):  # -kinds: with purchases, dislikes and impressions
        return generate(SyntheticConfig(**kwargs, kinds=name == "synthetic-kinds"))
    path = Path(name)
    if path.is_dir():
        return load_movielens(path)
    if path.exists():
        return load_log(path, kwargs.get("read", ReadConfig()))
    raise FileNotFoundError(f"unknown dataset {name!r}: use ml-1m, synthetic, or a path to a log or ml-1m folder")
