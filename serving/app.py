"""`recsys serve`: ranked recommendations over HTTP from Feast + an ONNX Runtime session.

    GET  /recommendations/{user_id}?k=10   user vector (Feast) → ONNX Runtime → top-k item ids
    POST /events                           a validated `Event`, produced to Kafka (API key if set)
    GET  /healthz                          model file, execution provider, uptime
    GET  /metrics                          Prometheus

Users with no pushed state yet get the population level's ranking (the slow level's
population vector), never an error. A new model file at the same path is loaded in
the background and swapped in with one reference assignment: requests in flight
finish on the old session, new ones start on the new one, none fail.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from features.store import POPULATION_KEY  # a constant; feast itself loads lazily
from streaming.events import Event, InvalidEvent

log = logging.getLogger("recsys.serve")


@dataclass(frozen=True)
class ServeConfig:
    model: Path  # an exported model.onnx (`recsys export`)
    feature_repo: Path | None = None  # where the stream worker pushes user vectors
    bootstrap_servers: str | None = None  # POST /events produces here; None: the endpoint answers 503
    topic: str = "interactions"
    api_key: str | None = None  # required on write endpoints when set (header X-API-Key)
    reload_every_s: float = 1.0  # how often the model file is checked for a new version
    population_every_s: float = 1.0  # how often the population term is re-read from the store
    max_k: int = 100


class Ranker:
    """One ONNX Runtime session and what it needs to name items."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path, self.mtime = Path(path), Path(path).stat().st_mtime
        import torch

        providers = ["CPUExecutionProvider"]
        # The onnxruntime-gpu build lists CUDA even without a GPU: ask the device, as the worker does.
        if torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # many small requests: parallelism is across requests
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.item_ids: list[str] = json.loads(meta["item_ids"])
        self.user0 = np.asarray(json.loads(meta["user0"]), dtype=np.float32)
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        log.info("model %s: %d items, execution provider %s", path, len(self.item_ids), self.provider)

    def top(self, user: np.ndarray, absent_s: float, population: np.ndarray, seen: list[int], exclude: list[str],
            k: int) -> list[tuple[str, float]]:
        """``absent_s``: seconds from the user's latest event to the stream's clock (their
        personal score fades with it); ``seen``: item indices from the stream worker (items
        newer than this model are past its catalogue and skipped); ``exclude``: item ids
        from the request."""
        n = len(self.item_ids)
        mask = np.zeros((1, n), dtype=bool)
        mask[0, [i for i in seen if 0 <= i < n]] = True
        mask[0, [self.index[i] for i in exclude if i in self.index]] = True
        scores, items = self.session.run(None, {"user": user.reshape(1, -1).astype(np.float32, copy=False),
                                                "absent_s": np.array([absent_s], dtype=np.float32),
                                                "population": population, "exclude": mask})
        return [(self.item_ids[i], float(s)) for i, s in zip(items[0, :k], scores[0, :k]) if np.isfinite(s)]


