"""The input contract for a user's own interaction log: which columns, which timestamp
units, what happens to bad rows. Every command that reads a log reads it through
`read_log` (via `recsys.datasets.load_dataset`); docs/data.md is the same contract in prose.

    >>> frame, notes = read_log("shop.csv", ReadConfig(columns={"user_id": "customer"}))
    >>> print(notes.summary())
    shop.csv: 30,000 rows, 2014-01-02 .. 2014-07-23; ts in ms (detected); dropped 3 of 30,000 rows: 1 empty ts, 2 ragged; first at line 8,097

Ids are kept exactly as written (strings: ``"cust-45"``, ``"1193"``); the model, the
stream, the feature store and the server all speak them.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from recsys.feedback import EVENT_KINDS

# The event kinds the schema accepts (streaming/events.py validates the wire with the same
# tuple; `recsys.feedback` says what each means to the model).
EVENT_TYPES = EVENT_KINDS
# Seconds since the epoch; 1970 .. 2100 covers every real log and rejects ms/µs stamps.
TS_RANGE = (0, 4_102_444_800)
TS_UNITS = ("auto", "s", "ms", "us", "ns", "iso")
_PER_SECOND = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}

# Our column -> the names a log may use for it (matched case-insensitively), first match wins.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "user_id": ("user_id", "user", "userid", "customer_id", "customer", "visitor_id", "session_id"),
    "item_id": ("item_id", "item", "itemid", "product_id", "product", "sku", "movie_id"),
    "ts": ("ts", "timestamp", "time", "event_time", "datetime", "date"),
    "event_type": ("event_type", "event", "action"),
    "value": ("value", "rating"),
}
REQUIRED = ("user_id", "item_id", "ts")
_SHORT = {"user": "user_id", "item": "item_id", "timestamp": "ts"}  # --columns user=…,item=…,ts=…


@dataclass(frozen=True)
class ReadConfig:
    """How to read a log: ``columns`` maps our names (``user_id``, ``item_id``, ``ts``,
    ``event_type``, ``value``) to the file's; ``ts_unit`` is detected unless set;
    ``item_columns`` are attributes of the item (served beside it); more than
    ``max_bad_fraction`` bad rows rejects the whole file."""

    columns: dict[str, str] = field(default_factory=dict)
    ts_unit: str = "auto"
    item_columns: tuple[str, ...] = ()
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.ts_unit not in TS_UNITS:
            raise ValueError(f"ts unit {self.ts_unit!r} is not one of {', '.join(TS_UNITS)}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        unknown = sorted(set(self.columns) - set(SYNONYMS))
        if unknown:
            raise ValueError(f"--columns names {unknown}; the log's columns are {', '.join(SYNONYMS)} "
                             f"(or user, item, timestamp)")


def parse_columns(spec: str | None) -> dict[str, str]:
    """``"user=customer,item=sku,ts=time"`` -> ``{"user_id": "customer", "item_id": "sku", "ts": "time"}``."""
    out = {}
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not theirs.strip():
            raise ValueError(f"--columns {spec!r}: each entry is OURS=THEIRS, e.g. user=customer,item=sku,ts=time")
        out[_SHORT.get(ours.strip(), ours.strip())] = theirs.strip()
    return out


@dataclass
class ReadNotes:
    """What reading a log found: the report and the CLI say it, so nothing is guessed silently."""

    source: str
    rows: int = 0  # data rows in the file (blank lines aside)
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> rows
    first_bad_line: int | None = None
    ts_unit: str = "s"
    ts_unit_detected: bool = False
    columns: dict[str, str] = field(default_factory=dict)  # ours -> the file's
    span: tuple[int, int] | None = None  # (first, last) ts in seconds

    def summary(self) -> str:
        def day(t: int) -> str:
            import datetime as dt

            return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%d")

        span = f", {day(self.span[0])} .. {day(self.span[1])}" if self.span else ""
        unit = f"ts in {self.ts_unit} ({'detected' if self.ts_unit_detected else 'as set'})"
        text = f"{self.source}: {self.rows:,} rows{span}; {unit}"
        if self.dropped:
            text += f"; {self.dropped_text()}"
        return text

    def dropped_text(self) -> str:
        n = sum(self.dropped.values())
        reasons = ", ".join(f"{c:,} {r}" for r, c in self.dropped.most_common())
        return f"dropped {n:,} of {self.rows:,} rows: {reasons}; first at line {self.first_bad_line:,}"

    def as_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
                "first_bad_line": self.first_bad_line, "ts_unit": self.ts_unit,
                "ts_unit_detected": self.ts_unit_detected, "columns": self.columns,
                "span": list(self.span) if self.span else None}


def read_log(path: str | Path, cfg: ReadConfig = ReadConfig()) -> tuple[pl.DataFrame, ReadNotes]:
    """The log at ``path`` (CSV, TSV or Parquet; ``.gz`` too) as ``user_id: str, item_id: str,
    ts: i64 seconds`` (+ ``event_type``, ``value`` and the item columns where present), in
    file order, with the bad rows dropped and counted; a `ValueError` that names the line
    when more than ``cfg.max_bad_fraction`` of them are bad."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"interaction log {path} does not exist")
    raw = _read_parquet(path) if ".parquet" in path.suffixes else _read_delimited(path)
    notes = ReadNotes(source=path.name, rows=raw.height)
    notes.columns = _resolve_columns(path, _names(raw), cfg)
    missing_items = [c for c in cfg.item_columns if c not in raw.columns]
    if missing_items:
        raise ValueError(f"{path}: item column(s) {missing_items} not found; the file has {_names(raw)}")

    frame = raw.select(pl.col("line", "bad_fields"), *(pl.col(theirs).alias(ours) for ours, theirs in notes.columns.items()),
                       *(pl.col(c) for c in cfg.item_columns if c not in notes.columns.values()))
    frame = frame.with_columns(pl.col("user_id", "item_id").str.strip_chars())
    ts, notes.ts_unit, notes.ts_unit_detected = _seconds(path, frame["ts"], cfg.ts_unit)
    frame = frame.with_columns(ts_text=pl.col("ts"), ts=ts)
    reasons = [  # the first that applies names the row's fault
        (pl.col("bad_fields"), "ragged"),
        (pl.col("user_id").fill_null("") == "", "empty user_id"),
        (pl.col("item_id").fill_null("") == "", "empty item_id"),
        (pl.col("ts_text").fill_null("").str.strip_chars() == "", "empty ts"),
        (pl.col("ts").is_null(), "unparsable ts"),
        (~pl.col("ts").is_between(TS_RANGE[0], TS_RANGE[1], closed="left"), "ts out of range"),
    ]
    if "event_type" in frame.columns:
        frame = frame.with_columns(pl.col("event_type").str.strip_chars().str.to_lowercase()
                                   .replace("", None))
        reasons.append((pl.col("event_type").is_not_null() & ~pl.col("event_type").is_in(EVENT_TYPES),
                        f"unknown event_type (accepted: {', '.join(EVENT_TYPES)})"))
    if "value" in frame.columns:
        frame = frame.with_columns(pl.col("value").str.strip_chars().cast(pl.Float64, strict=False))
    reason = pl.when(reasons[0][0]).then(pl.lit(reasons[0][1]))
    for cond, text in reasons[1:]:
        reason = reason.when(cond).then(pl.lit(text))
    frame = frame.with_columns(reason=reason.otherwise(None))

    bad = frame.filter(pl.col("reason").is_not_null())
    if bad.height:
        notes.dropped = Counter(dict(bad["reason"].value_counts().iter_rows()))
        notes.first_bad_line = int(bad["line"][0])
        if bad.height > cfg.max_bad_fraction * max(raw.height, 1):
            first = bad.row(0, named=True)
            raise ValueError(f"{path}: {bad.height:,} of {raw.height:,} rows are bad, more than "
                             f"{cfg.max_bad_fraction:.0%} ({notes.dropped_text()}); line {first['line']:,}: "
                             f"{first['reason']} (ts {first['ts_text']!r}). Fix the file, map its columns with "
                             f"--columns user=…,item=…,ts=…, or set --ts-unit")
    good = frame.filter(pl.col("reason").is_null()).drop("line", "ts_text", "bad_fields", "reason")
    notes.kept = good.height
    if good.height == 0:
        raise ValueError(f"{path}: no usable rows ({notes.dropped_text() if notes.dropped else 'the file is empty'})")
    notes.span = (int(good["ts"].min()), int(good["ts"].max()))
    return good, notes


