"""ONNX export of the scoring graph, checked against torch.

The graph: user vector (the fast levels' read, pushed to Feast by the stream worker)
→ scores over the catalogue (item embeddings and biases of the slow level, plus the
population level's term) → seen/excluded items masked → top ``K_MAX``.

Item embeddings and biases are **initializers**: they change only when the slow level
is retrained, which produces a new model file that the server hot-swaps; baking them
in lets ONNX Runtime fold and place them once, and keeps each request's input to a
few hundred bytes. The population level's item counts are an **input**: they move with
every micro-batch, far faster than any model file; serving sums the partitions' partial
counts (metadata ``pop_half_lives_s``: how each speed decays to one time), reads them as
the model does (``pop_memory_events``: `read_speeds`) and the graph turns the read counts
into the population term with the model's own weight. Items first seen on the stream are
past the table: their counts come as a second input (``extra``, any length, 0 included),
the graph scores them as the model scores an item it has no embedding for, and returns
their scores for the server to merge (a mixed score's softmax runs over them too).

    >>> export_onnx(Path("runs/model/model.safetensors"), Path("runs/model/model.onnx"))
    ExportCheck(max_abs_diff=2.4e-07, ...)
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from recsys.association import speed_shares, vote
from recsys.nested import NestedModel, load_item_ids, model_config, population_term, score_items, trust

K_MAX = 100  # the graph returns the top 100; the API slices to the requested k


class AssociationRead(NamedTuple):
    """How a model with an association level reads it (`recsys.association.vote`)."""

    weight: torch.Tensor  # () its votes' weight in the personal part
    discount: torch.Tensor  # () the popularity discount
    shares: torch.Tensor  # (V,) each speed's share of the vote


ASSOCIATION_INPUTS = ("assoc_ids", "assoc_weights", "assoc_out", "assoc_position", "assoc_into")


class Scorer(nn.Module):
    def __init__(self, item_embeddings: torch.Tensor, item_bias: torch.Tensor, fade: torch.Tensor,
                 pop_weight: torch.Tensor | None = None, share: torch.Tensor | None = None,
                 association: AssociationRead | None = None):
        super().__init__()
        weight = torch.zeros(()) if pop_weight is None else pop_weight.detach().float().clone().reshape(())
        self.register_buffer("pop_weight", weight)  # () the population term's weight
        self.register_buffer("E", item_embeddings.detach().float().clone())  # (N, D)
        self.register_buffer("b", item_bias.detach().float().clone())  # (N,)
        self.register_buffer("fade", fade.detach().float().clone())  # ()
        self.share = None if share is None else share.detach().float().clone()  # the mixture's π; None: additive
        self.association = None if association is None else AssociationRead(
            *(t.detach().float().clone() for t in association))

    def forward(self, user: torch.Tensor, absent_s: torch.Tensor, population: torch.Tensor, exclude: torch.Tensor,
                extra: torch.Tensor, *association: torch.Tensor):
        """user (B, D), absent_s (B,) seconds since the user's latest event (by the stream's
        clock), population (N,) item counts, exclude (B, N) bool, extra (M,) counts of the items
        past the table, and with an association level its read's entries (`ASSOCIATION_INPUTS`,
        as `recsys.association.entries` gathers them, over N + M items) → top-K values and
        indices of the table's items, and (B, M) the extra items' scores."""
        N = self.E.shape[0]
        scores = self.scores(user, absent_s, population, exclude, extra, *association)
        top = torch.topk(scores[:, :N], min(K_MAX, N), dim=1)
        return top.values, top.indices, scores[:, N:]

    def scores(self, user, absent_s, population, exclude, extra, *association) -> torch.Tensor:
        """(B, N + M) every item's score, the table's excluded ones -inf. The extra items score
        as `NestedModel.all_items` has them: no embedding, the mean bias."""
        cold = extra.unsqueeze(1) * torch.zeros(self.E.shape[1])  # (M, D) zeros, as long as the input
        E, b = torch.cat([self.E, cold]), torch.cat([self.b, extra * 0 + self.b.mean()])
        term = population_term(torch.cat([population, extra]), self.pop_weight)
        votes = None
        if self.association is not None:
            ids, weights, out, position, into = association
            read = self.association
            votes = read.weight * vote(ids, weights, out, position, into, read.shares, read.discount)
        scores = score_items(user, E, b, term, trust(absent_s, self.fade), self.share, votes)
        N = self.E.shape[0]
        return torch.cat([scores[:, :N].masked_fill(exclude, float("-inf")), scores[:, N:]], 1)

    def input_names(self) -> list[str]:
        return ["user", "absent_s", "population", "exclude", "extra",
                *(ASSOCIATION_INPUTS if self.association is not None else ())]


@dataclass(frozen=True)
class ExportCheck:
    max_abs_diff: float  # top-K values, ONNX Runtime vs torch, over random valid inputs
    same_items: bool  # ONNX Runtime's top-K items are a torch top-K (where items tie, either order)
    n_items: int
    path: Path


def scorer_from_model(model_file: Path) -> tuple[Scorer, list[str], torch.Tensor]:
    """The scorer, the external id of each item row, and the population user vector."""
    model = NestedModel.load(model_file).float().eval()
    E, b = model.all_items(model.n_items)
    read = None
    if model.cfg.association:
        read = AssociationRead(model.assoc_weight, model.assoc_discount,
                               speed_shares(len(model.cfg.assoc_half_lives_s), float(model.assoc_fast_share)))
    scorer = Scorer(E, b, model.fade, model.population_weight(), model.mixture_share(), read)
    return scorer, load_item_ids(model_file), model.user0.detach().float().clone()


def export_onnx(model_file: Path, out: Path, seed: int = 0) -> ExportCheck:
    import onnx

    scorer, item_ids, user0 = scorer_from_model(model_file)
    write_graph(scorer, out)
    proto = onnx.load(str(out))
    cfg = model_config(model_file)
    for key, value in {"item_ids": json.dumps(item_ids), "user0": json.dumps(user0.tolist()),
                       "source_model": str(model_file), "pop_half_lives_s": json.dumps(cfg.pop_half_lives()),
                       "pop_memory_events": json.dumps(cfg.pop_memory()),
                       "association": json.dumps({"half_lives_s": cfg.assoc_half_lives_s, "window": cfg.assoc_window,
                                                  "position_decay": cfg.assoc_position_decay,
                                                  "recent_items": cfg.recent_items}
                                                 if cfg.association else None)}.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    return check_export(scorer, out, torch.Generator().manual_seed(seed))


def write_graph(scorer: Scorer, out: Path) -> Path:
    N, D = scorer.E.shape
    example = (torch.randn(2, D), torch.zeros(2), torch.zeros(N), torch.zeros(2, N, dtype=torch.bool), torch.zeros(3))
    axes = {"user": {0: "batch"}, "absent_s": {0: "batch"}, "exclude": {0: "batch"}, "extra": {0: "online"},
            "extra_scores": {0: "batch", 1: "online"}}
    if scorer.association is not None:
        example += association_example(2, 5, len(scorer.association.shares), N + 3, torch.Generator().manual_seed(0))
        axes |= {"assoc_ids": {0: "batch", 1: "entries"}, "assoc_weights": {0: "batch", 1: "entries"},
                 "assoc_out": {0: "batch", 1: "entries"}, "assoc_position": {0: "batch", 1: "entries"},
                 "assoc_into": {0: "items"}}
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tracer's note on topk's k: fixed by design (the catalogue size)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(scorer, example, str(out), input_names=scorer.input_names(),
                          output_names=["scores", "items", "extra_scores"], dynamic_axes=axes, dynamo=False)
    return out


def association_example(B: int, L: int, V: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random valid association entries: successors among ``n`` items (some none), weights, the
    sources' outgoing weights above them, positions in (0, 1] (some 0), incoming weights."""
    ids = torch.randint(-1, n, (B, L), generator=g)
    weights = torch.rand(B, L, V, generator=g)
    out = weights + torch.rand(B, L, V, generator=g) * 3
    position = torch.rand(B, L, generator=g) * (torch.rand(B, L, generator=g) > 0.2)
    into = torch.rand(n, V, generator=g) * 5
    return ids, weights, out, position, into


