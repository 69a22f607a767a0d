"""What every DiffusionBlocks strategy shares: the schedule it builds and hands the module, checkpoints that
hold every group, and the interface an offloading callback offers.

Mixed into Lightning's own strategies (:class:`~lightning.pytorch.strategies.SingleDeviceStrategy`,
:class:`~lightning.pytorch.strategies.DDPStrategy`); the module never asks which one trains it.
"""

from __future__ import annotations

import inspect
import math
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import lightning.pytorch as pl
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint, unsafe_file_message
from lightning_diffusionblocks.files import atomic_write
from lightning_diffusionblocks.memory_plan import (
    MemoryPlan,
    OffloadTarget,
    Placement,
    PlanMode,
    check_plan_options,
    fitting_options,
    plan_for_fit,
    refusal,
)
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.precision import StatePrecision
from lightning_diffusionblocks.schedules import RandomSchedule, Schedule, SequentialSchedule

ScheduleSpec = Literal["random", "sequential"] | Schedule

#: settings a checkpoint records and a resume checks, each a name ``allow_changed`` may give
RESUME_SETTINGS = (
    "schedule", "steps_per_phase", "schedule_seed", "groups_to_train", "seed", "gamma", "partition",
    "accumulate_grad_batches", "parallelism", "world_size", "replicas", "state_precision",
)  # fmt: skip
#: settings recorded only when they are not their default, so a record without them had the default
RECORDED_WHEN_SET = ("state_precision",)

if TYPE_CHECKING:  # a mixin of Lightning strategies: type-check its calls against theirs
    _StrategyBase = pl.strategies.Strategy
else:
    _StrategyBase = object


class GroupOffloader(Protocol):
    """What a strategy needs of an offloading callback (e.g. ``BlockOffload``) around checkpoints: bring
    every group into memory, then send the exposed ones back."""

    def expose_for_checkpoint(self) -> list[int]:
        """Load every offloaded group so a checkpoint sees real tensors; return the groups to offload again."""
        ...

    def offload(self, group: int) -> None:
        """Move ``group`` off the compute device again."""
        ...


