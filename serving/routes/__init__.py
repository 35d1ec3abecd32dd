"""The API, one router per resource; `serving/app.py` includes them."""

from serving.routes import events, health, recommendations

ROUTERS = (recommendations.router, events.router, health.router)
