"""What the routes depend on (`Depends`): the service, its settings, and the write key."""

from __future__ import annotations

import hmac

from fastapi import Depends, Header, HTTPException, Request

from serving.service import Service
from serving.settings import ServeConfig


def service(request: Request) -> Service:
    return request.app.state.service


def settings(request: Request) -> ServeConfig:
    return request.app.state.service.cfg


def writer(x_api_key: str | None = Header(None), cfg: ServeConfig = Depends(settings)) -> None:
    """Writes need the configured key (compared in constant time), or anonymous writes allowed."""
    if cfg.api_key is None:
        if not cfg.allow_anonymous_writes:
            raise HTTPException(403, "writes are off: set RECSYS_API_KEY (or --api-key-file) and send it as "
                                     "X-API-Key, or start the server with --allow-anonymous-writes")
    elif x_api_key is None or not hmac.compare_digest(x_api_key.encode(), cfg.api_key.encode()):
        raise HTTPException(401, "missing or wrong X-API-Key header")
