"""What every request touches, owned in one place: the current ranker, the feature store, the
producer, the population level and catalogue as last read, and the thread pools and
background threads that keep slow calls off the event loop.

The app's lifespan calls `Service.start` (the watcher threads) and `Service.close`; the routes
reach the service through `Depends(service)` (serving/routes/).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.association import AssociationTables
from serving.population import whole_population
from serving.ranker import Ranker
from serving.settings import ServeConfig
from streaming.catalogue import Catalogue
from streaming.clients import make_request_producer
from streaming.events import Event

log = logging.getLogger("recsys.serve")
INLINE_SCORING_ITEMS = 50_000  # larger catalogues are scored on a thread, off the event loop
RESYNCING = "online store lost rows: re-syncing"  # until the workers' re-push brings them back
ASSOCIATION_UNREAD = "association level not read yet"  # no broker, or its changelog not yet read


class ServeMetrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("recsys_serve_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("recsys_serve_latency_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
        self.degraded = Counter("recsys_serve_degraded", "answers given in a degraded way, by reason", ["reason"],
                                registry=r)
        self.rejected_models = Counter("recsys_serve_models_rejected", "model files refused by the hot swap",
                                       registry=r)
        self.shed = Counter("recsys_serve_shed", "requests answered 503 by admission control (max_in_flight)",
                            registry=r)
        self.in_flight = Gauge("recsys_serve_in_flight", "requests in the app now", registry=r)


class Service:
    """Everything a request touches (see the module's docstring)."""

    MAX_READS_IN_FLIGHT = 32  # beyond this the store is saturated: answer from the population at once

    def __init__(self, cfg: ServeConfig, metrics: ServeMetrics):
        self.cfg, self.metrics = cfg, metrics
        self.ranker = Ranker(cfg.model)
        self.features = None
        if cfg.feature_repo is not None:
            from features.store import FeatureRepo

            self.features = FeatureRepo(cfg.feature_repo)  # fails early on a missing repo; threads open their own
        self._repos = threading.local()
        self.reads = ThreadPoolExecutor(4, thread_name_prefix="feature-read")
        self.scoring = ThreadPoolExecutor(2, thread_name_prefix="score")
        self.sends = ThreadPoolExecutor(4, thread_name_prefix="kafka-send")
        self.reads_in_flight = 0
        self.producer = None  # set once the broker answers (writes are 503 until then)
        self.faults: dict[str, float] = {}  # reason -> monotonic time it was last seen
        self._population = (np.zeros(0, dtype=np.float32), -1)  # (counts, clock), refreshed by a thread
        self._association: tuple[Ranker | None, AssociationTables | None] = (None, None)  # tailed by a thread
        self._partitions: set[int] = set()  # partitions whose population row has been read once
        # (for which ranker, item id -> attributes, how many of its online items were looked up)
        self.attributes: tuple[Ranker | None, dict[str, dict], int] = (None, {}, 0)
        self.rejected_mtime = None  # a refused model file is not retried until it changes
        self.started = time.time()
        self._stop = threading.Event()
        self.catalogue = None  # a reader of the worker group's item catalogue (streaming/catalogue.py)
        self._online_items: tuple[Ranker | None, list[str]] = (None, [])  # (for which ranker, items past its table)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """The watchers: the model file, and with a store (and a broker) the population level,
        the item catalogue and the producer's connection. Started by the app's lifespan."""
        watchers = [self._watch_model]
        if self.features is not None:
            watchers += [self._watch_population] + ([self._watch_catalogue] if self.cfg.bootstrap_servers else [])
        if self.cfg.bootstrap_servers:
            watchers += [self._connect_producer, self._watch_association]
        for watch in watchers:
            thread = threading.Thread(target=watch, daemon=True, name=watch.__name__.strip("_"))
            thread.start()
            self._threads.append(thread)

    @property
    def population_partitions(self) -> int:
        """How many partitions' population rows have been read."""
        return len(self._partitions)

    # -- faults --------------------------------------------------------------------------------
    def fault(self, reason: str, error: BaseException | None = None) -> str:
        if error is not None and time.monotonic() - self.faults.get(reason, -1e9) > self.cfg.degraded_for_s:
            log.warning("%s: %s: %s", reason, type(error).__name__, error)  # once per episode, not per request
        self.faults[reason] = time.monotonic()
        self.metrics.degraded.labels(reason).inc()
        return reason

    def degraded(self) -> list[str]:
        now = time.monotonic()
        return sorted(r for r, t in self.faults.items() if now - t < self.cfg.degraded_for_s)

    # -- reads -----------------------------------------------------------------------------------
    def repo(self):
        """This thread's own view of the feature repo: Feast's SQLite store keeps one
        connection, which the read threads would otherwise share, so one read stuck on a lock
        held up every other."""
        repo = getattr(self._repos, "repo", None)
        if repo is None:
            from features.store import FeatureRepo

            repo = self._repos.repo = FeatureRepo(self.cfg.feature_repo)
        return repo

    async def user_state(self, user_id: str) -> tuple[np.ndarray, list[int], int, int, str, str | None]:
        """(user vector, item indices the user touched last or turned down, events applied to them,
        time of their latest event (-1: unknown), "user" | "population", why it is degraded
        (None: it is not))."""
        fallback = self.ranker.user0, [], 0, -1, "population"
        if self.features is None:
            return *fallback, None
        if self.reads_in_flight >= self.MAX_READS_IN_FLIGHT:
            return *fallback, self.fault("online store saturated")
        self.reads_in_flight += 1
        try:
            row = await asyncio.wait_for(asyncio.wrap_future(self.reads.submit(lambda: self.repo().user_state([user_id]))),
                                         self.cfg.feature_timeout_s)
        except asyncio.TimeoutError:
            return *fallback, self.fault("online store slow")
        except Exception as e:
            return *fallback, self.fault("online store failing", e)
        finally:
            self.reads_in_flight -= 1
        if row["vector"][0] is None:
            return *fallback, None
        last_ts = row["last_ts"][0]
        return (np.asarray(row["vector"][0], dtype=np.float32), row["recent_items"][0] or [], row["events"][0] or 0,
                -1 if last_ts is None else last_ts, "user", None)

    def population(self, n: int) -> tuple[np.ndarray, int]:
        """The population level's item counts over ``n`` items and the stream's clock (the
        latest event applied, -1: unknown), as last read by the population thread."""
        counts, clock = self._population
        out = np.zeros(n, dtype=np.float32)
        out[:min(n, len(counts))] = counts[:n]  # items the level has not counted yet: 0
        return out, clock

    def _watch_population(self) -> None:
        while not self._stop.is_set():
            try:
                partials = self.repo().populations(self.cfg.max_partitions)
                present = {p for p, *_ in partials}
                if self._partitions - present:  # a store restarted empty: the workers push every row again
                    self.fault(RESYNCING)  # meanwhile the last level read stays in use
                self._partitions |= present
                if partials:
                    self._population = whole_population(partials, self.ranker.pop_half_lives_s,
                                                        self.ranker.pop_memory_events, self.cfg.population_max_lag_s)
            except Exception as e:  # the last level read stays in use
                self.fault("population read failing", e)
            try:
                self._read_attributes(self.ranker)
            except Exception as e:  # answers go on without attributes; the next round tries again
                self.fault("item attributes read failing", e)
            self._stop.wait(self.cfg.population_every_s)

    def association(self, ranker: Ranker, latest: list[int], n_items: int
                    ) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(the graph's association inputs for a user's ``latest`` items over ``n_items``, why
        they are degraded): None where ``ranker`` reads no association level. Until its
        changelog is read (or without a broker to read it from), a read of nothing, and the
        answer says so."""
        if ranker.association is None:
            return None, None
        owner, tables = self._association
        if owner is not ranker or tables is None:
            return ranker.no_association(n_items), self.fault(ASSOCIATION_UNREAD)
        return tables.entries(latest, n_items), None

    def _watch_association(self) -> None:
        """The association level's changelog, tailed as often as the population level is read."""
        while not self._stop.is_set():
            ranker = self.ranker
            owner, tables = self._association
            try:
                if ranker.association is not None:
                    if owner is not ranker or tables is None:  # a new model: its level from the start of the log
                        if tables is not None:
                            tables.close()
                        self._association = (None, None)
                        spec = ranker.association
                        tables = AssociationTables(self.cfg.bootstrap_servers, self.cfg.topic, spec["half_lives_s"],
                                                   spec["window"], spec["position_decay"])
                    tables.refresh()
                    self._association = (ranker, tables)
            except Exception as e:  # the level read last stays in use
                self.fault("association changelog read failing", e)
            self._stop.wait(self.cfg.population_every_s)

    def online_items(self, ranker: Ranker) -> list[str]:
        """The catalogue's items first seen on the stream, past ``ranker``'s table, in the
        numbering the workers' population counts use."""
        owner, items = self._online_items
        return items if owner is ranker else []

    def _watch_catalogue(self) -> None:
        """New items become recommendable without a retrain: the worker group names them in
        the catalogue topic, and this thread reads it (as often as the population level)."""
        while not self._stop.is_set():
            ranker = self.ranker
            try:
                if self.catalogue is None or self.catalogue.items.ids[:self.catalogue.n_model] != ranker.item_ids:
                    if self.catalogue is not None:
                        self.catalogue.close()
                    self.catalogue = None
                    self.catalogue = Catalogue(self.cfg.bootstrap_servers, self.cfg.topic, ranker.item_ids)
                self.catalogue.refresh()
                self._online_items = (ranker, self.catalogue.items.ids[len(ranker.item_ids):])
            except Exception as e:  # answers go on with the items known so far
                self.fault("item catalogue read failing", e)
            self._stop.wait(self.cfg.population_every_s)

    def _read_attributes(self, ranker: Ranker) -> None:
        """The attributes of ``ranker``'s items once, then of each item the stream adds as the
        catalogue names it (a shop's new product has its price before it has an embedding)."""
        owner, attrs, n_online = self.attributes
        if owner is not ranker:
            attrs, n_online = self._item_attributes(ranker.item_ids), 0
        online = self.online_items(ranker)
        if len(online) > n_online:
            attrs, n_online = attrs | self._item_attributes(online[n_online:]), len(online)
        self.attributes = (ranker, attrs, n_online)

    def _item_attributes(self, item_ids: list[str], chunk: int = 10_000) -> dict[str, dict]:
        out = {}
        for lo in range(0, len(item_ids), chunk):
            out |= self.repo().item_attributes(item_ids[lo:lo + chunk])
        return out

    def item(self, item_id: str, score: float) -> dict:
        """One recommended item as answered: its id, score and attributes where the catalogue has them."""
        return {"item_id": item_id, "score": round(score, 6), **self.attributes[1].get(item_id, {})}

    async def score(self, ranker: Ranker, *args) -> list[tuple[str, float]]:
        """Inline for a catalogue that scores in tens of microseconds (ML-1M's 3,416 items: 26 µs
        p50, less than the hop to a thread: bench/serving_load.py); on a thread beyond that."""
        if len(ranker.item_ids) <= INLINE_SCORING_ITEMS:
            return ranker.top(*args)
        return await asyncio.wrap_future(self.scoring.submit(ranker.top, *args))

    # -- writes ----------------------------------------------------------------------------------
    def _connect_producer(self) -> None:
        """Connect in the background, retrying: reads never wait for Kafka."""
        while not self._stop.is_set():
            try:
                self.producer = make_request_producer(self.cfg.bootstrap_servers, self.cfg.send_timeout_s)
                log.info("connected to Kafka at %s", self.cfg.bootstrap_servers)
                return
            except Exception as e:
                self.fault("kafka unreachable", e)
                self._stop.wait(2.0)

    async def send(self, event: Event) -> None:
        """Produce ``event`` and wait for the broker's acknowledgement (raises on failure or timeout)."""
        def send_and_wait():
            self.producer.send(self.cfg.topic, key=event.user_id.encode(), value=event.to_json()).get(
                timeout=self.cfg.send_timeout_s)

        await asyncio.wait_for(asyncio.wrap_future(self.sends.submit(send_and_wait)), self.cfg.send_timeout_s + 0.5)

    # -- the model file --------------------------------------------------------------------------
    def _watch_model(self) -> None:
        while not self._stop.wait(self.cfg.reload_every_s):
            try:
                mtime = self.cfg.model.stat().st_mtime
                if mtime in (self.ranker.mtime, self.rejected_mtime):
                    continue
                candidate = Ranker(self.cfg.model)  # built fully first; then one assignment swaps it
                why = candidate.misfit(self.ranker)
                if why is None:
                    self.ranker = candidate
                    log.info("hot-swapped model %s", self.cfg.model)
                else:
                    self.rejected_mtime = mtime
                    self.metrics.rejected_models.inc()
                    log.warning("refused the new model file %s, keeping the current one: %s", self.cfg.model, why)
            except Exception as e:  # a half-copied or bad file: keep serving the current model
                log.warning("model reload failed, keeping the current one: %s", e)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:  # each wakes on the stop event; one mid-call is a daemon and ends with us
            thread.join(timeout=1)
        for pool in (self.reads, self.scoring, self.sends):
            pool.shutdown(wait=False, cancel_futures=True)
        if self.producer is not None:
            self.producer.close(timeout=2)
