"""The population level as serving reads it from the online store: each partition's row,
brought to the freshest clock and summed (`recsys.partials`), leaving out a partition that
stopped moving."""

from __future__ import annotations

import numpy as np

from recsys.partials import read_speeds, sum_levels


def whole_population(partials, half_lives_s: list[float] | None, memory_events: float,
                     max_lag_s: float) -> tuple[np.ndarray, int]:
    """The partitions' partial levels (partition, item-major counts at each speed, events,
    clock) → the whole level's read counts and clock, leaving out any partition that has
    fallen ``max_lag_s`` behind the freshest."""
    speeds = len(half_lives_s) if half_lives_s is not None else 1
    freshest = max(t for *_, t in partials)
    total, clock = sum_levels([(np.asarray(c, dtype=np.float32).reshape(-1, speeds), t) for _, c, _, t in partials
                               if freshest - t <= max_lag_s], half_lives_s)
    return read_speeds(total, memory_events), clock
