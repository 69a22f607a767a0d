"""Which group trains at a given step: a pure function of (global_step, seed), so resumes continue exactly."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed derived from (seed, step), stable across processes and Python versions."""
    return _splitmix64(_splitmix64(seed & _MASK) ^ (step & _MASK)) >> 1


class Schedule(ABC):
    """Maps an optimizer step to the group trained at that step."""

    #: True when a group trains for a run of consecutive steps (then inactive groups never come back)
    phased: bool = False

    def __init__(self, num_groups: int, groups: Sequence[int] | None = None) -> None:
        self.num_groups = num_groups
        self.groups = list(range(num_groups)) if groups is None else sorted(set(groups))
        if not self.groups:
            raise ValueError("groups_to_train is empty; name at least one group to train.")
        bad = [g for g in self.groups if not 0 <= g < num_groups]
        if bad:
            raise ValueError(f"groups_to_train has {bad}, outside [0, {num_groups}); groups are numbered from 0.")

    @abstractmethod
    def group_at(self, step: int) -> int:
        """The group trained at optimizer step ``step``."""

    def total_steps(self) -> int | None:
        """Steps after which the schedule has nothing left to train (None: unbounded)."""
        return None

    def expected_steps(self, total_steps: float) -> float:
        """How many optimizer steps each trained group gets in ``total_steps`` steps (its LR horizon)."""
        return total_steps / len(self.groups)

    def config(self) -> dict[str, Any]:
        """The schedule as plain data, for a run's logged hyper-parameters."""
        return {"name": type(self).__name__, "groups": list(self.groups)}


class RandomSchedule(Schedule):
    """The paper's schedule: one group drawn uniformly at random per step, shared by the whole batch."""

    def __init__(self, num_groups: int, seed: int = 0, groups: Sequence[int] | None = None) -> None:
        super().__init__(num_groups, groups)
        self.seed = seed

    def group_at(self, step: int) -> int:
        return self.groups[step_seed(self.seed, step) % len(self.groups)]

    def config(self) -> dict[str, Any]:
        return {**super().config(), "seed": self.seed}


class SequentialSchedule(Schedule):
    """Phases: the first group for ``steps_per_phase`` steps, then the next, … (group 0 first)."""

    phased = True

    def __init__(self, num_groups: int, steps_per_phase: int, groups: Sequence[int] | None = None) -> None:
        super().__init__(num_groups, groups)
        if steps_per_phase < 1:
            raise ValueError(f"steps_per_phase must be >= 1, got {steps_per_phase}.")
        self.steps_per_phase = steps_per_phase

    def group_at(self, step: int) -> int:
        return self.groups[min(step // self.steps_per_phase, len(self.groups) - 1)]

    def total_steps(self) -> int:
        return self.steps_per_phase * len(self.groups)

    def expected_steps(self, total_steps: float) -> float:
        return float(self.steps_per_phase)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps_per_phase": self.steps_per_phase}