def _names(frame: pl.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in ("line", "bad_fields")]


def _resolve_columns(path: Path, have: list[str], cfg: ReadConfig) -> dict[str, str]:
    lower = {c.lower(): c for c in have}
    out = {}
    for ours, names in SYNONYMS.items():
        if ours in cfg.columns:
            theirs = cfg.columns[ours]
            if theirs not in have:
                raise ValueError(f"{path}: --columns maps {ours} to {theirs!r}, which is not a column; "
                                 f"the file has {have}")
            out[ours] = theirs
            continue
        found = next((lower[n] for n in names if n in lower and lower[n] not in out.values()), None)
        if found is not None and found not in cfg.item_columns:
            out[ours] = found
    missing = [c for c in REQUIRED if c not in out]
    if missing:
        looked = "; ".join(f"{c}: one of {', '.join(SYNONYMS[c])}" for c in missing)
        flag = ",".join(f"{ {'user_id': 'user', 'item_id': 'item'}.get(c, c)}=COLUMN" for c in missing)
        raise ValueError(f"{path}: no column for {', '.join(missing)} ({looked}); the file has {have}. "
                         f"Name them with --columns {flag}")
    return out


def _read_parquet(path: Path) -> pl.DataFrame:
    df = pl.read_parquet(path)
    cast = [pl.col(c).dt.strftime("%Y-%m-%dT%H:%M:%S%.f%z") if df[c].dtype in (pl.Datetime, pl.Date) else
            pl.col(c).cast(pl.Utf8) for c in df.columns]
    return df.select(cast).with_columns(line=pl.int_range(2, df.height + 2), bad_fields=pl.lit(False))