def check_export(scorer: Scorer, path: Path, g: torch.Generator, batches=(1, 7, 64), tol: float = 1e-4) -> ExportCheck:
    """Random valid inputs: user vectors at the trained scale, absences from none to months,
    population counts, a sparse mask, none or a few items past the table. Items are compared
    by score, not by index: where two items tie, either may come first (torch and ONNX
    Runtime break ties differently)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    N, D = scorer.E.shape
    worst, same = 0.0, True
    for B, M in zip(batches, (0, 3, 0)):
        user = torch.randn(B, D, generator=g) * scorer.E.std()
        absent_s = torch.rand(B, generator=g) * 90 * 86400
        population = torch.rand(N, generator=g) * 100
        exclude = torch.rand(B, N, generator=g) < 0.05
        extra = torch.rand(M, generator=g) * 100
        inputs = (user, absent_s, population, exclude, extra)
        if scorer.association is not None:
            inputs += association_example(B, 40, len(scorer.association.shares), N + M, g)
        with torch.no_grad():
            want_v, _, want_extra = scorer(*inputs)
            every = scorer.scores(*inputs).numpy()
        got_v, got_i, got_extra = session.run(None, {name: t.numpy() for name, t in zip(scorer.input_names(), inputs)})
        want_v = want_v.numpy()
        finite = np.isfinite(want_v)  # masked items can reach the top-K of a small catalogue: -inf on both sides
        worst = max(worst, float(np.abs(got_v[finite] - want_v[finite]).max()),
                    float(np.abs(got_extra - want_extra.numpy()).max(initial=0.0)))
        picked = np.take_along_axis(every, got_i, axis=1)  # what torch scores the items ONNX Runtime chose
        same = (same and bool((np.isfinite(got_v) == finite).all())
                and bool((np.abs(picked[finite] - want_v[finite]) <= tol).all()))
    return ExportCheck(worst, same, N, path)
