"""The single-device DiffusionBlocks strategy: builds the schedule that picks the group each step trains.

``Trainer(strategy="diffusionblocks")`` works once ``lightning_diffusionblocks`` is imported. The
strategy hands the module its schedule (:meth:`DiffusionBlocksModule.use_schedule`); the module never
asks which strategy trains it. The group of a step is a pure function of ``(seed, step)`` (see
:mod:`schedules`), counted in the module's own steps, so a resumed run continues exactly and a second
fit continues rather than replaying the first one's noise. For several devices or nodes see
:class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy` and
:class:`~lightning_diffusionblocks.block_parallel.BlockParallelStrategy`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_diffusionblocks.planning import GroupOffloader, GroupPlanning, ScheduleSpec

__all__ = ["DiffusionBlocksStrategy", "GroupOffloader"]

MULTI_PROCESS_HINT = (
    " For several devices or nodes use strategy='diffusionblocks_ddp' (data parallel: every process trains the"
    " same group on its own shard of the batch) or strategy='diffusionblocks_block_parallel' (each process trains"
    " its own group, no traffic between groups)."
)


class DiffusionBlocksStrategy(GroupPlanning, SingleDeviceStrategy):
    """Train a :class:`DiffusionBlocksModule` one block group per step on one device (see :class:`GroupPlanning`
    for the arguments)."""

    strategy_name = "diffusionblocks"

    def __init__(
        self,
        schedule: ScheduleSpec = "random",
        steps_per_phase: int | None = None,
        groups_to_train: Sequence[int] | None = None,
        seed: int | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device="cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._init_planning(schedule, steps_per_phase, groups_to_train, seed)
        self._parallel_devices: list[torch.device] | None = None

    # ------------------------------------------------------------------ devices
    # The accelerator connector only hands devices to strategies with `parallel_devices`; without it a
    # string-built single-device strategy would stay on the CPU even with accelerator="gpu".
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None and len(devices) > 1:
            raise MisconfigurationException(
                f"strategy='diffusionblocks' runs on one device, but {len(devices)} were requested."
                + MULTI_PROCESS_HINT
            )
        self._parallel_devices = devices
        if devices:
            self._root_device = torch.device(devices[0])

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes > 1:
            raise MisconfigurationException(
                f"strategy='diffusionblocks' runs in one process, but num_nodes={num_nodes}." + MULTI_PROCESS_HINT
            )

    @property
    @override
    def root_device(self) -> torch.device:
        return self._root_device

    # ------------------------------------------------------------------ set-up
    @override
    def setup_environment(self) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:  # launched by torchrun / SLURM as one of several processes: never train N copies of rank 0
            raise MisconfigurationException(
                f"This process was launched as one of {world} (WORLD_SIZE={world}), but strategy='diffusionblocks'"
                " runs in one process and every copy would train and save the same thing." + MULTI_PROCESS_HINT
            )
        super().setup_environment()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DiffusionBlocks, one random group per step")
        strategy_registry.register(
            "diffusionblocks_sequential",
            cls,
            description="DiffusionBlocks, sequential phases (group 0 first)",
            schedule="sequential",
        )
