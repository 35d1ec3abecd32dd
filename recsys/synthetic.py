"""A seeded synthetic interaction log whose ground truth is known.

What it holds, so a model's gains can be explained:
- **taste clusters**: every item belongs to one of ``n_clusters`` genres;
- **long-term tastes**: each user has a sparse Dirichlet mixture over clusters;
- **short-term interests that drift**: each user's "session cluster" changes every
  ~``session_len`` of their events — only a model that learns online can follow it;
- **trends**: in each of ``n_trend_windows`` windows a few items get a burst;
- **arrivals**: a share of users and items first appear partway through the log.

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
    frame = frame.drop("session_cluster")
    # Stable across processes (str hashes are salted): the config decides the data.
    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()
    # The catalogue: each item's genre is its taste cluster (Feast's item attributes; the demo).
    items = pl.DataFrame({"item_id": np.arange(1, I + 1),
                          "genres": [[f"cluster-{c}"] for c in world["item_cluster"].tolist()]})
    return Dataset("synthetic", frame, items=items, sha256=digest, extra=truth)


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
