"""Data-parallel DiffusionBlocks on Lightning's DDP: every process trains the same group each step.

``Trainer(strategy="diffusionblocks_ddp", devices=N, num_nodes=M)`` (or under ``torchrun``/SLURM, through
Lightning's cluster environments) trains exactly the single-device schedule with an N·M× larger global
batch: the step's group is a function of ``(seed, step)``, the same on every rank. The model is not
wrapped in ``DistributedDataParallel`` (its reducer expects the same parameters to get gradients every
step, and here they change with the group): after the backward pass only the active group's gradients
are all-reduced, as one flat bucket, so inactive groups stay bit-identical and replicas stay identical.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from typing_extensions import override

from lightning_diffusionblocks.planning import GroupPlanning, ScheduleSpec


class DiffusionBlocksDDPStrategy(GroupPlanning, DDPStrategy):
    """Every process trains the step's group on its own shard of the batch; only that group's gradients
    are averaged (see :class:`~lightning_diffusionblocks.planning.GroupPlanning` for the schedule arguments;
    the rest go to :class:`~lightning.pytorch.strategies.DDPStrategy`, e.g. ``start_method="spawn"``,
    ``process_group_backend="gloo"``)."""

    strategy_name = "diffusionblocks_ddp"

    def __init__(
        self,
        schedule: ScheduleSpec = "random",
        steps_per_phase: int | None = None,
        groups_to_train: Sequence[int] | None = None,
        seed: int | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        for option in ("find_unused_parameters", "static_graph"):
            if ddp_kwargs.get(option):
                raise MisconfigurationException(
                    f"{option}=True does not apply: {type(self).__name__} does not wrap the model in"
                    " DistributedDataParallel; it all-reduces only the active group's gradients itself."
                )
        super().__init__(**ddp_kwargs)
        self._init_planning(schedule, steps_per_phase, groups_to_train, seed)
        #: bytes this process all-reduced for gradients, and the seconds it spent doing so (for benchmarks)
        self.bytes_reduced = 0
        self.seconds_reduced = 0.0

    @property
    def gradient_group(self) -> Any:
        """The process group whose members train the same group as this process (None: the whole world)."""
        return None

    @property
    def gradient_group_size(self) -> int:
        return self.world_size

    @override
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper: :meth:`reduce_gradients` averages the active group's gradients."""

    @override
    def reduce_gradients(self, params: list[Tensor]) -> None:
        size = self.gradient_group_size
        if size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        start = time.perf_counter()
        flat = _flatten_dense_tensors([p.grad for p in with_grad])
        dist.all_reduce(flat, group=self.gradient_group)
        flat.div_(size)
        self.bytes_reduced += flat.numel() * flat.element_size()
        self.seconds_reduced += time.perf_counter() - start
        for p, synced in zip(with_grad, _unflatten_dense_tensors(flat, [p.grad for p in with_grad])):
            p.grad.copy_(synced)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DiffusionBlocks, data parallel (DDP)")
        strategy_registry.register(
            cls.strategy_name + "_spawn", cls, description="DiffusionBlocks, data parallel, spawned processes",
            start_method="spawn",
        )  # fmt: skip


def broadcast_tensors(tensors: list[Tensor], src: int, device: torch.device, group: Any = None) -> None:
    """Broadcast ``tensors`` from global rank ``src`` in one flat bucket (on ``device``) and copy them in place."""
    if not tensors:
        return
    flat = _flatten_dense_tensors([t.detach().to(device) for t in tensors])
    dist.broadcast(flat, src=src, group=group)
    for t, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
        t.data.copy_(value)
