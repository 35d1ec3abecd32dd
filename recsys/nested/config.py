"""The nested model's configuration: sizes, the levels' rates, and the ablation switches."""

from __future__ import annotations

from dataclasses import dataclass

from recsys.association import AssociationConfig


@dataclass(frozen=True)
class NestedConfig:
    n_items: int = 1000  # items in the slow level's table (known at training time)
    dim: int = 64  # D
    mem_dim: int = 32  # m
    c_mid: int = 8  # user-mid level: update every c_mid of the user's events
    c_pop: int = 1000  # population level: update every c_pop global events
    pop_half_life: float = 8000.0  # population counts halve every this many events (time clock: the memory read)
    # Set: the population level decays by event time instead (counts halve every this many
    # seconds), so partial levels of any split of the stream (a worker group's partitions)
    # add up exactly to the whole; c_pop is then unused.
    pop_half_life_s: float | None = None
    # With a time clock, the level runs at several speeds (CMS): one count vector per half-life
    # pop_half_life_s × speed, all time-decayed (so splits still add up exactly). Reading takes
    # the speed whose counts hold about pop_read × pop_half_life events' worth (`read_speeds`), so
    # the memory stays near that many events when the stream's rate drifts from the history's.
    pop_speeds: tuple[float, ...] = (1 / 32, 1 / 16, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
    # The memory the score reads, as a share of pop_half_life events' worth: chosen on the
    # histories' own 80/20 replays (docs/model.md). The fastest speed (1/32) keeps the ¼ read
    # from clamping on a stream up to 8× faster than the history's end.
    pop_read: float = 0.25
    recent_items: int = 50  # the user's latest items, kept so serving can mask what was just seen
    # The latest items a user gave negative feedback on (`recsys.feedback`), masked for them
    # from then on; a user who said no to more than this sees the oldest ones again.
    negative_items: int = 256
    # The latest impressions a user ignored (shown, nothing done: `recsys.feedback`), kept out of
    # their lists for impression_window_s after each (an item they take is masked as seen anyway).
    # A day: the convention of "not again today"; tuned on no log.
    shown_items: int = 32
    impression_window_s: float = 86400.0
    # The user's latest items read through the slow level's successor table ("what follows
    # these, across everyone"): the fresh-user signal a live stream is about. 0: off.
    sequence_items: int = 8
    # The population association level (`recsys.association`): what follows what, learned online
    # from every event at one speed per half-life (seconds). Empty: the model has no such level
    # (model files before it). Its read's popularity discount and fast share are calibrated on the
    # history's tail (the model's buffers), its window, slots and position decay are these.
    assoc_half_lives_s: tuple[float, ...] = ()
    assoc_slots: int = AssociationConfig.slots
    assoc_window: int = AssociationConfig.window
    assoc_position_decay: float = AssociationConfig.position_decay
    use_fast: bool = True  # False: the `nested_slow_only` ablation
    # False: the slow level learns no item bias and no population vector (both stay zero);
    # popularity comes from the population-fast level alone. A bias fit on the whole history
    # knows each item's later popularity at every training position; the model would learn
    # to trust it, and it is stale on the stream (docs/model.md).
    static_popularity: bool = False
    # Ablations, each a level switched off (trained and replayed without it): the user-fast
    # memory, the user-mid adapter, the population level (its popularity then comes from a
    # learned static item bias, as in the slow-only ablation).
    user_fast: bool = True
    user_mid: bool = True
    population: bool = True

    def __post_init__(self) -> None:
        if min(self.n_items, self.dim, self.mem_dim, self.c_mid, self.c_pop) <= 0:
            raise ValueError(f"NestedConfig sizes must be positive: {self}")
        if not 0 <= self.sequence_items <= self.recent_items:
            raise ValueError(f"sequence_items must be in [0, recent_items={self.recent_items}]: {self}")
        object.__setattr__(self, "pop_speeds", tuple(float(s) for s in self.pop_speeds))  # JSON gives a list
        object.__setattr__(self, "assoc_half_lives_s", tuple(float(h) for h in self.assoc_half_lives_s))
        if self.assoc_half_lives_s and not 1 <= self.assoc_window <= self.recent_items:
            raise ValueError(f"assoc_window must be in [1, recent_items={self.recent_items}]: {self}")
        if not self.pop_speeds or list(self.pop_speeds) != sorted(set(self.pop_speeds)) or self.pop_speeds[0] <= 0:
            raise ValueError(f"pop_speeds must be positive and increasing: {self}")
        if self.pop_read <= 0:
            raise ValueError(f"pop_read must be positive: {self}")

    def pop_half_lives(self) -> tuple[float, ...] | None:
        """The time-decayed population speeds' half-lives in seconds; None: one level on the event clock."""
        if self.pop_half_life_s is None:
            return None
        return tuple(self.pop_half_life_s * s for s in self.pop_speeds)

    def pop_memory(self) -> float:
        """The events' worth of counts the population score reads (time clock, `read_speeds`)."""
        return self.pop_half_life * self.pop_read

    @property
    def association(self) -> bool:
        """Whether the model keeps the population association level."""
        return bool(self.assoc_half_lives_s) and self.use_fast

    def association_config(self, discount: float, fast_share: float) -> AssociationConfig:
        """The association level's config, with the read's calibrated ``discount`` and ``fast_share``."""
        return AssociationConfig(self.assoc_slots, self.assoc_window, self.assoc_position_decay,
                                 self.assoc_half_lives_s, discount, fast_share)

    def pop_levels(self) -> int:
        """Count vectors the population level keeps per item (its speeds)."""
        return 1 if self.pop_half_life_s is None else len(self.pop_speeds)
