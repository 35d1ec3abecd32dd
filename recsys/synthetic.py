"""A seeded synthetic interaction log whose ground truth is known.

What it holds, so a model's gains can be explained:
- **taste clusters**: every item belongs to one of ``n_clusters`` genres;
- **long-term tastes**: each user has a sparse Dirichlet mixture over clusters;
- **short-term interests that drift**: each user's "session cluster" changes every
  ~``session_len`` of their events — only a model that learns online can follow it;
- **trends**: in each of ``n_trend_windows`` windows a few items get a burst;
- **arrivals**: a share of users and items first appear partway through the log;
- **kinds of feedback** (``kinds=True``): some session events are purchases; a user who
  leaves a session's cluster says no (``dislike``) to a few of its items as the next session
  starts; the trends of two windows ago are shown and ignored (``impression``). A model that takes
  every event for a view learns the wrong tastes from them (`recsys.feedback`).

Everything is vectorised with numpy; the same seed gives the same frame.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from recsys.dataset import Dataset


@dataclass(frozen=True)
class SyntheticConfig:
    n_users: int = 3000
    n_items: int = 4000
    n_events: int = 200_000
    n_clusters: int = 20
    seed: int = 0
    session_len: int = 12  # mean events per short-term interest
    p_session: float = 0.45  # an event follows the current short-term interest ...
    p_long: float = 0.30  # ... the user's long-term taste ...
    p_trend: float = 0.15  # ... a trending item; otherwise global popularity
    n_trend_windows: int = 20
    trending_per_window: int = 10
    late_share: float = 0.3  # users and items that appear after the start
    start_ts: int = 1_700_000_000
    span_s: int = 90 * 24 * 3600
    kinds: bool = False  # add purchases, dislikes and impressions (an ``event_type`` column)
    p_purchase: float = 0.3  # a session event is a purchase
    p_dislike: float = 0.5  # at a session switch, the user says no to ...
    dislikes_per_switch: int = 2  # ... this many items of the cluster they left
    p_impression: float = 0.3  # an event comes with an ignored impression of a stale trend

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_items, self.n_events, self.n_clusters) <= 0:
            raise ValueError(f"sizes must be positive, got {self}")
        if self.p_session + self.p_long + self.p_trend > 1:
            raise ValueError("p_session + p_long + p_trend must be <= 1")


def _pick_born(rng, t, birth_sorted_cum, births_sorted):
    """For each time t, draw an index among entities born by t, weighted by the cumulative weights."""
    n_born = np.maximum(np.searchsorted(births_sorted, t, side="right"), 1)
    r = rng.random(len(t)) * birth_sorted_cum[n_born - 1]
    return np.minimum(np.searchsorted(birth_sorted_cum, r, side="right"), n_born - 1)


def _births(rng, n: int, cfg: SyntheticConfig) -> np.ndarray:
    late = rng.random(n) < cfg.late_share
    return np.where(late, rng.uniform(0.05, 0.95, n), 0.0)  # fraction of the span


def generate(cfg: SyntheticConfig = SyntheticConfig()) -> Dataset:
    rng = np.random.default_rng(cfg.seed)
    U, I, K = cfg.n_users, cfg.n_items, cfg.n_clusters
    world = {
        "item_cluster": rng.integers(0, K, I),
        "item_pop": rng.lognormal(0.0, 1.2, I),  # long-tailed popularity
        "item_birth": _births(rng, I, cfg),
        "user_birth": _births(rng, U, cfg),
        "user_activity": rng.lognormal(0.0, 1.0, U),
        "user_taste": rng.dirichlet(np.full(K, 0.15), U),  # (U, K), sparse
    }
    world["trending"] = np.stack([
        rng.choice(np.flatnonzero(world["item_birth"] <= w / cfg.n_trend_windows), cfg.trending_per_window,
                   replace=False) for w in range(cfg.n_trend_windows)])

    # Implicit feedback: a user meets an item once (the first time), as in ML-1M. Repeats
    # are dropped, so draw more than asked and thin uniformly (keeping the time span).
    draws = cfg.n_events
    for _ in range(8):
        draws = int(draws * 1.5)
        frame = _draw_events(rng, cfg, world, draws).unique(subset=["user_id", "item_id"], keep="first",
                                                            maintain_order=True)
        if frame.height >= cfg.n_events:
            break
    if frame.height > cfg.n_events:
        keep = np.sort(rng.choice(frame.height, cfg.n_events, replace=False))
        frame = frame[keep]
    # Each event's true distribution, for the `oracle` model: the world, and per event the
    # user's session cluster at that moment (rows in log order, as the frame's).
    truth = {"item_cluster": world["item_cluster"], "user_taste": world["user_taste"],
             "trending": world["trending"] + 1, "config": asdict(cfg), "item_pop": world["item_pop"],
             "item_birth": world["item_birth"], "session_cluster": frame["session_cluster"].to_numpy().copy()}
    if cfg.kinds:
        frame = _with_kinds(rng, cfg, world, frame)
        truth["session_cluster"] = frame["session_cluster"].to_numpy().copy()
    frame = frame.drop("session_cluster")
    # Stable across processes (str hashes are salted): the config decides the data.
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    # The catalogue: each item's genre is its taste cluster (Feast's item attributes; the demo).
    items = pl.DataFrame({"item_id": np.arange(1, I + 1),
                          "genres": [[f"cluster-{c}"] for c in world["item_cluster"].tolist()]})
    return Dataset("synthetic-kinds" if cfg.kinds else "synthetic", frame, items=items, sha256=digest, extra=truth)


def _with_kinds(rng, cfg: SyntheticConfig, world: dict, frame: pl.DataFrame) -> pl.DataFrame:
    """The positive log with kinds: purchases among its session events, and the negative and
    ignored events added just before the event they come with. A user never says no to (or
    ignores) an item they take at some point: each (user, item) is positive or not."""
    users, items, ts = (frame[c].to_numpy() for c in ("user_id", "item_id", "ts"))
    cluster = frame["session_cluster"].to_numpy()
    kind = np.where((cluster == world["item_cluster"][items - 1]) & (rng.random(len(items)) < cfg.p_purchase),
                    "purchase", "view")
    by_user = np.lexsort((np.arange(len(users)), users))
    before = np.full(len(users), -1)
    same = users[by_user][1:] == users[by_user][:-1]
    before[by_user[1:][same]] = cluster[by_user[:-1][same]]
    switch = np.flatnonzero((before >= 0) & (before != cluster)  # the first event of a new session
                            & (rng.random(len(users)) < cfg.p_dislike))
    members = {k: np.flatnonzero(world["item_cluster"] == k) for k in range(cfg.n_clusters)}
    left = [rng.choice(m, min(cfg.dislikes_per_switch, len(m)), replace=False) for m in (members[k] for k in before[switch])]
    d_at = np.repeat(switch, [len(x) for x in left])
    d_items = np.concatenate(left) + 1 if left else np.zeros(0, np.int64)
    # Shown and ignored: what a stale list would show, the trends of two windows ago.
    i_at = np.flatnonzero(rng.random(len(users)) < cfg.p_impression)
    t = (ts[i_at] - cfg.start_ts) / cfg.span_s
    stale = np.maximum((t * cfg.n_trend_windows).astype(int) - 2, 0)
    i_items = world["trending"][stale, rng.integers(0, cfg.trending_per_window, len(i_at))] + 1
    extra = pl.DataFrame({"user_id": np.r_[users[d_at], users[i_at]], "item_id": np.r_[d_items, i_items],
                          "ts": np.r_[ts[d_at], ts[i_at]] - 1, "session_cluster": np.r_[cluster[d_at], cluster[i_at]],
                          "event_type": pl.Series(["dislike"] * len(d_at) + ["impression"] * len(i_at), dtype=pl.Utf8),
                          "at": np.r_[d_at, i_at]})
    taken = frame.select("user_id", "item_id").unique()
    extra = extra.join(taken, on=["user_id", "item_id"], how="anti").unique(["user_id", "item_id"], keep="first")
    positive = frame.with_columns(event_type=pl.Series(kind), at=pl.arange(0, frame.height))
    out = pl.concat([extra.select(positive.columns), positive]).sort("ts", "at", maintain_order=True)
    return out.drop("at")


def _draw_events(rng, cfg: SyntheticConfig, world: dict, E: int) -> pl.DataFrame:
    K = cfg.n_clusters
    item_cluster, item_pop, item_birth = world["item_cluster"], world["item_pop"], world["item_birth"]
    user_birth, user_taste, trending = world["user_birth"], world["user_taste"], world["trending"]

    t = np.sort(rng.random(E))  # event times as a fraction of the span
    u_order = np.argsort(user_birth, kind="stable")
    users = u_order[_pick_born(rng, t, np.cumsum(world["user_activity"][u_order]), user_birth[u_order])]

    # Each event's index within its user decides the user's current session.
    by_user = np.lexsort((np.arange(E), users))
    rank = np.empty(E, dtype=np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(users[by_user])) + 1]
    counts = np.diff(np.r_[starts, E])
    rank[by_user] = np.arange(E) - np.repeat(starts, counts)
    session = rank // cfg.session_len
    session_cluster = rng.integers(0, K, (cfg.n_users, int(session.max()) + 1))

    long_cluster = (np.log(user_taste[users] + 1e-12) + rng.gumbel(size=(E, K))).argmax(1)
    source = rng.choice(4, E, p=[cfg.p_session, cfg.p_long, cfg.p_trend,
                                 1 - cfg.p_session - cfg.p_long - cfg.p_trend])
    cluster = np.where(source == 0, session_cluster[users, session], long_cluster)

    items = np.empty(E, dtype=np.int64)
    for k in range(K):  # per cluster, items by birth with popularity weights
        members = np.flatnonzero(item_cluster == k)
        members = members[np.argsort(item_birth[members], kind="stable")]
        sel = np.flatnonzero((source <= 1) & (cluster == k))
        if len(members) == 0:
            cluster[sel] = -1
            continue
        items[sel] = members[_pick_born(rng, t[sel], np.cumsum(item_pop[members]), item_birth[members])]

    window = np.minimum((t * cfg.n_trend_windows).astype(int), cfg.n_trend_windows - 1)
    sel = (source == 2) | (cluster < 0)
    items[sel] = trending[window[sel], rng.integers(0, cfg.trending_per_window, sel.sum())]
    i_order = np.argsort(item_birth, kind="stable")
    sel = source == 3
    items[sel] = i_order[_pick_born(rng, t[sel], np.cumsum(item_pop[i_order]), item_birth[i_order])]

    return pl.DataFrame({
        "user_id": users.astype(np.int64) + 1,
        "item_id": items + 1,
        "ts": (cfg.start_ts + t * cfg.span_s).astype(np.int64),
        "session_cluster": session_cluster[users, session],
    })