class GroupPlanning(_StrategyBase):
    """Mixin for a Lightning strategy that trains a :class:`DiffusionBlocksModule` one group per step.

    Args:
        schedule: ``"random"`` (the paper: one group drawn per step), ``"sequential"`` (group 0 for
            ``steps_per_phase`` steps, then group 1, …) or a :class:`Schedule` instance.
        steps_per_phase: steps per group for ``"sequential"``; default ``max_steps / groups``.
        groups_to_train: train only these groups in this job (e.g. one group per job).
        seed: seed of the random schedule; default the module's ``seed``.
        allow_changed: names from :data:`RESUME_SETTINGS` that a resume may change from what the checkpoint
            recorded (e.g. ``("world_size",)``); any other change is refused. The resume is then no longer exact.
        memory_plan: before training, print what each group will hold on the device, in host memory and on disk
            (:mod:`~lightning_diffusionblocks.memory_plan`) and refuse a plan that does not fit, naming the options
            that would (``"check"``, the default); only print it (``"print"``); or skip it (``"off"``). The plan is
            kept in ``strategy.memory_plan`` and its :meth:`~MemoryPlan.record` logged as a hyper-parameter.
        memory_limits: the bytes the plan may use, ``{"device": ..., "host": ..., "disk": ...}`` (any of them);
            what is not given is read from the machine (CUDA free memory, ``MemAvailable``, free disk).
    """

    strategy_name = "diffusionblocks"

    def _init_planning(
        self,
        schedule: ScheduleSpec = "random",
        steps_per_phase: int | None = None,
        groups_to_train: Sequence[int] | None = None,
        seed: int | None = None,
        allow_changed: Sequence[str] = (),
        memory_plan: PlanMode = "check",
        memory_limits: Mapping[str, int] | None = None,
    ) -> None:
        check_plan_options(memory_plan, memory_limits)
        if isinstance(schedule, str) and schedule not in ("random", "sequential"):
            raise ValueError(f"schedule must be 'random', 'sequential' or a Schedule instance, got {schedule!r}.")
        self.schedule_spec = schedule
        self.steps_per_phase = steps_per_phase
        self.groups_to_train = None if groups_to_train is None else list(groups_to_train)
        self.seed = seed
        self.schedule: Schedule | None = schedule if isinstance(schedule, Schedule) else None
        #: the offloading callback, when one is attached (BlockOffload registers itself in its setup)
        self.offloader: GroupOffloader | None = None
        self._exposed: list[int] = []
        #: recorded run settings a resume may change (see :data:`RESUME_SETTINGS`); anything else is refused
        self.allow_changed: Sequence[str] = tuple(allow_changed)
        self._resumed_from: dict[str, Any] | None = None  # the checkpoint's DiffusionBlocks record, until checked
        self.memory_plan_mode: PlanMode = memory_plan
        self.memory_limits = None if memory_limits is None else dict(memory_limits)
        #: the memory plan of the current (or last) fit, None when it was not made
        self.memory_plan: MemoryPlan | None = None

    # ------------------------------------------------------------------ what subclasses may change
    def trained_groups(self, module: DiffusionBlocksModule) -> list[int] | None:
        """The groups this process trains (None: every group)."""
        return self.groups_to_train

    def reduce_gradients(self, params: list[Tensor]) -> None:
        """Average the gradients of ``params`` over the processes that train the same group (none here)."""

    def check_module(self, module: Any) -> DiffusionBlocksModule:
        if not isinstance(module, DiffusionBlocksModule):
            raise MisconfigurationException(
                f"strategy={self.strategy_name!r} trains a DiffusionBlocksModule, got {type(module).__name__}."
                " Wrap your network: `DiffusionBlocksModule(net, task=..., num_blocks=B)`."
            )
        return module

    def setup(self, trainer: pl.Trainer) -> None:
        self.plan(trainer)
        super().setup(trainer)  # type: ignore[misc]  # the Lightning strategy this is mixed into
        self.check_memory(trainer)

    def check_memory(self, trainer: pl.Trainer) -> None:
        """Make, print and check the memory plan of the fit about to start (after the optimizer and the offloading
        callback are set up, before the first step); refuse one that does not fit, naming what would."""
        self.memory_plan = None
        if self.memory_plan_mode == "off" or not trainer.training:
            return
        module = self.check_module(self.lightning_module)  # type: ignore[attr-defined]
        placement = Placement()
        describe = getattr(self.offloader, "placement", None)
        if callable(describe):
            placement = describe()
        held = getattr(self, "owned", None) or None  # block parallel: this process holds its own groups only
        trained = self.trained_groups(module)
        plan, network = plan_for_fit(
            module, trainer, placement, held, trained, self.memory_limits,
            self.batch_to_device, self.precision_plugin.train_step_context,  # type: ignore[attr-defined]
        )  # fmt: skip
        self.memory_plan = plan
        rank_zero_info(plan.table())
        if not plan.activations_estimated:
            rank_zero_warn(f"DiffusionBlocks memory plan: {plan.activation_note}.")
        for logger in trainer.loggers:
            logger.log_hyperparams({"memory_plan": plan.record()})
        if plan.fits or self.memory_plan_mode != "check":
            if not plan.fits:
                rank_zero_warn("DiffusionBlocks memory plan: " + "; ".join(plan.problems()) + " (memory_plan='print').")
            return
        targets: tuple[OffloadTarget, ...] = ("cpu", "disk") if plan.options.device == "cuda" else ("disk",)
        suggestions, combined = fitting_options(network, plan, targets)
        raise MisconfigurationException(refusal(plan, suggestions, combined))

    def teardown(self) -> None:
        self.unplan()
        super().teardown()  # type: ignore[misc]

    def plan(self, trainer: pl.Trainer) -> None:
        """Build the schedule and hand it to the module (called from the strategy's ``setup``)."""
        module = self.check_module(self.lightning_module)  # type: ignore[attr-defined]
        if trainer.training:
            self.schedule = self.build_schedule(module, trainer)
            self.validate(module)
            self.check_resume(module)
            module.use_schedule(self.schedule, reduce_gradients=self.reduce_gradients)

    def unplan(self) -> None:
        module = self.lightning_module  # type: ignore[attr-defined]
        if isinstance(module, DiffusionBlocksModule):
            module.use_schedule(None)

    def build_schedule(self, module: DiffusionBlocksModule, trainer: pl.Trainer) -> Schedule:
        if isinstance(self.schedule_spec, Schedule):
            if self.schedule_spec.num_groups != module.num_blocks:
                raise MisconfigurationException(
                    f"The schedule is built for {self.schedule_spec.num_groups} groups but the module has"
                    f" num_blocks={module.num_blocks}."
                )
            return self.schedule_spec
        if self.schedule_spec == "random":
            seed = module.hparams["seed"] if self.seed is None else self.seed
            drawn = RandomSchedule(module.num_blocks, seed=seed, groups=self.trained_groups(module))
            max_steps = trainer.max_steps or 0
            if int(module.step_count) == 0 and 0 < max_steps <= 20_000 and len(drawn.groups) > 1:  # a fresh run
                counts = dict.fromkeys(drawn.groups, 0)
                for step in range(max_steps):
                    counts[drawn.group_at(step)] += 1
                n, low, high = len(counts), min(counts.values()), max(counts.values())
                if low == 0 or high - low > 0.1 * max_steps / n:
                    rank_zero_warn(
                        f"The random schedule draws one group per step, and over max_steps={max_steps} it gives the"
                        f" groups unequal steps ({', '.join(f'group {g}: {c}' for g, c in counts.items())}). Train"
                        " longer (the shares even out), or use sequential phases"
                        f" (strategy='diffusionblocks_sequential') with max_steps a multiple of {n} for exactly"
                        f" max_steps / {n} steps each."
                    )
            return drawn
        steps = self.steps_per_phase
        groups = self.trained_groups(module)
        n_groups = module.num_blocks if groups is None else len(set(groups))
        if steps is None:
            if trainer.max_steps is None or trainer.max_steps < 1:
                raise MisconfigurationException(
                    "schedule='sequential' needs a phase length: pass steps_per_phase=N to the strategy or set"
                    " Trainer(max_steps=...) so each group gets max_steps / num_blocks steps."
                )
            steps = math.ceil(trainer.max_steps / n_groups)
        schedule = SequentialSchedule(module.num_blocks, steps, groups=groups)
        if trainer.max_steps and trainer.max_steps > schedule.total_steps():
            rank_zero_warn(
                f"Sequential phases cover {schedule.total_steps()} steps but max_steps={trainer.max_steps}; the last"
                f" group keeps training after its phase. Set max_steps={schedule.total_steps()} to stop with it."
            )
        elif trainer.max_steps and trainer.max_steps < schedule.total_steps() and int(module.step_count) == 0:
            trained = schedule.groups
            phases = [min(max(trainer.max_steps - i * steps, 0), steps) for i in range(len(trained))]
            rank_zero_warn(
                f"Sequential phases of {steps} steps with max_steps={trainer.max_steps} give the groups unequal steps"
                f" ({', '.join(f'group {g}: {c}' for g, c in zip(trained, phases))}). For equal phases set"
                f" max_steps={schedule.total_steps()} (steps_per_phase x {len(trained)} groups), or leave out"
                f" steps_per_phase and use a max_steps that is a multiple of {len(trained)}."
            )
        return schedule

    def validate(self, module: DiffusionBlocksModule) -> None:
        """Refuse option combinations that would silently train a wrong model."""
        assert self.schedule is not None
        if module.network.stem_mode == "shared" and (
            self.schedule.phased or len(self.schedule.groups) < module.num_blocks
        ):
            raise MisconfigurationException(
                "stem='shared' trains the stem and head at every step, so with sequential phases or a subset of"
                " groups a later group would silently change the input of a group that already finished."
                " Use DiffusionBlocksModule(..., stem='per_group') or schedule='random' over all groups."
            )
        rank_zero_info(
            f"DiffusionBlocks: {module.num_blocks} groups of layers {[len(g) for g in module.network.groups]},"
            f" schedule={type(self.schedule).__name__}, stem={module.network.stem_mode}, noise ranges "
            + ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in module.ranges)
        )

    # ------------------------------------------------------------------ the run's settings, recorded and checked
    def layout(self) -> dict[str, Any]:
        """How the processes of this run are laid out (recorded in checkpoints)."""
        world = int(self.world_size)  # type: ignore[attr-defined]
        if hasattr(self, "owned"):  # block parallel: groups x replicas
            return {"parallelism": "block_parallel", "world_size": world, "replicas": int(getattr(self, "replicas", 1))}
        return {"parallelism": "data_parallel" if world > 1 else "single", "world_size": world, "replicas": world}

    def run_record(self) -> dict[str, Any]:
        """The schedule and process layout of this run, as plain data (the same on every process)."""
        schedule = self.schedule
        return {
            "schedule": type(schedule).__name__ if schedule is not None else None,
            "steps_per_phase": getattr(schedule, "steps_per_phase", None),
            "schedule_seed": getattr(schedule, "seed", None),
            "groups_to_train": self.groups_to_train,
            **self.layout(),
        }

    def check_resume(self, module: DiffusionBlocksModule) -> None:
        """Refuse to resume a run whose recorded settings differ from this one's (unless ``allow_changed`` names them).

        A changed schedule, seed, ``groups_to_train``, ``gamma`` or process layout would silently train something
        other than the run the checkpoint came from.
        """
        saved, self._resumed_from = self._resumed_from, None
        if saved is None:
            return
        unknown = sorted(set(self.allow_changed) - set(RESUME_SETTINGS))
        if unknown:
            raise ValueError(f"allow_changed names unknown settings {unknown}; choose from {list(RESUME_SETTINGS)}.")
        recorded = {**(saved.get("training") or {}), **(saved.get("run") or {})}
        if not recorded:
            rank_zero_warn(
                "The checkpoint does not record the run's settings (schedule, seeds, groups_to_train, gamma, process"
                " layout; written by lightning_diffusionblocks 0.2.0 or earlier), so the resume cannot check that"
                " they are unchanged. Resume with the settings it was trained with."
            )
            return
        now = {**module.training_settings(), **self.run_record()}
        changed = [
            key for key in RESUME_SETTINGS
            if (key in recorded or key in RECORDED_WHEN_SET) and recorded.get(key) != now.get(key)
        ]  # fmt: skip
        if "state_precision" in changed:
            check_optimizer_kind(recorded.get("state_precision"), now.get("state_precision"))
        refused = [key for key in changed if key not in self.allow_changed]
        if refused:
            described = ", ".join(f"{key}={recorded[key]!r} (now {now.get(key)!r})" for key in refused)
            raise MisconfigurationException(
                f"The checkpoint was trained with {described}; resuming with different settings would silently train"
                " another run. Resume with the recorded values, or, to change them on purpose, allow it:"
                f" `{type(self).__name__}(..., allow_changed={tuple(refused)!r})` (the resume is then no longer"
                " exact)."
            )
        if changed:
            rank_zero_warn(
                "Resuming with changed settings (allowed by `allow_changed`): "
                + ", ".join(f"{key} {recorded[key]!r} -> {now.get(key)!r}" for key in changed)
                + "; the run is no longer the one the checkpoint came from."
            )
        if any(key in changed for key in ("parallelism", "world_size", "replicas", "schedule", "steps_per_phase")):
            # each group's LR horizon was counted for the old layout/schedule: count the remaining steps afresh
            module.recompute_horizons = True

    # ------------------------------------------------------------------ steps
    def select_group(self, step: int) -> int:
        """The group trained at Trainer step ``step`` (callbacks ask for the coming and the next step).

        The schedule counts the module's own steps, which go on across fits; a fresh Trainer's step 0 is the
        module's step ``step_count``.
        """
        assert self.schedule is not None, "The schedule is built in setup(); call trainer.fit first."
        module = self.lightning_module
        offset = int(module.step_count) - module.trainer.global_step if module is not None else 0
        return self.schedule.group_at(step + offset)

    # ------------------------------------------------------------------ exact resume of the data order
    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Give a resumed run's samplers their epoch before the first iterator is made.

        Lightning creates the training iterator before it calls ``set_epoch`` on a resume, so a sampler that
        shuffles when its iterator is made (``DistributedSampler``) would draw epoch 0's order for the resumed
        epoch. The epoch is known from the restored loop progress: the saved epoch, or the next one when the saved
        epoch's batches were all used.
        """
        dataloader = super().process_dataloader(dataloader)  # type: ignore[misc]
        module = self.lightning_module  # type: ignore[attr-defined]
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and trainer.training:
            loop = trainer.fit_loop
            progress = loop.epoch_progress.current
            _set_sampler_epoch(dataloader, progress.started if _epoch_used_up(loop.epoch_loop) else progress.processed)
        return dataloader

    @override
    def on_train_start(self) -> None:
        """A resumed run's first micro-batches must not write a step checkpoint again.

        With ``accumulate_grad_batches`` the step count stays at the resumed step until its last micro-batch, so
        ``ModelCheckpoint(every_n_train_steps=...)``, which does not save which step it saved last, would write a
        half-accumulated step under the resumed step's name; the uninterrupted run wrote that step once, before.
        """
        super().on_train_start()  # type: ignore[misc]
        module = self.lightning_module  # type: ignore[attr-defined]
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and trainer.global_step > 0:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(getattr(callback, "_last_global_step_saved", None), int):
                    callback._last_global_step_saved = max(callback._last_global_step_saved, trainer.global_step)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        record = checkpoint.get("diffusionblocks")
        module = self.lightning_module  # type: ignore[attr-defined]
        fitting = module is not None and module._trainer is not None and module._trainer.training
        self._resumed_from = dict(record) if fitting and isinstance(record, Mapping) else None  # checked in setup
        _resume_after_last_batch(checkpoint)
        super().load_model_state_dict(checkpoint, strict=strict)  # type: ignore[safe-super]

    # ------------------------------------------------------------------ checkpoints
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self.offloader is not None:
            self._exposed = self.offloader.expose_for_checkpoint()
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        """Write to a temporary file and rename it, so a crash mid-write never replaces a good checkpoint.

        The run's schedule and process layout are added to the module's record, for :meth:`check_resume`.
        """
        record = checkpoint.get("diffusionblocks")
        if isinstance(record, dict) and self.schedule is not None:
            record["run"] = self.run_record()
        try:
            if self.is_global_zero and isinstance(filepath, (str, os.PathLike)) and "://" not in str(filepath):
                atomic_write(
                    filepath,
                    lambda tmp: self.checkpoint_io.save_checkpoint(checkpoint, tmp, storage_options=storage_options),
                    suffix="partial",
                )
            else:
                super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            exposed, self._exposed = self._exposed, []
            if self.offloader is not None:
                for group in exposed:
                    self.offloader.offload(group)

    @override
    def load_checkpoint(self, checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Read a checkpoint with torch's restricted unpickler, always: ``weights_only=True`` is passed explicitly.

        Lightning passes ``weights_only=None`` unless told otherwise, and torch turns None into the unrestricted
        unpickler when ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` is set; an explicit True is kept whatever the
        environment says. A DiffusionBlocks checkpoint holds tensors and plain data only, so nothing is lost.
        """
        requested = kwargs.pop("weights_only", args[0] if args else None)
        if requested is False:
            rank_zero_warn(
                "weights_only=False is ignored: DiffusionBlocks checkpoints hold tensors and plain data only and are"
                " always read with torch's restricted unpickler (weights_only=True)."
            )
        try:
            if "weights_only" in inspect.signature(super().load_checkpoint).parameters:
                return super().load_checkpoint(checkpoint_path, weights_only=True)
            # Lightning 2.5 reads with torch's default, which the environment can turn into the unrestricted unpickler
            return read_checkpoint(checkpoint_path)
        except (pickle.UnpicklingError, CheckpointLoadError) as err:
            refused = err if isinstance(err, pickle.UnpicklingError) else err.__cause__
            if not isinstance(refused, pickle.UnpicklingError):
                raise
            raise RuntimeError(
                unsafe_file_message(checkpoint_path, refused, "Resume only from checkpoints you trust.")
            ) from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
            siblings = sorted(p.name for p in Path(checkpoint_path).parent.glob("*.ckpt") if p != Path(checkpoint_path))
            hint = f" Other checkpoints there: {', '.join(siblings)}." if siblings else ""
            raise RuntimeError(
                f"Checkpoint {checkpoint_path} is corrupt or truncated ({type(err).__name__}: {err})."
                f" It was not loaded and nothing was overwritten; resume from an earlier checkpoint.{hint}"
            ) from err


