"""The stream worker's Prometheus metrics: what an operator scrapes and alerts on."""

from __future__ import annotations


class Metrics:
    """Prometheus metrics on a private registry (two workers in one process stay apart)."""

    def __init__(self, port: int | None, host: str = "127.0.0.1"):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

        self.registry = CollectorRegistry()
        r = self.registry
        self.events = Counter("recsys_stream_events", "valid events applied to the fast state", registry=r)
        self.dead = Counter("recsys_stream_dead_letters", "messages sent to the dead-letter topic",
                            ["reason"], registry=r)
        self.batch = Histogram("recsys_stream_batch_seconds", "decode + update time per micro-batch", registry=r,
                               buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.lag = Gauge("recsys_stream_lag", "messages behind the partition's high watermark", ["partition"],
                         registry=r)
        self.freshness = Gauge("recsys_stream_freshness_seconds",
                               "event produced → user vector in the online store", ["quantile"], registry=r)
        self.users = Gauge("recsys_stream_users", "user rows held by this worker", registry=r)
        self.dead_lost = Counter("recsys_stream_dead_letters_lost", "poison the dead-letter topic refused: "
                                 "logged with its offset and skipped", ["reason"], registry=r)
        self.resets = Counter("recsys_stream_partition_resets", "partitions restarted from the log's beginning "
                              "(topic recreated or truncated)", ["partition"], registry=r)
        self.checkpoint = Histogram("recsys_stream_checkpoint_seconds", "checkpoint write time", registry=r)
        self.checkpoint_failures = Counter("recsys_stream_checkpoint_failures", "checkpoint writes that failed",
                                           registry=r)
        self.checkpoint_age = Gauge("recsys_stream_checkpoint_age_seconds",
                                    "time since the last checkpoint on disk", registry=r)
        self.evicted = Counter("recsys_stream_users_evicted", "idle users moved to the online store", registry=r)
        self.rehydrated = Counter("recsys_stream_users_rehydrated", "evicted users taken back on their return",
                                  registry=r)
        self.push_failures = Counter("recsys_stream_push_failures", "online-store writes that failed "
                                     "(their users stay dirty and are pushed again)", registry=r)
        self.resyncs = Counter("recsys_stream_store_resyncs", "times the online store had lost rows and every "
                               "held row was pushed again", registry=r)
        self.push = Histogram("recsys_stream_push_seconds", "one online-store write of the touched users",
                              registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5))
        self.push_rows = Histogram("recsys_stream_push_rows", "users per online-store write", registry=r,
                                   buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000))
        if port is not None:
            start_http_server(port, addr=host, registry=r)
