"""`recsys serve`: ranked recommendations over HTTP from Feast + an ONNX Runtime session.

    GET  /recommendations/{user_id}?k=10   user vector (Feast) → ONNX Runtime → top-k item ids
    POST /events                           a validated `Event` (JSON), 202 once the broker has it
    GET  /healthz                          ok | degraded (and why); model, provider, uptime
    GET  /readyz                           200 while a model is loaded
    GET  /metrics                          Prometheus

Nothing slow runs on the event loop: online-store reads, broker sends and model scoring
run on thread pools, each with a timeout. When the online store is slow or failing, a
user is ranked by the population level — the answer says ``"degraded": reason`` and
`/healthz` says degraded — never a 500. Users with no pushed state yet get the same
population ranking. `POST /events` answers 202 only after the broker acknowledged, or a
fast 503 with ``Retry-After``; the server starts without Kafka and connects when it can.

A new model file at the same path is loaded in the background and swapped in with one
reference assignment, if it fits what is served (same inputs and user dimension, an item
table that extends or prefixes the current one); otherwise it is refused with a log line
and a metric, and the current model stays.
"""

from __future__ import annotations

import asyncio
import ctypes
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from features.store import MAX_PARTITIONS, is_population_key  # feast itself loads lazily
from serving.admission import Admission
from serving.population import whole_population
from streaming.catalogue import Catalogue
from streaming.clients import make_request_producer
from streaming.events import Event, InvalidEvent

log = logging.getLogger("recsys.serve")
INLINE_SCORING_ITEMS = 50_000  # larger catalogues are scored on a thread, off the event loop
RESYNCING = "online store lost rows: re-syncing"  # until the workers' re-push brings them back


@dataclass(frozen=True)
class ServeConfig:
    model: Path  # an exported model.onnx (`recsys export`)
    feature_repo: Path | None = None  # where the stream worker pushes user vectors
    bootstrap_servers: str | None = None  # POST /events produces here; None: the endpoint answers 503
    topic: str = "interactions"
    api_key: str | None = None  # writes need it (header X-API-Key) ...
    allow_anonymous_writes: bool = False  # ... unless this is said explicitly
    reload_every_s: float = 1.0  # how often the model file is checked for a new version
    population_every_s: float = 0.5  # how often the population level (and the item catalogue) is re-read
    max_partitions: int = MAX_PARTITIONS  # population rows read: one per partition of the topic, up to this many
    # A partition's row whose stream clock is this far behind the freshest one is left out of the
    # sum: a partition nobody applies any more (with a time-decayed level it weighs ~0 anyway).
    population_max_lag_s: float = 30 * 86400.0
    max_k: int = 100
    max_body_bytes: int = 64 * 1024  # larger request bodies are refused before they are read
    max_exclude: int = 500  # item ids one request may exclude
    feature_timeout_s: float = 0.25  # a slower online-store read is answered from the population level
    send_timeout_s: float = 2.0  # the broker's acknowledgement of POST /events, or 503
    degraded_for_s: float = 10.0  # /healthz says degraded this long after a fault
    # Admission control: beyond this many requests in the app at once, a request is answered
    # 503 + Retry-After at once instead of queueing. bench/serving_load.py on 2 cores, with a
    # worker ingesting 2,000 ev/s: at 2x capacity 32 keeps the answered p99 under 1 s; 64
    # admits so many that most answers degrade to the population list (store reads saturate).
    max_in_flight: int = 32


