"""Serving: the ONNX export of the scoring graph (`export`, which needs torch) and `recsys serve`,
the HTTP API over ONNX Runtime and Feast (`app`, `settings`, `service`, `routes/`, which do not)."""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "ServeConfig": "serving.settings", "create_app": "serving.app", "serve": "serving.app",
    "BackgroundServer": "serving.app", "Ranker": "serving.ranker", "export_onnx": "serving.export",
})
