"""`recsys serve`'s settings: one object, from flags or ``RECSYS_*`` environment variables.

    >>> ServeConfig(model=Path("runs/model/model.onnx"))          # RECSYS_API_KEY=… gives api_key
    $ RECSYS_MAX_K=50 RECSYS_FEATURE_TIMEOUT_S=0.5 recsys serve …  # a field by its upper-case name

Arguments win over the environment, the environment over the defaults (pydantic-settings'
order). `recsys serve` passes its flags, given or at their default, so a field with a flag
is set by the flag; the others (and the key, which is never a flag) by RECSYS_* variables.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from features.store import MAX_PARTITIONS


class ServeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", frozen=True, extra="ignore")

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

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_no_key(cls, key: str | None) -> str | None:
        if key is None or not key.strip():
            return None  # RECSYS_API_KEY="" must not open writes to an empty key
        return key.strip()
