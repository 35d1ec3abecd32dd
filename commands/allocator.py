"""Keep freed memory in the process: glibc's malloc hands large freed blocks back to the
kernel, depending on the order of earlier frees, so a loop that allocates the same few
megabytes per micro-batch (a (B, items) score matrix, its filtered copy, the ranks' mask)
may take them back as fresh pages every time. ML-1M's replay of decayed popularity and the
nested model, twice each in one process: 0.23M to 2.6M page faults and 1.4 to 8 s of system
time from run to run (the first popularity replay at 25k instead of 60–75k events/s), and
0.15M and 1.1 s every time with the settings below. Blocks up to 32 MB come from the
heap, and up to 256 MB of freed heap stays mapped for the next batch. A C library without
``mallopt`` (musl, macOS) is left as it is."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's malloc.h


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20,
                      top_pad: int = 64 << 20) -> bool:
    """Tune this process's malloc as above; True where the C library took every setting."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad))
    return all(mallopt(param, value) == 1 for param, value in settings)
