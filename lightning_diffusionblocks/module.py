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
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint
from lightning_diffusionblocks.dashboard import GroupLossLog, log_group_summary, log_run_config, show_in_progress_bar
from lightning_diffusionblocks.noise import Partition
from lightning_diffusionblocks.partition import BlockwiseNetwork, StemMode
from lightning_diffusionblocks.records import (
    RecordError,
    build,
    building_trust,
    class_paths,
    explain_rebuild,
    is_plain,
    record_of,
    top_package,
    trusting,
)
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.schedules import Schedule, step_seed
from lightning_diffusionblocks.tasks.base import Task

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
#: the owner of an optimizer param group: a block group's index, or SHARED for the shared stem/head
SHARED = -1
MAX_GAMMA = 0.5
RANK_SALT = 1_000_003
MICRO_SALT = 101  #: seed salt of the j-th micro-batch of an accumulated step (j = 0 draws the plain step's noise)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops before the bad step touches any weight."""


def warmup_cosine(step: int, warmup: int, horizon: float, min_ratio: float = 0.1) -> float:
    """LR factor at ``step``: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``horizon``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(horizon - warmup, 1.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _check_options(num_blocks: Any, gamma: float, lr: float, warmup_steps: int, min_lr_ratio: float) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an integer number of groups, got {num_blocks!r}.")
    if not 0.0 <= gamma < MAX_GAMMA:
        raise ValueError(
            f"gamma={gamma} is outside [0, {MAX_GAMMA}): the overlap widens each group's range by gamma x its log-width"
            f" on both sides, so gamma >= {MAX_GAMMA} lets neighbouring ranges swallow each other and removes the"
            " partition. The paper uses 0.05 (0.1 in its ablation)."
        )
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")


class DiffusionBlocksModule(L.LightningModule):
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
    ) -> None:
        super().__init__()
        net = _built(net, "net", nn.Module)
        task = _built(task, "task", Task)
        if not isinstance(task, Task):
            raise TypeError(
                f"task must be a lightning_diffusionblocks Task (e.g. ImageGeneration()), got {type(task)}."
            )
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module with a block stack, got {type(net).__name__}.")
        _check_options(num_blocks, gamma, lr, warmup_steps, min_lr_ratio)
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}.")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be positive or None, got {gradient_clip_val}.")
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int):
            raise TypeError(f"accumulate_grad_batches must be a positive integer, got {accumulate_grad_batches!r}.")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be a positive integer, got {accumulate_grad_batches}.")
        self.save_hyperparameters(ignore=["net", "task", "optimizer"])
        self.automatic_optimization = False
        self.task = task
        task.bind(net)  # first: a network made for another task is named as such, before any of its own checks
        check_stem = getattr(net, "diffusionblocks_check_stem", None)
        if callable(check_stem):  # the network knows which of its parts must not be copied per group
            check_stem(stem)
        self.network = BlockwiseNetwork(net, num_blocks, group_sizes, block_path, stem)
        self.boundaries = task.noise.boundaries(num_blocks, partition)
        self.ranges = [task.noise.group_range(self.boundaries, g, gamma) for g in range(num_blocks)]
        self.ema_network = copy.deepcopy(self.network).requires_grad_(False) if ema_decay else None
        self.optimizer_factory = optimizer
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
        self._owners: tuple[int, list[int]] | None = None
        #: per-group training-loss points waiting for a logging row, and each group's running loss (progress bar)
        self._loss_log = GroupLossLog()
        self._running_loss: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        return self.network.num_groups

    @property
    def blockwise(self) -> bool:
        """True when each noise level is served by its own group (the model was, or is being, trained block-wise)."""
        return bool(self.trained_blockwise)

    @property
    def sampling_network(self) -> BlockwiseNetwork:
        return self.ema_network if self.ema_network is not None else self.network

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

    # ------------------------------------------------------------------ routing and evaluation
    def router(self, network: BlockwiseNetwork | None = None) -> Router:
        """Noise level → the runner of its group (one entry for an end-to-end model)."""
        network = self.sampling_network if network is None else network
        boundaries = self.boundaries if self.blockwise else None
        return Router(lambda group: partial(network, group=group), self.task.noise, boundaries, self.device)

    @contextmanager
    def evaluating(self) -> Iterator[Router]:
        """Eval mode and no gradients for the sampling network (EMA if any); yields its router."""
        network = self.sampling_network
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                yield self.router(network)
        finally:
            network.train(was_training)

    def _infer(self, call: str, *args: Any, **kwargs: Any) -> Any:
        if call not in self.task.inference:
            raise self.task.unsupported(call)
        with self.evaluating() as router:
            return getattr(self.task, call)(router, *args, **kwargs)

    def sample(
        self,
        labels: Tensor | Sequence[int] | None = None,
        num_samples: int | None = None,
        steps: int = 50,
        guidance: float = 1.0,
        seed: int = 0,
        shape: Sequence[int] | None = None,
        clip: bool | tuple[float, float] = False,
    ) -> Tensor:
        """Generate images, each σ step served by its group (see :meth:`ImageGeneration.sample`)."""
        return self._infer(
            "sample", labels=labels, num_samples=num_samples, steps=steps, guidance=guidance, seed=seed, shape=shape,
            clip=clip,
        )  # fmt: skip

    def predict_proba(self, inputs: Tensor, steps: int | None = None, seed: int = 0) -> Tensor:
        """Class probabilities; ``steps`` σ steps chosen now, default B (one per group)."""
        return self._infer("predict_proba", inputs, steps=steps, seed=seed)

    def generate(self, prompt: Tensor | Sequence[int] | None = None, **kwargs: Any) -> Tensor:
        """Generate token ids with a language-model task; every diffusion step calls only its group.

        Autoregressive: ``generate(prompt, max_new_tokens=32, steps=B, temperature=0.0, seed=0)``. Masked:
        ``generate(prompt=None, num_samples=1, length=context, steps=4·B, temperature=1.0, seed=0)``.
        """
        return self._infer("generate", prompt, **kwargs)

    def evaluate_batch(self, batch: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-sequence language-model metrics of one batch, every noise level routed to its group.

        Masked: ``nelbo``/``bits_per_token`` from ``samples`` masking times (default 2·B). Autoregressive:
        ``ce_sigma_max``, ``ce_chain`` and ``accuracy_chain`` after ``steps`` σ steps (default B), and
        ``accuracy_step_{i}`` after each step i of the chain.
        """
        return self._infer("evaluate_batch", batch, **{k: v for k, v in kwargs.items() if v is not None})

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer param group per block group (plus the shared stem), named for LR monitors."""
        groups = [{"params": self.network.group_parameters(g), "name": f"group_{g}"} for g in range(self.num_blocks)]
        shared = self.network.shared_parameters()
        if shared:
            groups.append({"params": shared, "name": "shared"})
        return groups

    @override
    def configure_optimizers(self) -> Optimizer:
        groups = self.param_groups()
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        else:
            hp = self.hparams
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        return opt

    def param_group_owners(self, opt: Optimizer) -> list[int]:
        """The block group (or SHARED) owning each of ``opt``'s param groups, found by parameter identity.

        Refuses a param group that mixes two groups' parameters and trainable parameters no group holds.
        """
        if self._owners is not None and self._owners[0] == id(opt):
            return self._owners[1]
        owner_of = {id(p): g for g in range(self.num_blocks) for p in self.network.group_parameters(g)}
        owner_of.update({id(p): SHARED for p in self.network.shared_parameters()})
        names = {id(p): n for n, p in self.network.named_parameters()}
        owners: list[int] = []
        seen: set[int] = set()
        for i, pg in enumerate(opt.param_groups):
            found = {owner_of[id(p)] for p in pg["params"] if id(p) in owner_of}
            label = f"param group {i}" + (f" ({pg['name']!r})" if "name" in pg else "")
            stray = next((p for p in pg["params"] if id(p) not in owner_of), None)
            if stray is not None:
                raise MisconfigurationException(
                    f"The optimizer's {label} holds a tensor that is not a parameter of the network"
                    f" ({names.get(id(stray), tuple(stray.shape))}); build the optimizer from the param groups"
                    " DiffusionBlocksModule passes to the optimizer factory."
                )
            if len(found) > 1:
                which = ", ".join("shared" if g == SHARED else f"group_{g}" for g in sorted(found))
                raise MisconfigurationException(
                    f"The optimizer's {label} mixes parameters of {which}. Per-group learning rates, clipping and"
                    " EMA need each param group inside one block group: split each group the factory receives"
                    " (e.g. into decay / no-decay) instead of regrouping across them."
                )
            owners.append(found.pop() if found else SHARED)
            seen.update(id(p) for p in pg["params"])
            pg.setdefault("base_lr", pg["lr"])
        trainable = {id(p) for p in self.network.parameters() if p.requires_grad}
        missing = [names.get(pid, "?") for pid in owner_of if pid not in seen and pid in trainable]
        if missing:
            raise MisconfigurationException(
                f"The optimizer does not hold {len(missing)} trainable parameters of the network (e.g. {missing[:3]});"
                " give every param group the factory receives to the optimizer."
            )
        self._owners = (id(opt), owners)
        return owners

    def lr_factor(self, step: int, horizon: float) -> float:
        """Linear warmup, then constant or cosine decay to ``min_lr_ratio``, in a group's own steps."""
        hp = self.hparams
        if hp.lr_schedule == "constant" and not (hp.warmup_steps and step < hp.warmup_steps):
            return 1.0
        return warmup_cosine(step, hp.warmup_steps, horizon, hp.min_lr_ratio)

    def _set_learning_rates(self, opt: Optimizer) -> None:
        """Give every param group the learning rate of its group's next step (its own step count), so that the
        optimizer, and an LR monitor reading it before the step, hold the rate actually used."""
        steps, horizons = self.group_steps.tolist(), self.lr_horizons.tolist()
        for pg, owner in zip(opt.param_groups, self.param_group_owners(opt)):
            if owner == SHARED:  # shared stem: trained every step
                pg["lr"] = pg["base_lr"] * self.lr_factor(int(self.step_count), horizons[-1])
            else:
                pg["lr"] = pg["base_lr"] * self.lr_factor(steps[owner], horizons[owner])

    def _clip(self, trained: Iterable[int]) -> None:
        clip = self.hparams.gradient_clip_val
        if not clip:
            return
        param_sets = [self.network.group_parameters(g) for g in trained] + [self.network.shared_parameters()]
        for params in param_sets:
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, clip)

    @torch.no_grad()
    def _update_ema(self, trained: Sequence[int]) -> None:
        if self.ema_network is None:
            return
        steps = self.group_steps.tolist()
        for g in trained:
            decay = min(self.hparams.ema_decay, (1 + steps[g]) / (10 + steps[g]))
            ema, live = self.ema_network.group_parameters(g), self.network.group_parameters(g)
            torch._foreach_lerp_(ema, [p.detach() for p in live], 1.0 - decay)
        shared_ema, shared = self.ema_network.shared_parameters(), self.network.shared_parameters()
        if shared:
            step = int(self.step_count)
            decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(shared_ema, [p.detach() for p in shared], 1.0 - decay)
        for ema_b, live_b in zip(self.ema_network.buffers(), self.network.buffers()):
            ema_b.copy_(live_b)

    # ------------------------------------------------------------------ fit set-up
    @override
    def configure_callbacks(self) -> list[L.Callback]:
        # runs before Lightning checks the loop configuration, so our message replaces its generic one
        trainer = self._trainer
        if trainer is not None and trainer.gradient_clip_val:
            raise MisconfigurationException(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) does not apply: DiffusionBlocksModule"
                " optimises one group at a time (manual optimisation) and clips each group on its own. Remove it"
                f" from the Trainer and pass DiffusionBlocksModule(..., gradient_clip_val={trainer.gradient_clip_val})."
            )
        if trainer is not None and trainer.accumulate_grad_batches != 1:
            k = trainer.accumulate_grad_batches
            raise MisconfigurationException(
                f"Trainer(accumulate_grad_batches={k}) does not apply: DiffusionBlocksModule optimises manually,"
                " one group per step, and Lightning accumulates only automatic optimisation. Remove it from the"
                f" Trainer and pass DiffusionBlocksModule(..., accumulate_grad_batches={k}): the module sums {k}"
                " micro-batches for the same group before each optimizer step."
            )
        return [_TrainingDataCheck()]

    @override
    def on_fit_start(self) -> None:
        blockwise = self._schedule is not None
        strategy = type(self.trainer.strategy).__name__
        if not blockwise and self.trainer.world_size > 1 and self.num_blocks > 1:
            # a multi-process strategy of Lightning's own: every process would train the whole network end to end
            # (with num_blocks=1 that is what block-wise training is, so e.g. an end-to-end DDP baseline may run)
            world = self.trainer.world_size
            raise MisconfigurationException(
                f"DiffusionBlocksModule is being fit by {strategy} over {world} processes, a strategy that hands it no"
                " DiffusionBlocks schedule: every process would train the whole network end to end (not block-wise),"
                " and DDP's wrapper cannot serve a step that trains one group. Use"
                f' Trainer(strategy="diffusionblocks", devices={world}) for block-wise data-parallel training, or'
                ' strategy="auto" on one device for the end-to-end baseline (a multi-process end-to-end baseline:'
                " the same network with num_blocks=1)."
            )
        if not blockwise:
            rank_zero_info(
                f"DiffusionBlocks: training end to end ({strategy}): every group on the full noise range. Use"
                " strategy='diffusionblocks' for block-wise training."
            )
        if int(self.step_count) > 0 and blockwise != self.blockwise:
            before = "block-wise" if self.blockwise else "end to end"
            now = "block-wise" if blockwise else "end to end (strategy without a DiffusionBlocks schedule)"
            strategy = "'diffusionblocks'" if self.blockwise else "'auto'"
            raise MisconfigurationException(
                f"This module was trained {before} for {int(self.step_count)} steps and would now be trained {now};"
                f" its routing would silently change. Fit it with the strategy it was trained with"
                f" (strategy={strategy}), or build a fresh DiffusionBlocksModule for the other kind of training."
            )
        self.trained_blockwise.fill_(blockwise)
        if self.trainer.precision == "16-mixed" and self.hparams.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val with precision='16-mixed' is not supported; use precision='bf16-mixed'."
            )
        self._loss_log = GroupLossLog()  # points a crashed fit left waiting belong to its own rows
        log_run_config(self.trainer, self)  # partition, σ ranges, schedule, task and network: plain data

    @override
    def on_train_start(self) -> None:
        self._micro, self._accumulated = 0, None  # a fit (or a resume) starts at an optimizer-step boundary
        self._horizons()
        if self.trainer.optimizers:
            self._set_learning_rates(self.trainer.optimizers[0])

    def _optimizer_steps(self) -> float:
        """The optimizer steps this fit will take (Lightning's estimate counts batches once we accumulate)."""
        trainer, k = self.trainer, self.hparams.accumulate_grad_batches
        if k == 1:
            return float(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        batches = float(trainer.num_training_batches) * epochs
        limit = trainer.max_steps if trainer.max_steps != -1 else math.inf
        total = min(math.ceil(batches / k) if math.isfinite(batches) else math.inf, limit)
        return float(total) if math.isfinite(total) else float(trainer.estimated_stepping_batches)

    def _horizons(self) -> None:
        recompute, self.recompute_horizons = getattr(self, "recompute_horizons", False), False
        if recompute:  # resumed under another layout or schedule: each group's share of the steps left, from now
            left = max(self._optimizer_steps() - self.trainer.global_step, 0.0)
            per_group = left if self._schedule is None else self._schedule.expected_steps(left)
            horizons = [float(s) + per_group for s in self.group_steps] + [float(self.step_count) + left]
            self.lr_horizons.copy_(torch.tensor(horizons, dtype=torch.float64).clamp_(min=1.0))
            return
        if self.trainer.global_step > 0 and bool(self.lr_horizons.any()):
            return  # a resumed run keeps the horizons it started with (same layout and schedule: checked)
        total = self._optimizer_steps()
        per_group = total if self._schedule is None else self._schedule.expected_steps(total)
        horizons = [float(s) + per_group if self.trainer.global_step == 0 else per_group for s in self.group_steps]
        horizons.append(float(self.step_count) + total)
        self.lr_horizons.copy_(torch.tensor(horizons, dtype=torch.float64).clamp_(min=1.0))

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
        step, k = int(self.step_count), self.hparams.accumulate_grad_batches
        micro = getattr(self, "_micro", 0)  # this batch's place in an accumulated optimizer step
        group = self.group_at(step)
        self.task.observe(batch)
        opt = self.optimizers()
        # each process draws its own noise for its own shard (rank 0's stream is the single-device one), and each
        # micro-batch of an accumulated step its own (the first one the plain step's)
        salt = RANK_SALT * self.global_rank + MICRO_SALT * micro
        loss = self.group_loss(self.network, batch, group, self._generator(step, salt=salt))
        if not torch.isfinite(loss):
            lo, hi = self.sigma_range(group)
            which = "the whole network (end-to-end)" if group is None else f"group {group}"
            raise NonFiniteLossError(
                f"Loss is {loss.item()} at step {step} while training {which} on sigma in [{lo:.4g}, {hi:.4g}]."
                " Training stopped before this step changed any weight; the last saved checkpoint is intact."
                " Lower `lr`, set `gradient_clip_val`, or check the data for NaNs."
            )
        trained = list(range(self.num_blocks)) if group is None else [group]
        self.last_group = group
        if micro == 0:
            opt.zero_grad(set_to_none=True)
            self._accumulated = torch.zeros((), device=loss.device)
        self.manual_backward(loss / k if k > 1 else loss)
        self._accumulated = self._accumulated + loss.detach()
        if micro + 1 < k:
            self._micro = micro + 1
            return loss.detach()
        self._micro = 0
        loss = self._accumulated / k  # the mean over the step's micro-batches, for the logs
        if self._reduce_gradients is not None:
            shared = self.network.shared_parameters()
            self._reduce_gradients([p for g in trained for p in self.network.group_parameters(g)] + shared)
        self._clip(trained)
        self._set_learning_rates(opt.optimizer)
        opt.step()
        self.group_steps[trained] += 1
        self.step_count += 1
        self._update_ema(trained)
        self._set_learning_rates(opt.optimizer)  # the next step's rates, where LR monitors read them
        self._log_training_step(group, loss)
        return loss.detach()

    # ------------------------------------------------------------------ dashboard
    #: weight of the newest step in the running loss shown in the progress bar (per group)
    RUNNING_LOSS_WEIGHT = 0.1

    def _log_training_step(self, group: int | None, loss: Tensor) -> None:
        """Log one optimizer step: ``train/loss`` (every step's loss, whichever group) through ``self.log``, and the
        group's own point through :class:`~lightning_diffusionblocks.dashboard.GroupLossLog`, at this step only.

        Through ``self.log`` the loggers would get ``train/loss_group_{g}`` of every group on every logging row
        (inactive groups repeating a stale value) and lose the steps between rows, so the loggers' per-group points
        bypass it. Callbacks still see each group's latest loss: it goes through ``self.log`` with ``logger=False``,
        so ``trainer.callback_metrics`` (what ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read) holds
        ``train/loss_group_{g}`` of every group trained so far. The progress bar shows the active group (a string:
        Rich prints numbers as ``2.000``) and its running loss ``loss_g``.
        """
        loss = loss.detach()
        self.log("train/loss", loss, prog_bar=group is None)
        if group is None:
            return
        self._loss_log.check_monitors(self.trainer)  # under block parallel a process has only its own groups' keys
        self.log(f"train/loss_group_{group}", loss, logger=False)
        running = self._running_loss.get(group)
        running = loss.float() if running is None else torch.lerp(running, loss.float(), self.RUNNING_LOSS_WEIGHT)
        self._running_loss[group] = running
        self.log("loss_g", running, prog_bar=True, logger=False)
        show_in_progress_bar(self.trainer, "group", str(group))
        self._loss_log.add(self.trainer, group, self.group_steps[group], loss)

    @override
    def on_train_end(self) -> None:
        # the points since the last logging row, then the table of σ ranges, steps, parameters and memory
        self._loss_log.flush(self.trainer)
        log_group_summary(self.trainer, self)

    def _evaluation_step(self, stage: str, batch: Any, batch_idx: int) -> Tensor:
        """Loss in each group's nominal noise range (routed by how the model was trained), then task metrics."""
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

    # ------------------------------------------------------------------ checkpoints
    def partition_info(self) -> dict[str, Any]:
        return {
            "groups": self.network.groups,
            "stem": self.network.stem_mode,
            "block_path": self.network.block_path,
            "boundaries": self.boundaries.tolist(),
        }

    def training_settings(self) -> dict[str, Any]:
        """The module's settings a resume must keep (recorded in checkpoints, checked by the strategy)."""
        hp = self.hparams
        return {
            "seed": hp.seed, "gamma": hp.gamma, "partition": hp.partition,
            "accumulate_grad_batches": hp.accumulate_grad_batches,
        }  # fmt: skip

    def missing_groups(self) -> list[int]:
        """Groups whose weights are not in memory (e.g. offloaded and not read back)."""
        missing = []
        for g in range(self.num_blocks):
            params = list(self.network.group_parameters(g))
            if self.ema_network is not None:
                params += self.ema_network.group_parameters(g)
            if any(p.numel() == 0 for p in params):
                missing.append(g)
        return missing

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if getattr(self, "_micro", 0):
            rank_zero_warn(
                f"A checkpoint is being saved after {self._micro} of {self.hparams.accumulate_grad_batches}"
                " accumulated micro-batches; their gradients are not saved, so a resume from it starts that"
                " optimizer step afresh. Save at optimizer steps (ModelCheckpoint(every_n_train_steps=...)) for"
                " exact resumes."
            )
        missing = self.missing_groups()
        if missing:
            raise RuntimeError(
                f"Refusing to write a checkpoint: the weights of group(s) {missing} are not in memory (their"
                " offloaded copies could not be read back), so it would hold empty tensors. Resume from the last"
                " complete checkpoint."
            )
        record = {
            **self.partition_info(),
            "training": self.training_settings(),
            "blockwise": self.blockwise,
            "net": record_of(self.network.net),
            "task": record_of(self.task),
            "task_state": self.task.state(),
        }
        if not is_plain(record):  # anything else would need the unrestricted unpickler to load
            record["net"] = record["task"] = None
        checkpoint["diffusionblocks"] = record
        hparams = checkpoint.get("hyper_parameters")
        if hparams is not None and not is_plain(dict(hparams)):
            rank_zero_warn(
                "Some hyper-parameters are not plain data (e.g. an OmegaConf config or a Path); they are saved as"
                " strings so the checkpoint stays loadable with weights_only=True."
            )
            checkpoint["hyper_parameters"] = _plain(dict(hparams))
            checkpoint.pop("hparams_type", None)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        has_ema = any(k.startswith("ema_network.") for k in state)
        if state and has_ema != (self.ema_network is not None):
            raise CheckpointLoadError(
                f"The checkpoint was trained {'with' if has_ema else 'without'} an EMA copy of the weights but this"
                f" module has ema_decay={self.hparams.ema_decay}. Build it with"
                f" {'ema_decay=<the decay used in training>' if has_ema else 'ema_decay=None'} to load it."
            )
        if state:  # checkpoints of 0.1 lack the counters added since
            state.setdefault("step_count", state.get("group_steps", self.group_steps).max().clone())
            state.setdefault("lr_horizons", torch.zeros_like(self.lr_horizons))
        saved = checkpoint.get("diffusionblocks")
        if saved is None:
            rank_zero_warn("The checkpoint has no DiffusionBlocks partition record; loading it as is.")
            return
        mine = self.partition_info()
        for key in ("groups", "stem", "block_path"):
            if saved[key] != mine[key]:
                raise ValueError(
                    f"The checkpoint was made with {key}={saved[key]!r} but this module has {key}={mine[key]!r}."
                    f" Build the module with the checkpoint's partition (num_blocks={len(saved['groups'])},"
                    f" group_sizes={[len(g) for g in saved['groups']]}, stem={saved['stem']!r}) to resume from it."
                )
        if not torch.allclose(torch.tensor(saved["boundaries"], dtype=torch.float64), self.boundaries, rtol=1e-6):
            raise ValueError(
                f"The checkpoint's noise boundaries {saved['boundaries']} differ from this module's"
                f" {self.boundaries.tolist()}; use the same `partition` and noise schedule to resume."
            )
        self.task.load_state(saved.get("task_state") or {})

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
        for what, expected in (("net", nn.Module), ("task", Task)):
            if isinstance(kwargs.get(what), dict):  # the caller's own config (built before the file's rule applies)
                kwargs[what] = _built(kwargs[what], what, expected)
        missing = [what for what in ("net", "task") if what not in kwargs]
        if missing:
            checkpoint = read_checkpoint(checkpoint_path)
            record = checkpoint.get("diffusionblocks") if isinstance(checkpoint, dict) else None
            record = record if isinstance(record, dict) else {}
            call = f"{cls.__name__}.load_from_checkpoint"
            problem = explain_rebuild(str(checkpoint_path), {w: record.get(w) for w in missing}, trusted, call)
            if problem is not None:
                raise CheckpointLoadError(problem)
            for what, expected in (("net", nn.Module), ("task", Task)):
                if what in missing:
                    try:
                        kwargs[what] = build(record[what], what, trusted, expected)
                    except RecordError as err:
                        raise CheckpointLoadError(str(err)) from err
        with trusting(trusted):  # Lightning passes the file's hyper-parameters to __init__: the file's rule holds
            return super().load_from_checkpoint(  # type: ignore[return-value]
                checkpoint_path, map_location=map_location, hparams_file=hparams_file, strict=strict,
                weights_only=True, **kwargs,
            )  # fmt: skip


class _TrainingDataCheck(L.Callback):
    """Refuse a fit that ran no training step because its training data had no batch (Lightning only warns)."""

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.limit_train_batches != 0 and trainer.num_training_batches == 0 and not trainer.interrupted:
            raise MisconfigurationException(
                "The training dataloader has no batches (len(train_dataloader) == 0), so fit ran no training step."
                " Check that the training set is not empty and that batch_size is at most its size when"
                " drop_last=True (with several processes each one gets len(dataset) / world_size samples), e.g."
                " DataLoader(dataset, batch_size=min(batch_size, len(dataset)))."
            )


def _plain(value: Any) -> Any:
    """``value`` with every leaf that is not plain data replaced by its string (for hyper-parameters)."""
    if is_plain(value):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _built(value: Any, what: str, expected: type) -> Any:
    """A ``{"class_path", "init_args"}`` dict is built. One the caller wrote is their own config: the packages it
    names are trusted. One met while a checkpoint's record is being rebuilt (``records.trusting``: the record nests
    a module whose argument is such a dict, or the checkpoint's hyper-parameters hold one) came from the file: only
    this package and the packages the caller trusted are imported."""
    if isinstance(value, dict) and "class_path" in value:
        record = {"class_path": value["class_path"], "init_args": value.get("init_args", {})}
        from_record = building_trust()
        trusted = from_record if from_record is not None else [top_package(p) for p in class_paths(value)]
        return build(record, what, trusted=trusted, expected=expected)
    return value
