"""The DiffusionBlocks strategy: builds the schedule that picks the group each step trains.

``Trainer(strategy="diffusionblocks")`` works once ``lightning_diffusionblocks`` is imported. On one device
it is this single-device strategy; given several devices or nodes (``devices=N``, ``num_nodes``, a
``torchrun`` or SLURM launch) Lightning builds
:class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy` with the same schedule instead,
as it builds ``"ddp"`` rather than a single-device strategy for ``strategy="auto"`` (see
:func:`resolve_strategy`). The strategy hands the module its schedule
(:meth:`DiffusionBlocksModule.use_schedule`); the module never asks which strategy trains it. The group of a step
is a pure function of ``(seed, step)`` (see :mod:`schedules`), counted in the module's own steps, so a resumed run
continues exactly and a second fit continues rather than replaying the first one's noise. For several devices or
nodes see :class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy` and
:class:`~lightning_diffusionblocks.block_parallel.BlockParallelStrategy`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence

import torch
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy, Strategy, StrategyRegistry
from lightning.pytorch.trainer.connectors.accelerator_connector import _AcceleratorConnector
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_diffusionblocks.data_parallel import DiffusionBlocksDDPStrategy
from lightning_diffusionblocks.memory_plan import PlanMode
from lightning_diffusionblocks.planning import GroupOffloader, GroupPlanning, ScheduleSpec

__all__ = ["DiffusionBlocksStrategy", "GroupOffloader", "resolve_strategy"]

MULTI_PROCESS_HINT = (
    " For several processes give the Trainer their devices and nodes: Trainer(strategy='diffusionblocks',"
    " devices=N, num_nodes=M) trains data parallel (every process trains the same group on its own shard of the"
    " batch); strategy='diffusionblocks_block_parallel' has each process train its own group, with no traffic"
    " between groups."
)

SET_UP_REFUSAL = "strategy='diffusionblocks' cannot change its devices once set up; build a new Trainer and strategy."


class DiffusionBlocksStrategy(GroupPlanning, SingleDeviceStrategy):
    """Train a :class:`DiffusionBlocksModule` one block group per step on one device (see :class:`GroupPlanning`
    for the arguments).

    Given to a Trainer with several devices or nodes, by name or as an instance, the Trainer trains with the
    :class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy` of the same options instead
    (``trainer.strategy``; an instance passed in is left as it is, see :func:`resolve_strategy`).
    """

    strategy_name = "diffusionblocks"

    def __init__(
        self,
        schedule: ScheduleSpec = "random",
        steps_per_phase: int | None = None,
        groups_to_train: Sequence[int] | None = None,
        seed: int | None = None,
        allow_changed: Sequence[str] = (),
        memory_plan: PlanMode = "check",
        memory_limits: Mapping[str, int] | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device="cpu", accelerator=accelerator, checkpoint_io=checkpoint_io, precision_plugin=precision_plugin
        )
        self._init_planning(schedule, steps_per_phase, groups_to_train, seed, allow_changed, memory_plan, memory_limits)
        self._parallel_devices: list[torch.device] | None = None
        self._launched = False

    # ------------------------------------------------------------------ devices
    # The accelerator connector only hands devices to strategies with `parallel_devices`; without it a
    # string-built single-device strategy would stay on the CPU even with accelerator="gpu". Several devices or
    # nodes never reach here through the Trainer (resolve_strategy picks the data-parallel class first); anything
    # else that hands them over is refused rather than silently training one process.
    @property
    def parallel_devices(self) -> list[torch.device] | None:
        return self._parallel_devices

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        if devices is not None and len(devices) > 1:
            self._refuse_several(len(devices), 1)
        self._parallel_devices = devices
        if devices:
            self._root_device = torch.device(devices[0])

    @property
    def num_nodes(self) -> int:
        return 1

    @num_nodes.setter
    def num_nodes(self, num_nodes: int) -> None:
        if num_nodes > 1:
            self._refuse_several(len(self._parallel_devices or [self._root_device]), num_nodes)

    def _refuse_several(self, devices: int, num_nodes: int) -> None:
        if self._launched:
            raise MisconfigurationException(SET_UP_REFUSAL)
        raise MisconfigurationException(
            f"{type(self).__name__} trains in one process but was given {devices} device(s) × {num_nodes} node(s)."
            " For several, give the Trainer the strategy by name, Trainer(strategy='diffusionblocks', devices=N,"
            " num_nodes=M), or build the data-parallel one with the same options:"
            " DiffusionBlocksDDPStrategy(schedule=..., steps_per_phase=..., groups_to_train=..., seed=...,"
            " allow_changed=...)."
        )

    def data_parallel(self) -> DiffusionBlocksDDPStrategy:
        """A :class:`DiffusionBlocksDDPStrategy` with this strategy's schedule options and plugins (what the
        Trainer trains with when this strategy is given several devices or nodes)."""
        return DiffusionBlocksDDPStrategy(
            schedule=self.schedule_spec,
            steps_per_phase=self.steps_per_phase,
            groups_to_train=self.groups_to_train,
            seed=self.seed,
            allow_changed=self.allow_changed,
            memory_plan=self.memory_plan_mode,
            memory_limits=self.memory_limits,
            accelerator=self._accelerator,
            checkpoint_io=self._checkpoint_io,
            precision_plugin=self._precision_plugin,
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
        _teach_the_connector()


def resolve_strategy(strategy: str | Strategy, num_devices: int, num_nodes: int) -> str | Strategy:
    """What the Trainer trains with for ``strategy`` on ``num_devices`` × ``num_nodes``.

    ``"diffusionblocks"``, a name registered to :class:`DiffusionBlocksStrategy` (such as
    ``"diffusionblocks_sequential"``) or a :class:`DiffusionBlocksStrategy` instance, given several devices or
    nodes, becomes a :class:`~lightning_diffusionblocks.data_parallel.DiffusionBlocksDDPStrategy` with the same
    options (an instance is left as it is; the Trainer holds the new object). Anything else, and any subclass of
    :class:`DiffusionBlocksStrategy` (whose overrides the data-parallel class would not have), is returned unchanged.
    """
    if num_devices <= 1 and num_nodes <= 1:
        return strategy
    if isinstance(strategy, str):
        entry = dict.get(StrategyRegistry, strategy)  # the registry's own get() builds the strategy
        if entry is None or entry["strategy"] is not DiffusionBlocksStrategy:
            return strategy
        parallel = DiffusionBlocksDDPStrategy(**entry["init_params"])
        named = f"strategy={strategy!r}"
    elif type(strategy) is DiffusionBlocksStrategy:
        parallel = strategy.data_parallel()
        named = "DiffusionBlocksStrategy(...)"
    else:
        return strategy
    rank_zero_info(
        f"DiffusionBlocks: {num_devices} device(s) × {num_nodes} node(s), so {named} trains data parallel"
        " (DiffusionBlocksDDPStrategy: every process trains the step's group on its shard)."
    )
    return parallel


def _teach_the_connector() -> None:
    """Have Lightning's accelerator connector pick the data-parallel class by device count (:func:`resolve_strategy`).

    The connector builds a string-named strategy from the registry with no devices and hands them over only
    afterwards, so the class has to be chosen where Lightning itself falls back from the user's choice: its
    ``_check_strategy_and_fallback``, which runs once the devices and nodes are parsed and before the strategy is
    built. The wrapper runs Lightning's own checks first and changes nothing for any other strategy; it is
    installed once. Should a Lightning release rename the method, nothing is installed and several devices given
    to :class:`DiffusionBlocksStrategy` are refused (naming the data-parallel class) rather than mis-trained.
    """
    original: Callable[[_AcceleratorConnector], None] | None = getattr(
        _AcceleratorConnector, "_check_strategy_and_fallback", None
    )
    if original is None or getattr(original, "_resolves_diffusionblocks", False):
        return

    @functools.wraps(original)
    def check_strategy_and_fallback(connector: _AcceleratorConnector) -> None:
        original(connector)
        connector._strategy_flag = resolve_strategy(
            connector._strategy_flag,
            len(getattr(connector, "_parallel_devices", None) or ()),
            getattr(connector, "_num_nodes_flag", 1),
        )

    check_strategy_and_fallback._resolves_diffusionblocks = True  # type: ignore[attr-defined]
    setattr(_AcceleratorConnector, "_check_strategy_and_fallback", check_strategy_and_fallback)  # noqa: B010
