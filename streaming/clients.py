"""Every Kafka client the project opens, configured here and nowhere else.

Three producers differ on purpose, by what a lost message costs:

| purpose       | who                               | acks | a send blocks at most |
| ------------- | --------------------------------- | ---- | --------------------- |
| `bulk`        | `recsys produce`, replay, tests   | 1    | the client default    |
| `dead_letter` | the stream worker's poison copies | all  | 10 s, then "lost"     |
| `request`     | serving's POST /events            | all  | the request's timeout |
"""

from __future__ import annotations

# Tansu joins groups in half the session timeout: keep it short (RECIPES.md).
# Metadata every 5 s, not kafka-python's 5 minutes: a worker group sees partitions added to
# its topic within 5 s (a topic created under a joining worker: `ensure_topic`).
CONSUMER = dict(auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000,
                heartbeat_interval_ms=1000, fetch_max_bytes=16 * 1024 * 1024,
                max_partition_fetch_bytes=4 * 1024 * 1024, metadata_max_age_ms=5000)


def make_consumer(bootstrap_servers: str, **overrides):
    from kafka import KafkaConsumer

    return KafkaConsumer(bootstrap_servers=bootstrap_servers, **(CONSUMER | overrides))


def make_producer(bootstrap_servers: str, linger_ms: int = 5, **overrides):
    """The bulk producer: acks=1 for throughput; idempotence needs acks=all, so say it is off
    rather than be warned."""
    from kafka import KafkaProducer

    settings = dict(linger_ms=linger_ms, acks=1, enable_idempotence=False, batch_size=256 * 1024,
                    max_request_size=4 * 1024 * 1024)
    return KafkaProducer(bootstrap_servers=bootstrap_servers, **(settings | overrides))


def make_dead_letter_producer(bootstrap_servers: str, max_body_bytes: int):
    """Every limit set on purpose: a request may carry the largest dead letter (truncated
    bodies); a send blocks at most 10 s on a lost broker (then it counts as lost, not as a
    stuck loop); acks=all, as a dead letter is the only copy kept."""
    from kafka import KafkaProducer

    return KafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=5, acks="all",
                         max_request_size=max(1024 * 1024, 2 * max_body_bytes),
                         max_block_ms=10_000, request_timeout_ms=10_000, delivery_timeout_ms=30_000)


def make_request_producer(bootstrap_servers: str, timeout_s: float):
    """A send waits at most ``timeout_s`` for the broker; an expired record is not sent later
    (delivery timeout), so a client retrying after a 503 does not duplicate it."""
    from kafka import KafkaProducer

    timeout_ms = int(timeout_s * 1000)
    return KafkaProducer(bootstrap_servers=bootstrap_servers, acks="all", linger_ms=0, max_block_ms=timeout_ms,
                         request_timeout_ms=timeout_ms, delivery_timeout_ms=timeout_ms, enable_idempotence=False)


def create_topic(bootstrap_servers: str, topic: str, partitions: int = 1, configs: dict[str, str] | None = None) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1, topic_configs=configs or {})])
    finally:
        admin.close()


def ensure_topic(bootstrap_servers: str, topic: str, timeout_s: float = 30) -> bool:
    """Create ``topic`` with the broker's default partitions and replication unless it exists,
    and wait until every partition has a leader. → whether this call created it.

    Why a consumer calls it before it subscribes: joining a group while the topic is being
    created (auto-created by the first producer, or by the consumer's own metadata request)
    can get an assignment of no partitions that kafka-python never revisits — a CI run saw a
    worker apply nothing for two minutes after the server's first POST created its topic."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        created = False
        if admin.describe_topics([topic])[0]["error_code"]:  # UNKNOWN_TOPIC_OR_PARTITION
            try:
                admin.create_topics({topic: {}})  # num_partitions, replication_factor: the broker's
                created = True
            except TopicAlreadyExistsError:  # another worker, or a producer, was first
                pass
        admin.wait_for_topics([topic], timeout_ms=int(timeout_s * 1000))
        return created
    finally:
        admin.close()