def cuda_devices() -> int:
    """How many CUDA devices the driver sees (0 without a driver): torch's question, asked
    of the driver itself so the server process never loads torch."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return count.value if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except OSError:
        return 0


def check_exported(path: Path) -> None:
    """An exported model, or an error that says which command makes one (not ONNX Runtime's
    INVALID_PROTOBUF traceback)."""
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}: run `recsys export --model MODEL.safetensors "
                                f"--out {path}` first")
    with path.open("rb") as f:
        head = f.read(16)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        raise ValueError(f"{path} is a `recsys train` model file, not an exported one: run `recsys export "
                         f"--model {path} --out {path.with_suffix('.onnx')}`, then serve "
                         f"{path.with_suffix('.onnx')}")


class Ranker:
    """One ONNX Runtime session and what it needs to name items."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        check_exported(Path(path))
        self.path, self.mtime = Path(path), Path(path).stat().st_mtime
        providers = ["CPUExecutionProvider"]
        # The onnxruntime-gpu build lists CUDA even without a GPU: ask the driver for a device.
        if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_devices() > 0:
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # many small requests: parallelism is across requests
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.inputs = sorted(i.name for i in self.session.get_inputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.item_ids: list[str] = json.loads(meta["item_ids"])
        # How the partitions' partial counts come to one time: by each speed's half-life (None:
        # the level counts events, and the partials are summed as they are), and which memory
        # the score reads from the speeds.
        self.pop_half_lives_s: list[float] | None = json.loads(meta.get("pop_half_lives_s", "null"))
        if self.pop_half_lives_s is None and json.loads(meta.get("pop_half_life_s", "null")) is not None:
            self.pop_half_lives_s = [json.loads(meta["pop_half_life_s"])]  # exported before the speeds: one
        self.pop_memory_events = float(json.loads(meta.get("pop_memory_events", "1")))
        self.user0 = np.asarray(json.loads(meta["user0"]), dtype=np.float32)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        log.info("model %s: %d items, execution provider %s", path, len(self.item_ids), self.provider)

    def misfit(self, current: Ranker) -> str | None:
        """Why this model cannot replace ``current`` (None: it can). The online store holds
        vectors of the current dimension and item indices of the current table."""
        if self.inputs != current.inputs:
            return f"inputs {self.inputs} differ from the served model's {current.inputs}"
        if self.user0.shape != current.user0.shape:
            return f"user vectors of {self.user0.shape[0]} dims, the online store holds {current.user0.shape[0]}"
        shared = min(len(self.item_ids), len(current.item_ids))
        if self.item_ids[:shared] != current.item_ids[:shared]:
            return "its item table is not an extension or a prefix of the served one (indices would change meaning)"
        return None

    def top(self, user: np.ndarray, absent_s: float, population: np.ndarray, seen: list[int], exclude: list[str],
            k: int, online_items: list[str] = ()) -> list[tuple[str, float]]:
        """``absent_s``: seconds from the user's latest event to the stream's clock (their
        personal score fades with it); ``population``: item counts over the model's table and
        then ``online_items``, the catalogue's items first seen on the stream; ``seen``: item
        indices from the stream worker, in that same numbering; ``exclude``: item ids from
        the request.

        Items first seen online have no slow-level embedding yet: the graph scores them
        (input ``extra``) as the model does an item past its table (`NestedModel.all_items`);
        the two ranked lists merge by score."""
        n = len(self.item_ids)
        mask = np.zeros((1, n), dtype=bool)
        mask[0, [i for i in seen if 0 <= i < n]] = True
        mask[0, [self.index[i] for i in exclude if i in self.index]] = True
        extra_counts = np.ascontiguousarray(population[n:n + len(online_items)], dtype=np.float32)
        scores, items, extra_scores = self.session.run(None, {
            "user": user.reshape(1, -1).astype(np.float32, copy=False), "absent_s": np.array([absent_s], dtype=np.float32),
            "population": population[:n], "exclude": mask, "extra": extra_counts})
        ranked = [(self.item_ids[i], float(s)) for i, s in zip(items[0, :k], scores[0, :k]) if np.isfinite(s)]
        if len(online_items):
            extra = extra_scores[0]
            hidden = {i - n for i in seen if i >= n} | {j for j, item in enumerate(online_items) if item in exclude}
            best = [j for j in np.argsort(-extra, kind="stable")[:k + len(hidden)] if j not in hidden][:k]
            ranked = sorted(ranked + [(online_items[j], float(extra[j])) for j in best], key=lambda r: -r[1])[:k]
        return ranked


class Service:
    """Everything a request touches: the current ranker, the feature store, the producer,
    and the thread pools that keep their slow calls off the event loop."""

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
        self._partitions: set[int] = set()  # partitions whose population row has been read once
        # (for which ranker, item id -> attributes, how many of its online items were looked up)
        self.attributes: tuple[Ranker | None, dict[str, dict], int] = (None, {}, 0)
        self.rejected_mtime = None  # a refused model file is not retried until it changes
        self.started = time.time()
        self._stop = threading.Event()
        threading.Thread(target=self._watch_model, daemon=True, name="model-watch").start()
        self.catalogue = None  # a reader of the worker group's item catalogue (streaming/catalogue.py)
        self._online_items: tuple[Ranker | None, list[str]] = (None, [])  # (for which ranker, items past its table)
        if self.features is not None:
            threading.Thread(target=self._watch_population, daemon=True, name="population").start()
            if cfg.bootstrap_servers:
                threading.Thread(target=self._watch_catalogue, daemon=True, name="catalogue").start()
        if cfg.bootstrap_servers:
            threading.Thread(target=self._connect_producer, daemon=True, name="kafka-connect").start()

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

    async def user_state(self, user_id: str) -> tuple[np.ndarray, list[int], int, str, str | None]:
        """(user vector, item indices the user touched last, time of their latest event
        (-1: unknown), "user" | "population", why it is degraded (None: it is not))."""
        fallback = self.ranker.user0, [], -1, "population"
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
        return (np.asarray(row["vector"][0], dtype=np.float32), row["recent_items"][0] or [],
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
        for pool in (self.reads, self.scoring, self.sends):
            pool.shutdown(wait=False, cancel_futures=True)
        if self.producer is not None:
            self.producer.close(timeout=2)


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


def create_app(cfg: ServeConfig) -> FastAPI:
    metrics = ServeMetrics()
    service = Service(cfg, metrics)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(lifespan=lifespan, title="recsys-nested", description="Ranked recommendations from nested user models "
                  "updated online from a Kafka stream.", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = service
    _self_hosted_docs(app)

    app.add_middleware(Admission, max_in_flight=cfg.max_in_flight, max_body_bytes=cfg.max_body_bytes, metrics=metrics)

    def require_writer(key: str | None) -> None:
        if cfg.api_key is None:
            if not cfg.allow_anonymous_writes:
                raise HTTPException(403, "writes are off: set RECSYS_API_KEY (or --api-key-file) and send it as "
                                         "X-API-Key, or start the server with --allow-anonymous-writes")
        elif key is None or not hmac.compare_digest(key.encode(), cfg.api_key.encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header")

    def check_user_id(user_id: str) -> None:
        if is_population_key(user_id) or not user_id.isprintable() or user_id.strip() != user_id:
            raise HTTPException(422, "user_id is reserved or holds control, formatting or surrounding space characters")

    @app.get("/recommendations/{user_id}", summary="top-k items for a user")
    async def recommendations(user_id: str = PathParam(min_length=1, max_length=128),
                              k: int = Query(10, ge=1, le=cfg.max_k),
                              exclude: str = Query("", max_length=64 * 1024,
                                                   description="comma-separated item ids not to recommend, besides "
                                                   "the user's latest items, which are never recommended")):
        check_user_id(user_id)
        excluded = [e for e in exclude.split(",") if e]
        if len(excluded) > cfg.max_exclude:
            raise HTTPException(422, f"exclude lists {len(excluded)} items; at most {cfg.max_exclude}")
        ranker = service.ranker  # one read: a swap mid-request cannot mix two models
        user, seen, last_ts, source, degraded = await service.user_state(user_id)
        if user.shape != ranker.user0.shape:  # a vector from another model's dimension: rank by the population
            user, seen, last_ts, source = ranker.user0, [], -1, "population"
            degraded = service.fault("user vector of another dimension")
        online = service.online_items(ranker)
        population, clock = service.population(len(ranker.item_ids) + len(online))
        absent_s = clock - last_ts if min(clock, last_ts) >= 0 else 0
        items = await service.score(ranker, user, absent_s, population, seen, excluded, k, online)
        answer = {"user_id": user_id, "source": source, "model": ranker.path.name,  # never a server path
                  "items": [service.item(i, s) for i, s in items]}
        if degraded:
            answer["degraded"] = degraded
        return answer

    @app.post("/events", status_code=202, summary="record an interaction (produced to Kafka)")
    async def post_event(request: Request, x_api_key: str | None = Header(None)):
        require_writer(x_api_key)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise HTTPException(415, "send the event as JSON (Content-Type: application/json)")
        body = bytearray()
        async for chunk in request.stream():  # bounded even without a Content-Length
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise HTTPException(413, f"request body over {cfg.max_body_bytes} bytes")
        try:
            event = Event.from_json(bytes(body))
        except InvalidEvent as e:
            return JSONResponse({"error": e.reason, "detail": e.detail}, status_code=400)
        if not cfg.bootstrap_servers:
            raise HTTPException(503, "no Kafka configured for this server (--bootstrap-servers)")
        if service.producer is None:
            return JSONResponse({"detail": "Kafka is not reachable yet; retry"}, status_code=503,
                                headers={"Retry-After": "2"})
        try:
            await service.send(event)
        except Exception as e:
            service.fault("kafka send failing", e)
            return JSONResponse({"detail": "the broker did not acknowledge the event; retry"}, status_code=503,
                                headers={"Retry-After": "1"})
        return {"accepted": event.to_dict()}

    @app.get("/healthz")
    async def healthz():
        r, reasons = service.ranker, service.degraded()
        return {"status": "degraded" if reasons else "ok", "reasons": reasons, "model": r.path.name,
                "items": len(r.item_ids), "provider": r.provider, "kafka": service.producer is not None,
                "feature_repo": cfg.feature_repo is not None,
                "population_partitions": len(service._partitions),
                "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/readyz")
    async def readyz():
        return {"ready": service.ranker is not None}  # the ranker is loaded before the app exists

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def _self_hosted_docs(app: FastAPI) -> None:
    """/docs from the Swagger UI files of the installed `swagger-ui-bundle`, as FastAPI's
    guide to self-hosting them does: its default page loads them from a CDN, which a server
    without a route out (or a careful user's browser) cannot reach."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount("/static/docs", StaticFiles(directory=str(swagger_ui_path)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} API",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css",
                                   swagger_favicon_url="/static/docs/favicon-32x32.png")


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s [serve] %(message)s", datefmt="%H:%M:%S")
    uvicorn.run(create_app(cfg), host=host, port=port, log_level="warning")
    return 0


class BackgroundServer:
    """The app on a real loopback port in a thread (tests, benches, the demo).

        >>> with BackgroundServer(create_app(cfg)) as url:
        ...     httpx.get(f"{url}/healthz")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        from streaming.broker import free_port

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.url = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True, name="http")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