class Service:
    """Everything a request touches: the current ranker, the feature store, the producer."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.ranker = Ranker(cfg.model)
        self.features = None
        if cfg.feature_repo is not None:
            from features.store import FeatureRepo

            self.features = FeatureRepo(cfg.feature_repo)
        self.producer = None
        if cfg.bootstrap_servers:
            from streaming.producer import make_producer

            self.producer = make_producer(cfg.bootstrap_servers, linger_ms=0)
        self._population = (float("-inf"), np.zeros(0, dtype=np.float32), -1)
        self.started = time.time()
        self._stop = threading.Event()
        threading.Thread(target=self._watch_model, daemon=True, name="model-watch").start()

    def user_state(self, user_id: str) -> tuple[np.ndarray, list[int], int, str]:
        """(user vector, item indices the user touched last, time of their latest event
        (-1: unknown), "user" | "population")."""
        if self.features is not None:
            row = self.features.user_state([user_id])
            if row["state"][0] is not None:
                last_ts = row["last_ts"][0]
                return (np.asarray(row["state"][0], dtype=np.float32), row["recent_items"][0] or [],
                        -1 if last_ts is None else last_ts, "user")
        return self.ranker.user0, [], -1, "population"

    def population(self, n: int) -> tuple[np.ndarray, int]:
        """The population level's score term over ``n`` items and the stream's clock (the
        latest event applied, -1: unknown), re-read at most every ``population_every_s``."""
        read_at, term, clock = self._population
        if self.features is not None and time.monotonic() - read_at >= self.cfg.population_every_s:
            row = self.features.user_state([POPULATION_KEY])
            if row["state"][0] is not None:
                term = np.asarray(row["state"][0], dtype=np.float32)
                clock = -1 if row["last_ts"][0] is None else row["last_ts"][0]
            self._population = (time.monotonic(), term, clock)
        out = np.zeros(n, dtype=np.float32)
        out[:min(n, len(term))] = term[:n]  # items newer than the model are not in its graph
        return out, clock

    def _watch_model(self) -> None:
        while not self._stop.wait(self.cfg.reload_every_s):
            try:
                mtime = self.cfg.model.stat().st_mtime
                if mtime != self.ranker.mtime:
                    self.ranker = Ranker(self.cfg.model)  # built fully first; then one assignment swaps it
                    log.info("hot-swapped model %s", self.cfg.model)
            except Exception as e:  # a half-copied or bad file: keep serving the current model
                log.warning("model reload failed, keeping the current one: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self.producer is not None:
            self.producer.close()


def create_app(cfg: ServeConfig) -> FastAPI:
    service = Service(cfg)
    registry = CollectorRegistry()
    requests = Counter("recsys_serve_requests", "requests by endpoint and status", ["endpoint", "status"],
                       registry=registry)
    latency = Histogram("recsys_serve_latency_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .25, 1))
    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(lifespan=lifespan, title="recsys-nested", description="Ranked recommendations from nested user models "
                  "updated online from a Kafka stream.", version="0.1.0")
    app.state.service = service

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        requests.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        return response

    def require_key(key: str | None) -> None:
        if cfg.api_key is not None and key != cfg.api_key:
            raise HTTPException(401, "missing or wrong X-API-Key header")

    # async: the work is ~1 ms of lookups and one ORT call, cheaper inline than a threadpool hop.
    @app.get("/recommendations/{user_id}", summary="top-k items for a user")
    async def recommendations(user_id: str = PathParam(min_length=1, max_length=128),
                        k: int = Query(10, ge=1, le=cfg.max_k),
                        exclude: str = Query("", description="comma-separated item ids not to recommend, "
                                             "besides the user's latest items, which are never recommended")):
        ranker = service.ranker  # one read: a swap mid-request cannot mix two models
        user, seen, last_ts, source = service.user_state(user_id)
        if user.shape != ranker.user0.shape:
            raise HTTPException(409, f"user state has {user.shape[0]} dims, model expects {ranker.user0.shape[0]}")
        population, clock = service.population(len(ranker.item_ids))
        absent_s = clock - last_ts if min(clock, last_ts) >= 0 else 0
        items = ranker.top(user, absent_s, population, seen, [e for e in exclude.split(",") if e], k)
        return {"user_id": user_id, "source": source, "model": str(ranker.path),
                "items": [{"item_id": i, "score": round(s, 6)} for i, s in items]}

    @app.post("/events", status_code=202, summary="record an interaction (produced to Kafka)")
    async def post_event(request: Request, x_api_key: str | None = Header(None)):
        require_key(x_api_key)
        body = await request.body()
        try:
            event = Event.from_json(body)
        except InvalidEvent as e:
            return JSONResponse({"error": e.reason, "detail": e.detail}, status_code=400)
        if service.producer is None:
            raise HTTPException(503, "no Kafka configured for this server (--bootstrap-servers)")
        service.producer.send(cfg.topic, key=event.user_id.encode(), value=event.to_json())
        service.producer.flush(timeout=5)
        return {"accepted": event.to_dict()}

    @app.get("/healthz")
    def healthz():
        r = service.ranker
        return {"status": "ok", "model": str(r.path), "items": len(r.item_ids), "provider": r.provider,
                "feature_repo": str(cfg.feature_repo) if cfg.feature_repo else None,
                "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/metrics")
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


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
