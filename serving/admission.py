"""What every request meets first: a body-size check, admission control, and the metrics.

A pure ASGI middleware (Starlette's recommended shape for this) rather than an
``@app.middleware("http")`` function: a request turned away costs two ``send`` calls and no
task, stream or ``Request`` object, so at three times the server's capacity shedding
leaves the core to the requests it admits.
"""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("recsys.serve")

NEVER_SHED = frozenset({"/healthz", "/readyz", "/metrics"})  # a supervisor must see an overloaded server


class Admission:
    """Wraps the app: over ``max_in_flight`` requests inside it, a request is answered 503 with
    ``Retry-After`` at once instead of queueing behind the others (queueing is what turns an
    overload into seconds of latency for everyone). ``metrics`` has ``requests``, ``latency``,
    ``shed`` and ``in_flight``."""

    def __init__(self, app, *, max_in_flight: int, max_body_bytes: int, metrics) -> None:
        self.app, self.max_in_flight, self.max_body_bytes, self.metrics = app, max_in_flight, max_body_bytes, metrics
        self.in_flight = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [None]  # the answer's status, once it has started

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        length = dict(scope.get("headers") or []).get(b"content-length", b"").decode("latin-1")
        if length and (not length.isdigit() or int(length) > self.max_body_bytes):  # refused before it is read
            await _answer(observed_send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})
        elif self.in_flight >= self.max_in_flight and scope["path"] not in NEVER_SHED:
            self.metrics.shed.inc()
            await _answer(observed_send, 503, {"detail": f"over {self.max_in_flight} requests in flight; retry"},
                          retry_after="1")
        else:
            self.in_flight += 1
            self.metrics.in_flight.set(self.in_flight)
            try:
                await self.app(scope, receive, observed_send)
            except Exception:
                log.exception("unhandled error on %s", scope["path"])
                if status[0] is None:
                    await _answer(observed_send, 500, {"detail": "internal error"})
            finally:
                self.in_flight -= 1
                self.metrics.in_flight.set(self.in_flight)
        route = scope.get("route")
        endpoint = route.path if route is not None else "unmatched"
        self.metrics.requests.labels(endpoint, str(status[0] or 500)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


async def _answer(send, status: int, body: dict, retry_after: str | None = None) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", retry_after.encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
