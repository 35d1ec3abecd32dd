"""GET /recommendations/{user_id}: the user's state from the online store, ranked by the model."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Path, Query

from features.store import is_population_key
from serving.routes.deps import service
from serving.schemas import Recommendations
from serving.service import Service

router = APIRouter(tags=["recommendations"])


@router.get("/recommendations/{user_id}", response_model=Recommendations, response_model_exclude_none=True,
            summary="top-k items for a user")
async def recommendations(user_id: str = Path(min_length=1, max_length=128),
                          k: int = Query(10, ge=1, description="at most the server's max_k (100)"),
                          exclude: str = Query("", max_length=64 * 1024,
                                               description="comma-separated item ids not to recommend, besides "
                                               "the user's latest items, which are never recommended"),
                          svc: Service = Depends(service)) -> dict:
    if is_population_key(user_id) or not user_id.isprintable() or user_id.strip() != user_id:
        raise HTTPException(422, "user_id is reserved or holds control, formatting or surrounding space characters")
    if k > svc.cfg.max_k:
        raise HTTPException(422, f"k={k}; at most {svc.cfg.max_k}")
    excluded = [e for e in exclude.split(",") if e]
    if len(excluded) > svc.cfg.max_exclude:
        raise HTTPException(422, f"exclude lists {len(excluded)} items; at most {svc.cfg.max_exclude}")

    ranker = svc.ranker  # one read: a swap mid-request cannot mix two models
    user, seen, events, last_ts, source, degraded = await svc.user_state(user_id)
    if user.shape != ranker.user0.shape:  # a vector from another model's dimension: rank by the population
        user, seen, events, last_ts, source = ranker.user0, [], 0, -1, "population"
        degraded = svc.fault("user vector of another dimension")
    online = svc.online_items(ranker)
    n_items = len(ranker.item_ids) + len(online)
    population, clock = svc.population(n_items)
    absent_s = clock - last_ts if min(clock, last_ts) >= 0 else 0
    association, unread = svc.association(ranker, ranker.latest(seen, events), n_items)
    degraded = degraded or unread
    items = await svc.score(ranker, user, absent_s, population, seen, excluded, k, online, association)
    return {"user_id": user_id, "source": source, "model": ranker.path.name,  # never a server path
            "items": [svc.item(i, s) for i, s in items], "degraded": degraded}
