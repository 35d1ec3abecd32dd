"""The suite's one way to wait: for a condition, never for a span of time.

A condition on another process (a file, a log line, an HTTP answer) can only be polled;
the deadline is generous so a slow machine passes, and the pause between checks only
hands the CPU to the process being waited on — no result depends on it.

    >>> wait_until(lambda: checkpoint.exists(), "the first checkpoint")
"""

from __future__ import annotations

import time
from typing import Callable


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = 120, poll_s: float = 0.02):
    """Return ``condition()``'s first truthy value; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f}s waiting for {what}"
        time.sleep(poll_s)
    return value
