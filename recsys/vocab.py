"""External ids (strings, as in the `Event` schema) ↔ dense row indices, growing online.

    >>> items = Vocab(["10", "42"])
    >>> items.index(["42", "7", "10"])        # "7" is new: it gets the next index
    array([1, 2, 0])
    >>> items.ids
    ['10', '42', '7']
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class Vocab:
    def __init__(self, ids: Iterable = ()):
        self.ids: list[str] = []
        self._index: dict[str, int] = {}
        self.index(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def index(self, keys: Iterable, add: bool = True) -> np.ndarray:
        """Indices of ``keys``; unknown keys are appended (``add``) or get -1."""
        out = []
        for key in map(str, keys):
            i = self._index.get(key)
            if i is None and add:
                i = self._index[key] = len(self.ids)
                self.ids.append(key)
            out.append(-1 if i is None else i)
        return np.asarray(out, dtype=np.int64)
