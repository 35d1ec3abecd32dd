"""Interaction logs as polars frames: MovieLens-1M, any CSV/Parquet log, or the synthetic set.

Every loader returns a `Dataset` whose ``interactions`` frame has the columns
``user_id: i64, item_id: i64, ts: i64`` (plus ``event_type`` where the source has it),
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


def load_log(path: str | Path, columns: dict[str, str] | None = None) -> Dataset:
    """A generic interaction log (CSV or Parquet). ``columns`` maps our names to the file's,
    e.g. ``{"user_id": "customer", "item_id": "sku", "ts": "time"}``; string ids are
    factorised in order of first appearance."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"interaction log {path} does not exist")
    mapping = {"user_id": "user_id", "item_id": "item_id", "ts": "ts"} | (columns or {})
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    missing = [src for src in mapping.values() if src not in df.columns]
    if missing and mapping["ts"] == "ts" and "timestamp" in df.columns and missing == ["ts"]:
        mapping["ts"] = "timestamp"
        missing = []
    if missing:
        raise ValueError(f"{path}: columns {missing} not found (have {df.columns}); map them with --columns")
    df = df.select(**{ours: pl.col(theirs) for ours, theirs in mapping.items()})
    for col in ("user_id", "item_id"):
        if df[col].dtype == pl.Utf8:
            df = df.with_columns(pl.col(col).cast(pl.Categorical).to_physical().cast(pl.Int64))
    if df["ts"].dtype in (pl.Datetime, pl.Date):
        df = df.with_columns(pl.col("ts").dt.epoch("s"))
    df = df.with_columns(pl.col("user_id", "item_id", "ts").cast(pl.Int64))
    return Dataset(path.stem, _time_ordered(df), sha256=_sha256_of(path))


def load_dataset(name: str, **kwargs) -> Dataset:
    """``ml-1m`` | ``synthetic`` | a folder holding ml-1m files | a CSV/Parquet log."""
    if name == "ml-1m":
        return load_movielens(kwargs.get("root", DEFAULT_ML1M))
    if name == "synthetic":

        return generate(SyntheticConfig(**kwargs))
    path = Path(name)
    if path.is_dir():
        return load_movielens(path)
    if path.exists():
        return load_log(path, kwargs.get("columns"))
    raise FileNotFoundError(f"unknown dataset {name!r}: use ml-1m, synthetic, or a path to a log or ml-1m folder")