def _read_delimited(path: Path) -> pl.DataFrame:
    """Every field as the text written (ids stay "1193", never 1193.0), one row per non-blank
    line, with its line number and whether it had the header's number of fields."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    text = raw.decode("utf-8-sig", errors="replace")
    lines = pl.Series("text", text.splitlines()).to_frame().with_columns(line=pl.int_range(1, pl.len() + 1))
    lines = lines.filter(pl.col("text").str.strip_chars() != "")
    if lines.height == 0:
        raise ValueError(f"{path}: the file is empty (expected a header line such as user_id,item_id,timestamp)")
    header_text = lines["text"][0]
    sep = "\t" if ("\t" in header_text and "," not in header_text) or ".tsv" in path.suffixes else ","
    header = [h.strip() for h in next(csv.reader([header_text], delimiter=sep))]
    body = lines.slice(1)
    n = len(header)
    # Quoted lines (rare) go through the csv module; the rest split column-wise in polars.
    quoted = body["text"].str.contains('"', literal=True)
    plain = body.filter(~quoted).with_columns(fields=pl.col("text").str.split(sep))
    fancy = body.filter(quoted)
    if fancy.height:
        parsed = list(csv.reader(fancy["text"].to_list(), delimiter=sep))
        fancy = fancy.with_columns(fields=pl.Series(parsed, dtype=pl.List(pl.Utf8)))
    body = pl.concat([plain, fancy.with_columns(pl.col("fields").cast(pl.List(pl.Utf8)))] if fancy.height else [plain])
    body = body.sort("line")
    return body.select(pl.col("line"), *(pl.col("fields").list.get(i, null_on_oob=True).alias(h)
                                          for i, h in enumerate(header)),
                       bad_fields=pl.col("fields").list.len() != n)


def _seconds(path: Path, text: pl.Series, unit: str) -> tuple[pl.Series, str, bool]:
    """Timestamps as integer seconds (null where unparsable): numbers in ``unit`` (told from
    their size when ``auto``), or ISO-8601 dates and times."""
    s = text.str.strip_chars()
    numeric = s.str.contains(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
    present = s.fill_null("") != ""
    detected = unit == "auto"
    if detected:
        share = (numeric.sum() or 0) / max(present.sum() or 0, 1)
        if share >= 0.5:
            unit = _unit_of(path, s.filter(numeric).cast(pl.Float64))
        else:
            unit = "iso"
    if unit == "iso":
        return _iso_seconds(s), unit, detected
    value = s.cast(pl.Float64, strict=False).replace([math.inf, -math.inf], None)
    return (value / _PER_SECOND[unit]).floor().cast(pl.Int64).alias("ts"), unit, detected


_ISO_ZONED = ("%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z")
_ISO_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M", "%Y-%m-%d")


def _iso_seconds(s: pl.Series) -> pl.Series:
    """ISO-8601 dates and times as seconds; with an offset (``Z``, ``+02:00``) as UTC, without one as UTC too."""
    s = s.str.replace(r"[Zz]$", "+00:00")
    frame = s.alias("s").to_frame()
    parsed = [pl.col("s").str.to_datetime(f, time_unit="us", time_zone="UTC", strict=False) for f in _ISO_ZONED]
    parsed += [pl.col("s").str.to_datetime(f, time_unit="us", strict=False).dt.replace_time_zone("UTC")
               for f in _ISO_NAIVE]
    return frame.select(pl.coalesce(parsed).dt.epoch("s").cast(pl.Int64).alias("ts")).to_series()


def _unit_of(path: Path, values: pl.Series) -> str:
    """Seconds, ms, µs or ns, from the size of the values: today is ~1.7e9 s, 1.7e12 ms,
    1.7e15 µs, 1.7e18 ns. A column whose values fall in two of those ranges cannot be told."""
    v = values.filter(values.is_finite() & (values > 0))
    if v.len() == 0:
        return "s"
    # The boundaries sit between the units' plausible spans (1973 .. 5138 for each).
    def unit(x: float) -> str:
        return "s" if x < 1e11 else "ms" if x < 1e14 else "us" if x < 1e17 else "ns"

    lo, hi = unit(float(v.quantile(0.001))), unit(float(v.quantile(0.999)))
    if lo != hi:
        raise ValueError(f"{path}: timestamps run from {v.min():.0f} to {v.max():.0f}, which mixes units "
                         f"({lo} and {hi}); set the unit with --ts-unit s|ms|us|ns|iso")
    return lo
