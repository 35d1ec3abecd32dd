"""Kafka in and out: the `Event` schema, the embedded broker, producer and reader, and the stream
worker (`worker`) with its checkpoints (`checkpoint`), partition ownership and Feast push."""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "Event": "streaming.events", "InvalidEvent": "streaming.events",
    "EmbeddedBroker": "streaming.broker",
    "ProducerConfig": "streaming.producer", "produce": "streaming.producer",
    "ReaderConfig": "streaming.consumer", "read_topic": "streaming.consumer",
    "WorkerConfig": "streaming.worker", "StreamWorker": "streaming.worker", "run_worker": "streaming.worker",
})
