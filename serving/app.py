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

The pieces: `serving/settings.py` (ServeConfig), `serving/ranker.py` (the ONNX session),
`serving/service.py` (what requests touch), `serving/routes/` (one router per resource),
`serving/schemas.py` (the bodies /docs shows), `serving/admission.py` (load shedding).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serving.admission import Admission
from serving.ranker import check_exported
from serving.routes import ROUTERS
from serving.service import ServeMetrics, Service
from serving.settings import ServeConfig

__all__ = ["BackgroundServer", "ServeConfig", "check_exported", "create_app", "serve"]


def create_app(cfg: ServeConfig) -> FastAPI:
    """The app over one `Service`; its background threads run for the app's lifespan."""
    metrics = ServeMetrics()
    service = Service(cfg, metrics)  # loads the model now: a bad file fails here, not on the first request

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.close()

    app = FastAPI(lifespan=lifespan, title="recsys-nested", description="Ranked recommendations from nested user models "
                  "updated online from a Kafka stream.", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(Admission, max_in_flight=cfg.max_in_flight, max_body_bytes=cfg.max_body_bytes, metrics=metrics)
    for router in ROUTERS:
        app.include_router(router)
    _self_hosted_docs(app)
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
