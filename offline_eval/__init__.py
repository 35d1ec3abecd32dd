"""Offline replay evaluation under EVAL_PROTOCOL.md: the protocol (`protocol`, `replay`), the
metrics and report, the fit cache, and the replay's own models (`nested`, `hybrid`, `oracle`)."""

from recsys.exports import lazy

__getattr__, __all__ = lazy(__name__, {
    "ProtocolConfig": "offline_eval.protocol", "replay_model": "offline_eval.replay",
    "ReplayConfig": "offline_eval.report", "run_replay": "offline_eval.report", "write_report": "offline_eval.report",
})