def check_optimizer_kind(recorded: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> None:
    """Refuse a resume between 8-bit and full-width Adam moments: bitsandbytes' state (``state1``/``state2``, uint8)
    and torch's (``exp_avg``/``exp_avg_sq``) are not each other's, whatever ``allow_changed`` says."""
    was, will = ((value or {}).get("moments") == "8bit" for value in (recorded, now))
    if was != will:
        saved = StatePrecision.of(recorded)
        raise MisconfigurationException(
            f"The checkpoint's optimizer state was made with StatePrecision(moments={saved.moments!r}) and cannot be"
            f" loaded by the optimizer of moments={StatePrecision.of(now).moments!r} (8-bit and full-width Adam state"
            f" differ). Resume with state_precision={saved.record()!r}, or start a new fit from its weights only:"
            " DiffusionBlocksModule.load_from_checkpoint(path, state_precision=...), then trainer.fit(module) without"
            " ckpt_path."
        )


def _epoch_used_up(epoch_loop: Any) -> bool:
    """Whether the (restored) training epoch loop had trained the last batch of its epoch."""
    progress = epoch_loop.batch_progress
    return bool(progress.is_last_batch) and progress.current.processed == progress.current.ready > 0


def _resume_after_last_batch(checkpoint: Mapping[str, Any]) -> None:
    """Make a checkpoint written after its epoch's last batch resume at the next epoch's first batch.

    Two things in such a checkpoint mislead Lightning's loops. (1) The saved data-loader state describes an
    iterator with nothing left (``StatefulDataLoader`` saves "all batches yielded"), yet Lightning loads it into
    the next epoch's iterator: that epoch would end at once and the run would train the epoch after it (a later
    shuffle, epoch numbers one ahead). Without it the next epoch starts a fresh iterator, as in the uninterrupted
    run. (2) A checkpoint written in ``on_train_epoch_end`` (Lightning's default ``ModelCheckpoint``) is, with
    ``max_steps``, restarted as an unfinished epoch: one more batch of a restarted iterator, then that epoch's
    end again. Its progress counters are put back to where a checkpoint written after the last batch has them
    (the epoch not yet counted as processed), which Lightning resumes at the next epoch's first batch.
    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict):
        return
    batches, epochs = fit.get("epoch_loop.batch_progress") or {}, fit.get("epoch_progress") or {}
    current = batches.get("current") or {}
    if not (batches.get("is_last_batch") and current.get("processed") == current.get("ready", -1) > 0):
        return
    state = fit.get("state_dict") or {}
    if state.get("combined_loader"):
        state["combined_loader"] = []
    epoch = epochs.get("current") or {}
    finished = epoch.get("ready") == epoch.get("started") == epoch.get("processed") == epoch.get("completed", -2) + 1
    at_epoch_end = finished and current.get("completed") == current.get("processed")
    if at_epoch_end:
        for counters in (epochs["current"], epochs["total"]):
            counters["processed"] -= 1
        for counters in (batches["current"], batches["total"]):
            counters["completed"] -= 1
        loop_state = fit.get("epoch_loop.state_dict")
        if isinstance(loop_state, dict) and "_batches_that_stepped" in loop_state:
            loop_state["_batches_that_stepped"] -= 1
