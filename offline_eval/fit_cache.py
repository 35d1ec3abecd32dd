"""Trained models are fit once per data, protocol, settings and code: the fitted weights
(and whatever the fit left behind, such as the fast state after the history or a random
generator's position) are kept in a folder and loaded the next time, so a second replay
of the same data costs the replay alone.

A model takes part by having ``fit_key()`` (its settings, as text), ``save_fit(folder)``
and ``load_fit(folder)``; counting baselines fit in milliseconds and have none.

    >>> cache = FitCache(Path("runs/cache/fits"))
    >>> key = cache.key(model, ds.sha256, protocol)
    >>> cache.load(model, key)       # None: fit it, then cache.save(model, key, seconds, "mf_static")

Models whose fits are the same (``mf_static`` and ``mf_online`` differ only after the
fit) share an entry: the key is the model's class and its ``fit_key()``, not its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Any change to the model code or the replay's code makes a new key: a cached fit is never
# one that the current code would not produce. Whole folders, not a list of names, so a new
# module (or a fit that moves to another file) is never left out.
CODE_FOLDERS = ("recsys", "offline_eval")


def cacheable(model) -> bool:
    return all(hasattr(model, m) for m in ("fit_key", "save_fit", "load_fit"))


def code_digest(root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for path in sorted(p for folder in CODE_FOLDERS for p in (root / folder).rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


class FitCache:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._code = code_digest()

    def key(self, model, dataset_sha256: str, protocol) -> str:
        # Of the protocol only the split decides a fit; the rest is the replay's.
        spec = {"model": type(model).__qualname__, "settings": model.fit_key(), "dataset": dataset_sha256,
                "history_fraction": protocol.history_fraction, "code": self._code}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()

    def _entry(self, model, key: str) -> Path:
        return self.folder / f"{type(model).__name__.lower()}-{key[:20]}"

    def load(self, model, key: str) -> float | None:
        """Fill ``model`` from the cache; the seconds its fit took, or None on a miss."""
        entry = self._entry(model, key)
        meta = entry / "fit.json"
        if not meta.exists():
            return None
        try:
            model.load_fit(entry)
            return float(json.loads(meta.read_text())["fit_seconds"])
        except Exception as e:  # a damaged entry is refitted (and replaced), never fatal
            print(f"[fit cache] {entry} unreadable ({e}); fitting again")
            return None

    def save(self, model, key: str, fit_seconds: float, name: str) -> None:
        """Written to a temporary folder and renamed: a reader sees a whole entry or none."""
        entry = self._entry(model, key)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_fit(tmp)
        (tmp / "fit.json").write_text(json.dumps({"model": name, "key": key, "fit_seconds": fit_seconds}))
        shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
