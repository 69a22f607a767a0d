"""What a task is: the clean target, how it is corrupted, the per-sample loss, and how to sample."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.noise import EDM, NoiseSchedule

#: ``run(*inputs)`` calls the network (one group of it, or all of it) on the task's inputs.
Runner = Callable[..., Any]
#: ``run_group(g)`` is the runner of group g (None: the whole network, for end-to-end models).
GroupRunner = Callable[[int | None], Runner]
#: ``group_of(levels)`` gives the owning group of each noise level, or None for end-to-end models.
GroupOf = Callable[[Tensor], Tensor | None]


def runner_at(run_group: GroupRunner, group_of: GroupOf, level: float) -> Runner:
    """The runner of the group owning noise level ``level``, looked up in float64 so grid points that sit
    exactly on a boundary route as documented."""
    groups = group_of(torch.tensor([level], dtype=torch.float64))
    return run_group(None if groups is None else int(groups[0]))


class Task(ABC):
    """One DiffusionBlocks formulation (image generation, classification, language modelling, …)."""

    def __init__(self, noise: NoiseSchedule = EDM) -> None:
        self.noise = noise

    @abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Number of samples in ``batch``."""

    @abstractmethod
    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample weighted loss, shape (N,), for noise levels ``sigma`` (N,).

        All randomness comes from ``generator`` so that a step is a pure function of (seed, step).
        """
