"""The one module that talks to Feast: apply, materialize, push and get.

Serving and the stream worker use `FeatureRepo`; nothing else imports `feast`.

    >>> repo = FeatureRepo.create(Path("runs/features"))      # SQLite online store
    >>> repo.apply(); repo.materialize()
    >>> repo.push_user_state([42], np.ones((1, 64)), events=[17])
    >>> repo.user_state([42])["vector"][0][:3]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sqlite3
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

# Feast's usage telemetry stays off: these machines (and many users') have no route out.
os.environ.setdefault("FEAST_USAGE", "False")

log = logging.getLogger("recsys.features")
TEMPLATE = Path(__file__).parent / "repo"
# The user_state rows holding the population level, one per partition of the topic: its
# partial item counts (vector), the stream time they are as of (last_ts) and the events in
# them. The worker that owns a partition pushes its row; serving sums them all.
POPULATION_KEY = "__population__"
MAX_PARTITIONS = 256  # population rows read back: a topic of more partitions needs a larger setting


def population_key(partition: int) -> str:
    return f"{POPULATION_KEY}/{partition}"


def is_population_key(user_id: str) -> bool:
    """Ids the system writes itself: an event under one would overwrite a population row."""
    return user_id.startswith(POPULATION_KEY)


def _import_feast_without_torch() -> None:
    """Import Feast without torch in a process that has not loaded it (the server).

    Feast's `torch_wrapper` imports torch on import, for tensor conversions this project never
    asks for, and catches the failure; the server would otherwise carry torch's 300 MB and
    seconds of import for nothing. Torch is hidden for that one import only, so a later
    ``import torch`` in the same process works as usual."""
    if "feast" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # `import torch` raises ImportError, which Feast catches
    try:
        import feast  # noqa: F401
    finally:
        del sys.modules["torch"]


class FeatureRepo:
    def __init__(self, path: Path):
        _import_feast_without_torch()
        from feast import FeatureStore

        self.path = Path(path)
        if not (self.path / "feature_store.yaml").exists():
            raise FileNotFoundError(f"{self.path} is not a feature repo (no feature_store.yaml); "
                                    f"run `recsys features apply --repo {self.path}` first")
        self.store = FeatureStore(repo_path=str(self.path))
        self._user_state = None  # the view, looked up once (the registry parses protos per lookup)
        self._concurrent_reads()  # a user's own repo too, not only the ones `apply` made

    @classmethod
    def create(cls, path: Path, online: str = "sqlite") -> FeatureRepo:
        """A working repo at ``path`` from the template (``online``: sqlite | redis)."""
        if online not in ("sqlite", "redis"):
            raise ValueError(f"online store must be sqlite or redis, got {online!r}")
        path = Path(path)
        (path / "data").mkdir(parents=True, exist_ok=True)
        yaml = "feature_store.yaml" if online == "sqlite" else "feature_store.redis.yaml"
        shutil.copy(TEMPLATE / yaml, path / "feature_store.yaml")
        return cls(path)

    def apply(self) -> None:
        from features.definitions import ALL

        self.store.apply(ALL)
        self._concurrent_reads()

    def _concurrent_reads(self, wait_s: float = 1.0) -> None:
        """A SQLite online store in WAL mode: the stream worker's writes no longer block the
        server's reads (in the default rollback journal every push held readers off for its
        commit: bench/serving_load.py p99; another process's lock stalled every reader). The
        mode is kept in the database file; a store locked right now keeps its mode, with a
        warning, and readers wait on writers as before."""
        cfg = self.store.config.online_store
        if getattr(cfg, "type", None) != "sqlite":
            return
        path = Path(cfg.path) if Path(cfg.path).is_absolute() else self.path / cfg.path
        if not path.exists():  # made by the first write (or `apply`, which calls this again)
            return
        try:
            with contextlib.closing(sqlite3.connect(path, timeout=wait_s)) as db:
                if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as e:
            log.warning("the online store %s stays in its journal mode, where a writer holds readers off (%s)",
                        path, e)

    def materialize(self, end: datetime | None = None) -> None:
        """Load the latest offline values into the online store, over all of time (history
        logs can be decades old, beyond an incremental window)."""
        end = end or datetime.now(timezone.utc)
        self.store.materialize(start_date=datetime(1970, 1, 2, tzinfo=timezone.utc), end_date=end,
                               feature_views=["item_attributes"])

    def push_user_state(self, user_ids, vectors, events=None, recent_items=None, last_ts=None,
                        ts: datetime | None = None) -> None:
        """Write fresh user vectors to the online store: one call per micro-batch, not per event.
        ``vectors`` the user vectors, a 2-D array or a list (the population row's is its term, longer);
        ``recent_items`` the model's item indices serving masks for each user (their latest, and those they said no to);
        ``last_ts`` the time of each row's latest event (the population row's: the stream's clock).

        The rows go to the online store of the ``user_state`` view through its provider, as
        `FeatureStore.push(..., to=ONLINE)` would, built as protos straight from the arrays:
        the push's DataFrame → Arrow → proto conversion and registry lookups cost as much as
        the write itself (1,140 rows: 155 ms by push, 116 ms here) and bound freshness."""
        from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, Value

        n = len(user_ids)
        events = np.asarray(events if events is not None else np.zeros(n), dtype=np.int64).tolist()
        recent = recent_items if recent_items is not None else [()] * n
        last_ts = np.asarray(last_ts if last_ts is not None else np.full(n, -1), dtype=np.int64).tolist()
        self._write_user_state(user_ids, [
            {"vector": Value(float_list_val=FloatList(val=np.asarray(v, dtype=np.float32).tolist())),
             "events": Value(int64_val=e),
             "recent_items": Value(int64_list_val=Int64List(val=np.asarray(r, dtype=np.int64).tolist())),
             "last_ts": Value(int64_val=t)}
            for v, e, r, t in zip(vectors, events, recent, last_ts, strict=True)], ts)

    def push_evicted(self, user_ids, rows: list[bytes], ts: datetime | None = None) -> None:
        """Evicted users' whole fast-state rows (`streaming.checkpoint.encode_user_row`): the
        stream worker takes them back when the user returns. The other fields stay as pushed."""
        from feast.protos.feast.types.Value_pb2 import Value

        self._write_user_state(user_ids, [{"fast_state": Value(bytes_val=row)} for row in rows], ts)

    def evicted(self, user_ids) -> list[bytes | None]:
        return self.online(["user_state:fast_state"], "user_id", user_ids)["fast_state"]

    def _write_user_state(self, user_ids, values: list[dict], ts: datetime | None) -> None:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        ts = ts or datetime.now(timezone.utc)
        rows = [(EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=str(u))]), v, ts, None)
                for u, v in zip(user_ids, values, strict=True)]
        if self._user_state is None:
            self._user_state = self.store.get_feature_view("user_state")
        self.store._get_provider().online_write_batch(self.store.config, self._user_state, rows, None)

    def populations(self, max_partitions: int = MAX_PARTITIONS) -> list[tuple[int, np.ndarray, int, int]]:
        """The population rows of partitions 0 … max_partitions − 1 that exist: (partition,
        partial counts, events in them, stream time they are as of)."""
        rows = self.user_state([population_key(p) for p in range(max_partitions)])
        return [(p, np.asarray(v, dtype=np.float32), e or 0, -1 if t is None else t)
                for p, (v, e, t) in enumerate(zip(rows["vector"], rows["events"], rows["last_ts"])) if v is not None]

    def user_state(self, user_ids) -> dict[str, list]:
        return self.online([f"user_state:{name}" for name in ("vector", "events", "recent_items", "last_ts")],
                           "user_id", user_ids)

    def item_attributes(self, item_ids) -> dict[str, dict]:
        """Item id -> its catalogue attributes (e.g. ``{"genres": [...], "year": 1995}`` or
        ``{"price": 9.99}``) for the items whose attributes are materialized; empty fields left out."""
        got = self.online(["item_attributes:attributes"], "item_id", item_ids)
        out = {}
        for item, text in zip(got["item_id"], got["attributes"]):
            attrs = {k: v for k, v in json.loads(text or "{}").items() if v not in (None, "", [])}
            if attrs:
                out[item] = attrs
        return out

    def online(self, features: list[str], key: str, ids) -> dict[str, list]:
        rows = {key: [str(i) for i in ids]}
        return self.store.get_online_features(features=features, entity_rows=rows).to_dict()

    def historical(self, entity_df, features: list[str]):
        """Point-in-time correct training data: each row gets the latest value stamped at or
        before its ``event_timestamp`` (within the view's ttl), or null if there is none.

        Feast's file offline store drops entity rows that have no value yet; merging back
        onto ``entity_df`` keeps every row, so training data never silently shrinks."""
        keys = [k for k in ("user_id", "item_id") if k in entity_df.columns]
        entity_df = entity_df.astype({k: str for k in keys})  # entity keys are strings
        joined = self.store.get_historical_features(entity_df=entity_df, features=features).to_df()
        keys = list(entity_df.columns)
        joined["event_timestamp"] = joined["event_timestamp"].dt.tz_convert("UTC")
        left = entity_df.assign(event_timestamp=entity_df["event_timestamp"].dt.tz_convert("UTC"))
        return left.merge(joined.drop_duplicates(keys), on=keys, how="left")
