"""GET /healthz, /readyz and /metrics: never shed by admission control (serving/admission.py)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving.routes.deps import service
from serving.schemas import Health, Ready
from serving.service import Service

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="ok | degraded (and why); model, provider, uptime")
async def healthz(svc: Service = Depends(service)) -> dict:
    r, reasons = svc.ranker, svc.degraded()
    return {"status": "degraded" if reasons else "ok", "reasons": reasons, "model": r.path.name,
            "items": len(r.item_ids), "provider": r.provider, "kafka": svc.producer is not None,
            "feature_repo": svc.features is not None, "population_partitions": svc.population_partitions,
            "uptime_s": round(time.time() - svc.started, 1)}


@router.get("/readyz", response_model=Ready, summary="200 while a model is loaded")
async def readyz(svc: Service = Depends(service)) -> dict:
    return {"ready": svc.ranker is not None}  # the ranker is loaded before the app exists


@router.get("/metrics", response_class=Response, summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
                             "description": "the Prometheus text format"}})
async def metrics(svc: Service = Depends(service)) -> Response:
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)
