"""`DiffusionBlocksModule`: the Lightning wiring of block-wise training; the task does the rest.

Trained with a DiffusionBlocks strategy, each step trains the one group the strategy's schedule picks,
on its own slice of noise levels. Trained with any other strategy (``"auto"``) the same module is the
end-to-end baseline: every layer, the full noise range. How a model was trained is recorded in the
module (``trained_blockwise``) and decides routing everywhere — training, validation, sampling,
prediction — whatever Trainer runs it. The strategy hands the module its schedule; the module never
asks which strategy trains it, and it knows no concrete task: validation metrics and inference belong
to the task, which is given a :class:`~lightning_diffusionblocks.routing.Router`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks import checkpoint_record
from lightning_diffusionblocks.activation_checkpointing import checkpoint_every
from lightning_diffusionblocks.checkpoint_record import built as _built
from lightning_diffusionblocks.checks import MAX_GAMMA as MAX_GAMMA  # re-exported from their former home
from lightning_diffusionblocks.checks import NonFiniteLossError as NonFiniteLossError
from lightning_diffusionblocks.checks import (
    TrainingDataCheck,
    check_options,
    check_trainer_options,
    check_training_kind,
    non_finite_loss,
)
from lightning_diffusionblocks.dashboard import GroupLossLog, log_group_summary, log_run_config
from lightning_diffusionblocks.inference import Inference
from lightning_diffusionblocks.lora import GroupLoRA
from lightning_diffusionblocks.noise import Partition
from lightning_diffusionblocks.optimisation import SHARED as SHARED  # re-exported from their former home
from lightning_diffusionblocks.optimisation import GroupOptimisation, OptimizerFactory, check_settings, param_groups
from lightning_diffusionblocks.optimisation import warmup_cosine as warmup_cosine
from lightning_diffusionblocks.partition import BlockwiseNetwork, StemMode
from lightning_diffusionblocks.precision import GroupStateStore, StatePrecision
from lightning_diffusionblocks.records import trusting
from lightning_diffusionblocks.schedules import Schedule, step_seed
from lightning_diffusionblocks.tasks.base import Task

RANK_SALT = 1_000_003
MICRO_SALT = 101  #: seed salt of the j-th micro-batch of an accumulated step (j = 0 draws the plain step's noise)


class DiffusionBlocksModule(Inference, L.LightningModule):
    """Wrap ``net`` (a model with a block stack) and a :class:`~lightning_diffusionblocks.tasks.Task`.

    Args:
        net: the network; its block stack is found at ``block_path`` or a well-known attribute. A
            ``{"class_path": ..., "init_args": {...}}`` dict builds it (LightningCLI's shape).
        task: what to learn (e.g. ``ImageGeneration()``); a ``class_path`` dict builds it.
        num_blocks: B, the number of groups the stack is cut into.
        group_sizes: explicit layers per group (first = highest noise); default an even split.
        stem: ``"per_group"`` (each group owns its stem/head; safe for any schedule) or ``"shared"``
            (the official code's choice; random schedule only). A network with a
            ``diffusionblocks_check_stem(stem)`` method is asked first and may refuse (e.g. a trained target
            embedding, which must be one table for all groups).
        partition: how noise levels are cut: ``"equiprobable"`` (paper), ``"uniform_log"``, ``"linear"``.
        gamma: overlap of neighbouring noise ranges, in [0, 0.5) (paper default 0.05).
        lr, weight_decay, betas: AdamW settings (ignored when ``optimizer`` is given).
        warmup_steps, lr_schedule, min_lr_ratio: learning rate per group, counted in that group's own steps.
        gradient_clip_val: clip each group's gradient norm separately (use this instead of the Trainer's
            ``gradient_clip_val``: the module optimises manually, one group at a time).
        accumulate_grad_batches: micro-batches whose gradients are summed (each scaled by 1/k) before one
            optimizer step of the same group (use this instead of the Trainer's ``accumulate_grad_batches``).
            Steps, LR schedules, EMA and the group schedule count optimizer steps; ``max_steps`` too.
        ema_decay: keep an exponential moving average of the weights, used for sampling and validation.
        optimizer: ``factory(param_groups) -> Optimizer`` to replace AdamW. It receives one param group per
            block group (``name`` "group_k", plus "shared"); it may split each further (e.g. decay / no-decay)
            but must not mix two groups' parameters in one param group.
        seed: seeds the noise of every step (a step is a pure function of ``(seed, step)``).
        lora: fine-tune with one LoRA adapter per group (:class:`~lightning_diffusionblocks.lora.GroupLoRA`, or its
            record as a dict): the network's weights are frozen and group g trains only the adapter on its blocks.
        activation_checkpointing: recompute activations at backward instead of keeping them, inside the running
            group: ``None`` (off), ``"every"`` (every block) or k (every k-th block). Less activation memory, more
            time; the gradients are the same, so a resume may change it.
        state_precision: what each group's weights and Adam moments are kept in while it is not training
            (:class:`~lightning_diffusionblocks.precision.StatePrecision`, or its record as a dict; default fp32):
            bf16 with an fp32 master of the active group only, or bitsandbytes' 8-bit AdamW moments.
    """

    def __init__(
        self,
        net: nn.Module | dict[str, Any],
        task: Task | dict[str, Any],
        num_blocks: int = 3,
        group_sizes: Sequence[int] | None = None,
        block_path: str | None = None,
        stem: StemMode = "per_group",
        partition: Partition = "equiprobable",
        gamma: float = 0.05,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
        accumulate_grad_batches: int = 1,
        lora: GroupLoRA | dict[str, Any] | None = None,
        activation_checkpointing: int | Literal["every"] | None = None,
        state_precision: StatePrecision | dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        net = _built(net, "net", nn.Module)
        task = _built(task, "task", Task)
        net, task = check_options(net, task, num_blocks, gamma)
        check_settings(
            lr, warmup_steps, lr_schedule, min_lr_ratio, gradient_clip_val, ema_decay, accumulate_grad_batches
        )
        self.state_precision = StatePrecision.of(state_precision)
        self.state_precision.check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["net", "task", "optimizer", "lora", "state_precision"])
        if not self.state_precision.full:  # plain data, like ``lora``: a checkpoint rebuilds the option from it
            self.hparams["state_precision"] = self.state_precision.record()
        self.automatic_optimization = False
        self.task = task
        task.bind(net)  # first: a network made for another task is named as such, before any of its own checks
        check_stem = getattr(net, "diffusionblocks_check_stem", None)
        if callable(check_stem):  # the network knows which of its parts must not be copied per group
            check_stem(stem)
        self.network = BlockwiseNetwork(net, num_blocks, group_sizes, block_path, stem)
        self.network.checkpoint_every = checkpoint_every(activation_checkpointing)
        self.lora = GroupLoRA.of(lora)
        if self.lora is not None:  # before the EMA copy, which then holds the adapters too
            self.lora.apply(self.network)
            self.hparams["lora"] = self.lora.record()  # plain data: a checkpoint rebuilds the adapters from it
        self.boundaries = task.noise.boundaries(num_blocks, partition)
        self.ranges = [task.noise.group_range(self.boundaries, g, gamma) for g in range(num_blocks)]
        self.ema_network = copy.deepcopy(self.network).requires_grad_(False) if ema_decay else None
        self.optimizer_factory = optimizer
        #: switches groups between their stored (bf16) and active (fp32) form; None when nothing is stored in bf16
        self.state_store = (
            GroupStateStore(self.state_precision, seed, self._stored_networks, self._optimizer_or_none,
                            lambda: int(self.step_count))
            if self.state_precision.switches else None
        )  # fmt: skip
        self.register_buffer("group_steps", torch.zeros(num_blocks, dtype=torch.long))
        #: optimizer steps taken over every fit (a second fit continues the noise instead of replaying it)
        self.register_buffer("step_count", torch.zeros((), dtype=torch.long))
        #: how the model was trained: True = each level is served by its own group (routing follows this)
        self.register_buffer("trained_blockwise", torch.tensor(True))
        #: per group (and the shared stem, last) the step count at which its LR schedule ends
        self.register_buffer("lr_horizons", torch.zeros(num_blocks + 1, dtype=torch.float64))
        #: the group the last training step trained (None: end-to-end), for callbacks after the step
        self.last_group: int | None = None
        self._schedule: Schedule | None = None
        self._reduce_gradients: Callable[[list[Tensor]], None] | None = None
        #: param groups and their owners, learning rates, clipping, EMA (reads this module's settings and counters)
        self.optimisation = GroupOptimisation(self)
        #: per-group training-loss points waiting for a logging row, and each group's running loss (progress bar)
        self._loss_log = GroupLossLog()
        #: where the weights came from when the run started from pretrained ones (plain data, kept in checkpoints;
        #: set by :func:`lightning_diffusionblocks.pretrained.load_pretrained`), else None
        self.pretrained: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        return self.network.num_groups

    def _uniform_weights(self) -> None:
        """Every group's weights in fp32 before a pass that runs every group (exact upcasts of the stored bf16
        ones; the next training step stores them again without rounding)."""
        if self.state_store is not None:
            self.state_store.restore_all()

    def _stored_networks(self) -> list[BlockwiseNetwork]:
        return [self.network] + ([self.ema_network] if self.ema_network is not None else [])

    def _optimizer_or_none(self) -> Optimizer | None:
        trainer = self._trainer
        return trainer.optimizers[0] if trainer is not None and trainer.optimizers else None

    def use_schedule(
        self, schedule: Schedule | None, reduce_gradients: Callable[[list[Tensor]], None] | None = None
    ) -> None:
        """Called by a DiffusionBlocks strategy before fit (and with None after): which group trains at each step,
        and how the gradients of a step's group are averaged over the processes that train it (if several)."""
        self._reduce_gradients = reduce_gradients
        if schedule is not None and schedule.num_groups != self.num_blocks:
            raise MisconfigurationException(
                f"The schedule is built for {schedule.num_groups} groups but the module has"
                f" num_blocks={self.num_blocks}."
            )
        self._schedule = schedule

    def group_at(self, step: int | None = None) -> int | None:
        """The group trained at module step ``step`` (default the coming one); None when training end-to-end."""
        if self._schedule is None:
            return None
        return self._schedule.group_at(int(self.step_count) if step is None else step)

    # routing, evaluation mode and the inference front door (sample, predict_proba, ...): see inference.py

    # ------------------------------------------------------------------ optimisation (see optimisation.py)
    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer param group per block group (plus the shared stem), named for LR monitors."""
        return param_groups(self.network)

    @override
    def configure_optimizers(self) -> Optimizer:
        return self.optimisation.configure_optimizer()

    def param_group_owners(self, opt: Optimizer) -> list[int]:
        """The block group (or SHARED) owning each of ``opt``'s param groups; refuses a mixed or incomplete one."""
        return self.optimisation.owners(opt)

    def lr_factor(self, step: int, horizon: float) -> float:
        """Linear warmup, then constant or cosine decay to ``min_lr_ratio``, in a group's own steps."""
        return self.optimisation.lr_factor(step, horizon)

    # ------------------------------------------------------------------ fit set-up
    @override
    def configure_callbacks(self) -> list[L.Callback]:
        check_trainer_options(self._trainer)  # before Lightning's own check, so our message replaces its generic one
        return [TrainingDataCheck()]

    @override
    def on_fit_start(self) -> None:
        blockwise = self._schedule is not None
        check_training_kind(self, blockwise)
        self.trained_blockwise.fill_(blockwise)
        if self.trainer.precision == "16-mixed" and self.hparams.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val with precision='16-mixed' is not supported; use precision='bf16-mixed'."
            )
        if self.state_store is not None:
            self.state_store.check_fit(self.network, self.trainer.world_size)
        self._loss_log = GroupLossLog(self._loss_log.running)  # points a crashed fit left waiting: its own rows
        log_run_config(self.trainer, self)  # partition, σ ranges, schedule, task and network: plain data

    @override
    def on_train_start(self) -> None:
        self.optimisation.start()

    # ------------------------------------------------------------------ steps
    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(self.hparams.seed + salt, step))
        return gen

    def sigma_range(self, group: int | None) -> tuple[float, float]:
        noise = self.task.noise
        return (noise.sigma_min, noise.sigma_max) if group is None else self.ranges[group]

    def nominal_range(self, group: int) -> tuple[float, float]:
        """The levels ``group`` owns, without overlap."""
        b = self.num_blocks
        return float(self.boundaries[b - 1 - group]), float(self.boundaries[b - group])

    def group_loss(
        self,
        network: BlockwiseNetwork,
        batch: Any,
        group: int | None,
        generator: torch.Generator,
        sigma_range: tuple[float, float] | None = None,
    ) -> Tensor:
        """Mean weighted loss of ``group`` (None: whole network) on σ drawn from its range."""
        lo, hi = sigma_range or self.sigma_range(group)
        n = self.task.batch_size(batch)
        sigma = self.task.noise.sample(n, lo, hi, generator=generator, device=self.device)
        return self.task.loss(partial(network, group=group), batch, sigma, generator).mean()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        step = int(self.step_count)
        group = self.group_at(step)
        self.task.observe(batch)
        opt = self.optimizers()
        if self.state_store is not None:  # this step's group in fp32, every other one stored
            self.state_store.activate(group)
        # each process draws its own noise for its own shard (rank 0's stream is the single-device one), and each
        # micro-batch of an accumulated step its own (the first one the plain step's)
        salt = RANK_SALT * self.global_rank + MICRO_SALT * self.optimisation.micro
        loss = self.group_loss(self.network, batch, group, self._generator(step, salt=salt))
        if not torch.isfinite(loss):
            raise non_finite_loss(loss, step, group, self.sigma_range(group))
        trained = list(range(self.num_blocks)) if group is None else [group]
        self.last_group = group
        mean = self.optimisation.accumulate(opt, loss, trained, self._reduce_gradients)
        if mean is None:  # micro-batches of this optimizer step are still to come
            return loss.detach()
        self._loss_log.log_step(self.trainer, self.log, group, self.group_steps, mean)
        return mean.detach()

    @override
    def on_train_end(self) -> None:
        # the points since the last logging row, then the table of σ ranges, steps, parameters and memory
        self._loss_log.flush(self.trainer)
        self._uniform_weights()  # the model leaves training an ordinary fp32 model
        log_group_summary(self.trainer, self)

    def _evaluation_step(self, stage: str, batch: Any, batch_idx: int) -> Tensor:
        """Loss in each group's nominal noise range (routed by how the model was trained), then task metrics."""
        self._uniform_weights()
        n = self.task.batch_size(batch)
        sync = self.trainer.world_size > 1  # every process logs the same keys; their shards are averaged
        losses = []
        for g in range(self.num_blocks):
            gen = self._generator(batch_idx, salt=1000 + g)
            run_group = g if self.blockwise else None
            with torch.no_grad():
                loss = self.group_loss(self.sampling_network, batch, run_group, gen, self.nominal_range(g))
            self.log(f"{stage}/loss_group_{g}", loss, batch_size=n, sync_dist=sync)
            losses.append(loss)
        total = torch.stack(losses).mean()
        self.log(f"{stage}/loss", total, prog_bar=True, batch_size=n, sync_dist=sync)
        with self.evaluating() as router:
            metrics = self.task.validation_metrics(router, batch, batch_idx)
        for name, value in metrics.items():
            shown = name in self.task.progress_metrics
            self.log(f"{stage}/{name}", value, prog_bar=shown, batch_size=n, sync_dist=sync)
        return total

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluation_step("val", batch, batch_idx)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._evaluation_step("test", batch, batch_idx)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The task's prediction: samples for labels (generation), class probabilities (classification),
        per-sequence metrics (language models)."""
        with self.evaluating() as router:
            return self.task.predict_step(router, batch, batch_idx)

    # ------------------------------------------------------------------ checkpoints (see checkpoint_record.py)
    def partition_info(self) -> dict[str, Any]:
        return checkpoint_record.partition_info(self)

    def training_settings(self) -> dict[str, Any]:
        """The module's settings a resume must keep (recorded in checkpoints, checked by the strategy)."""
        return checkpoint_record.training_settings(self)

    def missing_groups(self) -> list[int]:
        """Groups whose weights are not in memory (e.g. offloaded and not read back)."""
        return checkpoint_record.missing_groups(self)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint_record.save_record(self, checkpoint)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._uniform_weights()  # copying into a stored (bf16) parameter would round the loaded weights
        checkpoint_record.load_record(self, checkpoint)

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        hparams_file: str | Path | None = None,
        strict: bool | None = None,
        trusted: Sequence[str] = (),
        **kwargs: Any,
    ) -> DiffusionBlocksModule:
        """Rebuild the module, its network and its task from a checkpoint, with torch's safe unpickler.

        The network and task are rebuilt from the checkpoint's record when it has their constructor arguments
        and every class it names, at any depth, comes from this package or from a module prefix in ``trusted``
        (importing a class runs its module's code); otherwise one error says what to pass (``net=`` / ``task=``,
        ``trusted=[...]``). Nothing else in the file is ever imported: a ``class_path`` among its hyper-parameters
        follows the same rule.
        """
        trusted = tuple(trusted)
        kwargs = checkpoint_record.rebuild_arguments(
            checkpoint_path, kwargs, trusted, f"{cls.__name__}.load_from_checkpoint"
        )
        with trusting(trusted):  # Lightning passes the file's hyper-parameters to __init__: the file's rule holds
            return super().load_from_checkpoint(  # type: ignore[return-value]
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                weights_only=True, **kwargs,
            )  # fmt: skip
