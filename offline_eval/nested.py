"""The nested model behind the replay interface (offline_eval/replay.py): fit trains it on
the history and writes the history into its fast state; score and update are then the
online API, as the stream worker uses it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from recsys.association import association_defaults
from recsys.nested import negative
from recsys.nested import (POPULATION_CLOCK, NestedConfig, NestedModel, load_state, population_defaults,
                                 save_state)
from recsys.train import TrainConfig, train_nested


class NestedReplay:
    """The nested model behind the replay interface: fit = train + write the history into
    the fast state; then score/update are the online API."""

    def __init__(self, use_fast: bool = True, train_cfg: TrainConfig = TrainConfig(progress=False),
                 population_clock: str = POPULATION_CLOCK, association: bool = True, feedback: str = "kinds",
                 **levels):
        """``levels``: NestedConfig switches for ablations (``user_fast=False``, …);
        ``association``: with the population association level (`recsys.association`; False:
        its ablation);
        ``feedback``: ``"kinds"`` reads each event's kind, ``"views"`` takes every event for a
        view (the ablation of kinds; `EncodedLog.revealed`)."""
        self.use_fast, self.train_cfg, self.levels, self.feedback = use_fast, train_cfg, levels, feedback
        self.population_clock = population_clock
        self.association = association and use_fast
        self.model: NestedModel | None = None
        self.state = None
        self.applied = None  # the batch score_fresh has applied already
        self.fit_seconds: float | None = None  # set by whoever fitted it outside the replay (`recsys train`)

    def fit(self, history) -> None:
        population = population_defaults(history.n_events, history.ts, self.population_clock)
        if self.association:  # its speeds from the population level's memory in seconds
            base = population.get("pop_half_life_s") or population_defaults(history.n_events, history.ts,
                                                                             "time")["pop_half_life_s"]
            population["assoc_half_lives_s"] = association_defaults(base).half_lives_s
        model_cfg = NestedConfig(n_items=history.n_items_known, use_fast=self.use_fast, **self.levels, **population)
        self.model, self.state = train_nested(history, model_cfg, self.train_cfg)

    def describe(self) -> dict:
        """What the fit chose: the mix of the population and personal levels calibrated on the history."""
        m = self.model
        share, weight, fade = (float(t.detach()) for t in (m.pop_share, m.pop_weight, m.fade))
        form = f"mixed in probability, population share {share:g}" if share else "additive"
        out = {"population_weight": round(weight, 6), "fade": fade, "population_share": share,
               "summary": f"the mix calibrated on the history's tail is {form}, population weight "
                          f"{weight:.3f}, fade {fade:g}"}
        if self.model.cfg.association:
            out |= {"association_weight": float(m.assoc_weight), "association_discount": float(m.assoc_discount),
                    "association_fast_share": float(m.assoc_fast_share),
                    "association_half_lives_s": list(m.cfg.assoc_half_lives_s)}
            out["summary"] += (f"; association votes weigh {float(m.assoc_weight):g} (popularity discount "
                               f"{float(m.assoc_discount):g}, fast share {float(m.assoc_fast_share):g})")
        return out

    # -- the replay's fit cache (offline_eval/fit_cache.py) -----------------------------------
    def fit_key(self) -> str:
        return repr((self.use_fast, sorted(self.levels.items()), replace(self.train_cfg, progress=False),
                     self.population_clock) + ((("association", True),) if self.association else ())
                    + ((("feedback", self.feedback),) if self.feedback != "kinds" else ()))

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
        nothing left to do. Global state (population, association, clock) stays as at the batch start."""
        users, items, ts = (torch.from_numpy(a) for a in (batch.users, batch.items, batch.ts))
        weight = None if batch.weight is None else torch.from_numpy(batch.weight)
        self.state = self.model.grow_state(self.state, int(users.max()) + 1, n_items)
        clock, pop = self.state.clock(), self.model.population_counts(self.state.level_counts())
        held = self.state.turned_down(users, ts, self.model.cfg.impression_window_s)  # at the batch start; its own below
        before = self.model.before_each(self.state, users, items, weight)  # before the update writes the rows
        votes = None if before is None else self.model.votes(self.state, before, n_items)
        self.state, reads = self.model.update_reading(self.state, users, items, ts, donate=True, weight=weight)
        self.applied = batch
        scores = self.model.score_users(reads.z, clock - reads.last_ts, pop, n_items, votes)
        return negative.masked_before_each(scores, held, users, items, ts, weight, self.model.cfg.impression_window_s)

    def update(self, batch) -> None:
        if batch is self.applied:  # score_fresh applied it already
            self.applied = None
            return
        users, items, ts = (torch.from_numpy(a) for a in (batch.users, batch.items, batch.ts))
        self.state = self.model.grow_state(self.state, int(users.max()) + 1, int(items.max()) + 1)
        weight = None if batch.weight is None else torch.from_numpy(batch.weight)
        self.state = self.model.update(self.state, users, items, ts, donate=True, weight=weight)
