"""The nested model behind the replay interface (offline_eval/replay.py): fit trains it on
the history and writes the history into its fast state; score and update are then the
online API, as the stream worker uses it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recsys.nested_model import (POPULATION_CLOCK, NestedConfig, NestedModel, load_state, population_defaults,
                                 save_state)
from recsys.train import TrainConfig, train_nested


class NestedReplay:
    """The nested model behind the replay interface: fit = train + write the history into
    the fast state; then score/update are the online API."""

    def __init__(self, use_fast: bool = True, train_cfg: TrainConfig = TrainConfig(progress=False),
                 population_clock: str = POPULATION_CLOCK, **levels):
        """``levels``: NestedConfig switches for ablations (``user_fast=False``, …)."""
        self.use_fast, self.train_cfg, self.levels = use_fast, train_cfg, levels
        self.population_clock = population_clock
        self.model: NestedModel | None = None
        self.state = None
        self.applied = None  # the batch score_fresh has applied already
        self.fit_seconds: float | None = None  # set by whoever fitted it outside the replay (`recsys train`)

    def fit(self, history) -> None:
        model_cfg = NestedConfig(n_items=history.n_items_known, use_fast=self.use_fast, **self.levels,
                                 **population_defaults(history.n_events, history.ts, self.population_clock))
        self.model, self.state = train_nested(history, model_cfg, self.train_cfg)

    def describe(self) -> dict:
        """What the fit chose: the mix of the population and personal levels calibrated on the history."""
        m = self.model
        share, weight, fade = (float(t.detach()) for t in (m.pop_share, m.pop_weight, m.fade))
        form = f"mixed in probability, population share {share:g}" if share else "additive"
        return {"population_weight": round(weight, 6), "fade": fade, "population_share": share,
                "summary": f"the mix calibrated on the history's tail is {form}, population weight "
                           f"{weight:.3f}, fade {fade:g}"}

    # -- the replay's fit cache (offline_eval/fit_cache.py) -----------------------------------
    def fit_key(self) -> str:
        return repr((self.use_fast, sorted(self.levels.items()), replace(self.train_cfg, progress=False),
                     self.population_clock))

    def save_fit(self, folder: Path) -> None:
        self.model.save(folder / "model.safetensors")
        save_state(self.state, folder / "state.safetensors")  # the fast levels after the history

    def load_fit(self, folder: Path) -> None:
        self.model = NestedModel.load(folder / "model.safetensors").eval()
        self.state = load_state(folder / "state.safetensors")

    def score(self, users: torch.Tensor, n_items: int) -> torch.Tensor:
        self.state = self.model.grow_state(self.state, int(users.max()) + 1, n_items)
        return self.model.score(self.state, users, n_items)

    def score_fresh(self, batch, n_items: int) -> torch.Tensor:
        """Each event from its user's vector after their earlier events of the batch. That takes
        the batch's recurrence, so it is applied here; ``update`` with this batch then has
        nothing left to do. Global state (population, clock) stays as at the batch start."""
        users = torch.from_numpy(batch.users)
        self.state = self.model.grow_state(self.state, int(users.max()) + 1, n_items)
        clock, pop = self.state.clock(), self.model.population_counts(self.state.pop)
        self.state, reads = self.model.update_reading(self.state, users, torch.from_numpy(batch.items),
                                                      torch.from_numpy(batch.ts))
        self.applied = batch
        return self.model.score_users(reads.z, clock - reads.last_ts, pop, n_items)

    def update(self, batch) -> None:
        if batch is self.applied:  # score_fresh applied it already
            self.applied = None
            return
        self.state = self.model.update(self.state, torch.from_numpy(batch.users), torch.from_numpy(batch.items),
                                       torch.from_numpy(batch.ts))
