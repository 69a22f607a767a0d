"""The router a task's inference is given: noise level → the callable that runs the group owning it.

A block-wise model routes every level to the one group trained on it; an end-to-end model is a router
with one entry (the whole network serves every level). Tasks only ever ask the router, so they never
need to know how the model was trained.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

#: ``run(*inputs)`` calls the network (one group of it, or all of it) on the task's inputs.
Runner = Callable[..., Any]


class LevelRouting(Protocol):
    """What a noise schedule offers the router: the owning group of each level, given the boundaries."""

    def group_of(self, level: Tensor, boundaries: Tensor) -> Tensor: ...


class Router:
    """Maps noise levels to the runner of the group that owns them.

    Args:
        run_group: ``run_group(g)`` is the runner of group ``g`` (``None``: the whole network).
        routing: the task's noise schedule (it knows how its levels map to groups).
        boundaries: the B+1 ascending boundaries of a block-wise model; ``None`` for an end-to-end model.
        device: where inputs built by the task (noise, grids) should live.
    """

    def __init__(
        self,
        run_group: Callable[[int | None], Runner],
        routing: LevelRouting,
        boundaries: Tensor | None,
        device: torch.device | str = "cpu",
    ) -> None:
        self._run_group = run_group
        self._routing = routing
        self.boundaries = boundaries
        self.device = torch.device(device)

    @property
    def blockwise(self) -> bool:
        """True when levels are served by their own groups (False: one network serves every level)."""
        return self.boundaries is not None

    @property
    def num_groups(self) -> int:
        """B of a block-wise model, 1 for an end-to-end model (one entry)."""
        return 1 if self.boundaries is None else len(self.boundaries) - 1

    def group_of(self, levels: Tensor) -> Tensor | None:
        """The owning group of each level (``None`` for an end-to-end model)."""
        if self.boundaries is None:
            return None
        return self._routing.group_of(levels, self.boundaries)

    def group_at(self, level: float) -> int | None:
        """The group owning ``level``, looked up in float64 so grid points on a boundary route as documented."""
        groups = self.group_of(torch.tensor([level], dtype=torch.float64))
        return None if groups is None else int(groups[0])

    def group(self, group: int | None) -> Runner:
        """The runner of ``group`` (``None``: the whole network)."""
        return self._run_group(group)

    def at(self, level: float) -> Runner:
        """The runner of the group owning noise level ``level``."""
        return self._run_group(self.group_at(level))

    def split(self, levels: Tensor) -> Iterator[tuple[Tensor | slice, Runner]]:
        """For per-sample levels: ``(rows, runner)`` pairs, each runner serving the rows whose level it owns."""
        groups = self.group_of(levels)
        if groups is None:
            yield slice(None), self._run_group(None)
            return
        for g in groups.unique().tolist():
            yield groups == g, self._run_group(int(g))


__all__ = ["LevelRouting", "Router", "Runner"]
