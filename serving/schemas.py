"""The API's response bodies, as `/docs` shows them; the request body is `streaming.events.Event`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from streaming.events import Event


class RecommendedItem(BaseModel):
    """One ranked item: its id, its score and the catalogue's attributes (``--item-columns``)."""

    model_config = ConfigDict(extra="allow")
    item_id: str
    score: float


class Recommendations(BaseModel):
    user_id: str
    source: Literal["user", "population"] = Field(
        description="user: ranked from the user's own state; population: the trend ranking (a user with no "
                    "pushed state yet, or a degraded read)")
    model: str = Field(description="the served model file's name")
    items: list[RecommendedItem]
    degraded: str | None = Field(None, description="why this answer was degraded (absent when it was not)")


class Accepted(BaseModel):
    accepted: Event  # the one event schema (streaming/events.py), which the worker validates too


class Rejected(BaseModel):
    error: str = Field(description="the reason, as the dead-letter topic names it")
    detail: str


class Unavailable(BaseModel):
    detail: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    reasons: list[str]
    model: str
    items: int
    provider: str
    kafka: bool
    feature_repo: bool
    population_partitions: int
    uptime_s: float


class Ready(BaseModel):
    ready: bool
