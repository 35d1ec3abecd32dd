"""Partial population levels — one per partition of the stream — brought to one clock and
summed, and the whole level read at the model's memory. In numpy: the worker group sums
on the CPU anyway (`recsys.nested.sum_levels` calls this), and the server process
reads the level without loading torch. The model's on-device `read_speeds` is the
reference for this one's; `tests/test_serving.py` checks they agree."""

from __future__ import annotations

import math

import numpy as np


def decay_to(counts: np.ndarray, ts: int, t: int, half_life_s) -> np.ndarray:
    """(N, S) counts as of ``ts`` → as of the later time ``t``; one half-life per speed."""
    age = max(float(t) - float(ts), 0.0)
    return counts * np.power(0.5, age / np.asarray(half_life_s, dtype=np.float64)).astype(counts.dtype)


def sum_levels(levels: list[tuple[np.ndarray, int]], half_lives_s: list[float] | None) -> tuple[np.ndarray, int]:
    """Partial levels [(counts (N_i, S), clock)] of disjoint parts of the stream → the whole
    level's counts and clock; time-decayed ones brought to the freshest clock first."""
    clock = max(int(t) for _, t in levels)
    total = np.zeros((max(len(c) for c, _ in levels), *levels[0][0].shape[1:]), dtype=levels[0][0].dtype)
    for counts, t in levels:
        total[:len(counts)] += counts if half_lives_s is None else decay_to(counts, int(t), clock, half_lives_s)
    return total, clock


def read_speeds(counts: np.ndarray, memory_events: float) -> np.ndarray:
    """(N, S) counts, slowest speed last → (N,) the counts of a level holding about
    ``memory_events`` events, interpolated in log mass between the two speeds around it."""
    if counts.shape[-1] == 1:
        return counts[..., 0]
    mass = np.log2(np.maximum(counts.sum(0), 1e-12))
    target = math.log2(memory_events / math.log(2))
    hi = int(np.clip((mass < target).sum(), 1, len(mass) - 1))
    lo = hi - 1
    a = float(np.clip((target - mass[lo]) / max(mass[hi] - mass[lo], 1e-12), 0, 1))
    return ((1 - a) * counts[:, lo] + a * counts[:, hi]).astype(counts.dtype)
