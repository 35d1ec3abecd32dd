"""The exported model behind the server: one ONNX Runtime session, and what it needs to name items.

    >>> ranker = Ranker(Path("runs/model/model.onnx"))
    >>> ranker.top(user, absent_s=0.0, population=counts, seen=[3, 7], exclude=[], k=10)
    [('1193', 4.2), ...]
"""

from __future__ import annotations

import ctypes
import json
import logging
from pathlib import Path

import numpy as np

from streaming.association_log import no_entries

log = logging.getLogger("recsys.serve")


def cuda_devices() -> int:
    """How many CUDA devices the driver sees (0 without a driver): torch's question, asked
    of the driver itself so the server process never loads torch."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return count.value if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 else 0
    except OSError:
        return 0


def check_exported(path: Path) -> None:
    """An exported model, or an error that says which command makes one (not ONNX Runtime's
    INVALID_PROTOBUF traceback)."""
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}: run `recsys export --model MODEL.safetensors "
                                f"--out {path}` first")
    with path.open("rb") as f:
        head = f.read(16)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if path.suffix == ".safetensors" or head[8:9] == b"{":
        raise ValueError(f"{path} is a `recsys train` model file, not an exported one: run `recsys export "
                         f"--model {path} --out {path.with_suffix('.onnx')}`, then serve "
                         f"{path.with_suffix('.onnx')}")


class Ranker:
    """One ONNX Runtime session and what it needs to name items."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        check_exported(Path(path))
        self.path, self.mtime = Path(path), Path(path).stat().st_mtime
        providers = ["CPUExecutionProvider"]
        # The onnxruntime-gpu build lists CUDA even without a GPU: ask the driver for a device.
        if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_devices() > 0:
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # many small requests: parallelism is across requests
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.inputs = sorted(i.name for i in self.session.get_inputs())
        meta = self.session.get_modelmeta().custom_metadata_map
        self.item_ids: list[str] = json.loads(meta["item_ids"])
        # How the partitions' partial counts come to one time: by each speed's half-life (None:
        # the level counts events, and the partials are summed as they are), and which memory
        # the score reads from the speeds.
        self.pop_half_lives_s: list[float] | None = json.loads(meta.get("pop_half_lives_s", "null"))
        if self.pop_half_lives_s is None and json.loads(meta.get("pop_half_life_s", "null")) is not None:
            self.pop_half_lives_s = [json.loads(meta["pop_half_life_s"])]  # exported before the speeds: one
        self.pop_memory_events = float(json.loads(meta.get("pop_memory_events", "1")))
        self.user0 = np.asarray(json.loads(meta["user0"]), dtype=np.float32)
        # How the graph's association level is read (half-lives, window, position decay, the
        # user rows' latest items); None: the model has none (or was exported before it).
        self.association: dict | None = json.loads(meta.get("association", "null"))
        if self.association is not None and "assoc_ids" not in self.inputs:
            self.association = None
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        log.info("model %s: %d items, execution provider %s", path, len(self.item_ids), self.provider)

    def misfit(self, current: Ranker) -> str | None:
        """Why this model cannot replace ``current`` (None: it can). The online store holds
        vectors of the current dimension and item indices of the current table."""
        if self.inputs != current.inputs:
            return f"inputs {self.inputs} differ from the served model's {current.inputs}"
        if self.user0.shape != current.user0.shape:
            return f"user vectors of {self.user0.shape[0]} dims, the online store holds {current.user0.shape[0]}"
        shared = min(len(self.item_ids), len(current.item_ids))
        if self.item_ids[:shared] != current.item_ids[:shared]:
            return "its item table is not an extension or a prefix of the served one (indices would change meaning)"
        return None

    def latest(self, masked: list[int], events: int) -> list[int]:
        """The user's latest items, oldest first, from their pushed row: it lists them first
        (``min(events, recent_items)`` of them), then the items they turned down."""
        return list(masked[:min(events, self.association["recent_items"])]) if self.association else []

    def no_association(self, n_items: int) -> dict[str, np.ndarray]:
        """The graph's association inputs for a read of nothing: no vote for any item."""
        return no_entries(n_items, len(self.association["half_lives_s"]))

    def top(self, user: np.ndarray, absent_s: float, population: np.ndarray, seen: list[int], exclude: list[str],
            k: int, online_items: list[str] = (), association: dict[str, np.ndarray] | None = None
            ) -> list[tuple[str, float]]:
        """``absent_s``: seconds from the user's latest event to the stream's clock (their
        personal score fades with it); ``population``: item counts over the model's table and
        then ``online_items``, the catalogue's items first seen on the stream; ``seen``: item
        indices from the stream worker, in that same numbering; ``exclude``: item ids from
        the request.

        Items first seen online have no slow-level embedding yet: the graph scores them
        (input ``extra``) as the model does an item past its table (`NestedModel.all_items`);
        the two ranked lists merge by score. ``association``: the association level's read
        (`serving.association.AssociationTables.entries`, over the table's and ``online_items``),
        for a model that has the level; None: no vote."""
        n = len(self.item_ids)
        mask = np.zeros((1, n), dtype=bool)
        mask[0, [i for i in seen if 0 <= i < n]] = True
        mask[0, [self.index[i] for i in exclude if i in self.index]] = True
        extra_counts = np.ascontiguousarray(population[n:n + len(online_items)], dtype=np.float32)
        inputs = {"user": user.reshape(1, -1).astype(np.float32, copy=False),
                  "absent_s": np.array([absent_s], dtype=np.float32), "population": population[:n], "exclude": mask,
                  "extra": extra_counts}
        if self.association is not None:
            inputs |= association if association is not None else self.no_association(n + len(online_items))
        scores, items, extra_scores = self.session.run(None, inputs)
        ranked = [(self.item_ids[i], float(s)) for i, s in zip(items[0, :k], scores[0, :k]) if np.isfinite(s)]
        if len(online_items):
            extra = extra_scores[0]
            hidden = {i - n for i in seen if i >= n} | {j for j, item in enumerate(online_items) if item in exclude}
            best = [j for j in np.argsort(-extra, kind="stable")[:k + len(hidden)] if j not in hidden][:k]
            ranked = sorted(ranked + [(online_items[j], float(extra[j])) for j in best], key=lambda r: -r[1])[:k]
        return ranked
