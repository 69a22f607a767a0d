"""The DiffusionBlocks strategy: builds the schedule that picks the group each step trains.

``Trainer(strategy="diffusionblocks")`` works once ``lightning_diffusionblocks`` is imported. On one device
it is this single-device strategy; given several devices or nodes (``devices=N``, ``num_nodes``, a
``torchrun`` or SLURM launch) it becomes :class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy`
with the same schedule, as ``strategy="ddp"`` is to one device what ``"auto"`` is. The
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
from lightning.fabric.plugins.environments import ClusterEnvironment
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_diffusionblocks.planning import GroupOffloader, GroupPlanning, ScheduleSpec

__all__ = ["DiffusionBlocksStrategy", "GroupOffloader"]

MULTI_PROCESS_HINT = (
    " For several processes give the Trainer their devices and nodes: Trainer(strategy='diffusionblocks',"
    " devices=N, num_nodes=M) trains data parallel (every process trains the same group on its own shard of the"
    " batch); strategy='diffusionblocks_block_parallel' has each process train its own group, with no traffic"
    " between groups."
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
        allow_changed: Sequence[str] = (),
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device="cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._init_planning(schedule, steps_per_phase, groups_to_train, seed, allow_changed)
        self._parallel_devices: list[torch.device] | None = None
        self._launched = False
        #: set by Lightning's accelerator connector (TorchElastic, SLURM, …); used if this becomes data parallel
        self.cluster_environment: ClusterEnvironment | None = None

    # ------------------------------------------------------------------ devices
    # The accelerator connector only hands devices to strategies with `parallel_devices`; without it a
    # string-built single-device strategy would stay on the CPU even with accelerator="gpu".
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None and len(devices) > 1:
            self._become_data_parallel(devices, num_nodes=1)
            return
        self._parallel_devices = devices
        if devices:
            self._root_device = torch.device(devices[0])

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes > 1:
            self._become_data_parallel(self._parallel_devices or [self._root_device], num_nodes)

    def _become_data_parallel(self, devices: list[torch.device], num_nodes: int) -> None:
        """Turn into :class:`DiffusionBlocksDDPStrategy` with this schedule, in place.

        Lightning's accelerator connector builds a string-named strategy before it knows the devices, then hands
        them over here; the connector keeps this object, so it changes its class rather than being replaced.
        """
        from lightning_diffusionblocks.data_parallel import DiffusionBlocksDDPStrategy

        if self._launched:
            raise MisconfigurationException(
                "strategy='diffusionblocks' cannot change its devices once set up; build a new Trainer."
            )
        parallel = DiffusionBlocksDDPStrategy(
            schedule=self.schedule_spec,
            steps_per_phase=self.steps_per_phase,
            groups_to_train=self.groups_to_train,
            seed=self.seed,
            allow_changed=self.allow_changed,
            accelerator=self._accelerator,
            parallel_devices=list(devices),
            cluster_environment=self.cluster_environment,
            checkpoint_io=self._checkpoint_io,
            precision_plugin=self._precision_plugin,
        )
        parallel.num_nodes = num_nodes
        self.__class__ = DiffusionBlocksDDPStrategy  # type: ignore[assignment]
        self.__dict__ = parallel.__dict__
        rank_zero_info(
            f"DiffusionBlocks: {len(devices)} device(s) × {num_nodes} node(s), so strategy='diffusionblocks' trains"
            " data parallel (DiffusionBlocksDDPStrategy: every process trains the step's group on its shard)."
        )

    @property
    @override
    def root_device(self) -> torch.device:
        return self._root_device

    # ------------------------------------------------------------------ set-up
    @override
    def setup_environment(self) -> None:
        self._launched = True
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
