"""POST /events: one interaction, validated as the stream worker validates it, produced to Kafka;
202 once the broker has acknowledged it, or a fast 503 with Retry-After."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import TypeAdapter
from fastapi.responses import JSONResponse

from serving.routes.deps import service, writer
from serving.schemas import Accepted, Rejected, Unavailable
from serving.service import Service
from streaming.events import Event, InvalidEvent

router = APIRouter(tags=["events"])


@router.post("/events", status_code=202, response_model=Accepted, response_model_exclude_none=True,
             summary="record an interaction (produced to Kafka)", dependencies=[Depends(writer)],
             responses={400: {"model": Rejected, "description": "not a valid event"},
                        503: {"model": Unavailable, "description": "Kafka unreachable or slow: retry"}},
             # The body is read and bounded by hand (below), so its schema is declared here for /docs.
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": TypeAdapter(Event).json_schema()}}}})
async def post_event(request: Request, svc: Service = Depends(service)):
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise HTTPException(415, "send the event as JSON (Content-Type: application/json)")
    body = bytearray()
    async for chunk in request.stream():  # bounded even without a Content-Length
        body += chunk
        if len(body) > svc.cfg.max_body_bytes:
            raise HTTPException(413, f"request body over {svc.cfg.max_body_bytes} bytes")
    try:
        event = Event.from_json(bytes(body))  # the worker's own schema, so the two never disagree
    except InvalidEvent as e:
        return JSONResponse({"error": e.reason, "detail": e.detail}, status_code=400)
    if not svc.cfg.bootstrap_servers:
        raise HTTPException(503, "no Kafka configured for this server (--bootstrap-servers)")
    if svc.producer is None:
        return JSONResponse({"detail": "Kafka is not reachable yet; retry"}, status_code=503,
                            headers={"Retry-After": "2"})
    try:
        await svc.send(event)
    except Exception as e:
        svc.fault("kafka send failing", e)
        return JSONResponse({"detail": "the broker did not acknowledge the event; retry"}, status_code=503,
                            headers={"Retry-After": "1"})
    return {"accepted": event.to_dict()}
