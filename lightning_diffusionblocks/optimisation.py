"""Optimisation of a block-wise module, one group at a time: param groups and their owners, learning rates counted in
each group's own steps (warmup, cosine decay to a horizon), per-group gradient clipping and the EMA of the weights.

:class:`GroupOptimisation` is held by :class:`~lightning_diffusionblocks.module.DiffusionBlocksModule` and reads
the module's settings and counters (``group_steps``, ``step_count``, ``lr_horizons``) when called, so a device move
or a checkpoint load, which replace the module's buffers, are always seen. The pure pieces (``warmup_cosine``,
``lr_factor``, ``param_groups``, ``param_group_owners``) take only what they need.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer

from lightning_diffusionblocks.partition import BlockwiseNetwork
from lightning_diffusionblocks.precision import adamw_8bit

if TYPE_CHECKING:
    from lightning_diffusionblocks.module import DiffusionBlocksModule

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
#: the owner of an optimizer param group: a block group's index, or SHARED for the shared stem/head
SHARED = -1


def warmup_cosine(step: int, warmup: int, horizon: float, min_ratio: float = 0.1) -> float:
    """LR factor at ``step``: linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``horizon``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(max(step - warmup, 0) / max(horizon - warmup, 1.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(
    step: int, horizon: float, schedule: Literal["constant", "cosine"], warmup_steps: int, min_lr_ratio: float
) -> float:
    """Linear warmup, then constant or cosine decay to ``min_lr_ratio`` at ``horizon``, in a group's own steps."""
    if schedule == "constant" and not (warmup_steps and step < warmup_steps):
        return 1.0
    return warmup_cosine(step, warmup_steps, horizon, min_lr_ratio)


def check_settings(
    lr: float,
    warmup_steps: int,
    lr_schedule: str,
    min_lr_ratio: float,
    gradient_clip_val: float | None,
    ema_decay: float | None,
    accumulate_grad_batches: int,
) -> None:
    """Refuse optimisation settings that would train wrongly, naming the accepted values."""
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}.")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
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


def param_groups(network: BlockwiseNetwork) -> list[dict[str, Any]]:
    """One optimizer param group per block group (plus the shared stem), named for LR monitors."""
    groups = [{"params": network.group_parameters(g), "name": f"group_{g}"} for g in range(network.num_groups)]
    shared = network.shared_parameters()
    if shared:
        groups.append({"params": shared, "name": "shared"})
    return groups


def param_group_owners(opt: Optimizer, network: BlockwiseNetwork) -> list[int]:
    """The block group (or SHARED) owning each of ``opt``'s param groups, found by parameter identity.

    Refuses a param group that mixes two groups' parameters and trainable parameters no group holds. Gives each
    param group a ``base_lr`` (its ``lr`` when first seen), which the schedules scale.
    """
    owner_of = {id(p): g for g in range(network.num_groups) for p in network.group_parameters(g)}
    owner_of.update({id(p): SHARED for p in network.shared_parameters()})
    names = {id(p): n for n, p in network.named_parameters()}
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
    trainable = {id(p) for p in network.parameters() if p.requires_grad}
    missing = [names.get(pid, "?") for pid in owner_of if pid not in seen and pid in trainable]
    if missing:
        raise MisconfigurationException(
            f"The optimizer does not hold {len(missing)} trainable parameters of the network (e.g. {missing[:3]});"
            " give every param group the factory receives to the optimizer."
        )
    return owners


class GroupOptimisation:
    """The optimizer, learning rates, clipping and EMA of ``module``, one block group per step."""

    def __init__(self, module: DiffusionBlocksModule) -> None:
        self.module = module
        self._owners: tuple[int, list[int]] | None = None  # (id of the optimizer, its owners): checked once
        #: this batch's place in an accumulated optimizer step, and the sum of the step's micro-batch losses so far
        self.micro = 0
        self.accumulated: Tensor | None = None

    @property
    def settings(self) -> Any:
        """The module's hyper-parameters (Lightning types them as a mapping; they are read as attributes)."""
        return self.module.hparams

    def start(self) -> None:
        """A fit (or a resume) starts at an optimizer-step boundary, with its LR horizons and its first rates."""
        self.micro, self.accumulated = 0, None
        self.set_horizons()
        if self.module.trainer.optimizers:
            self.set_learning_rates(self.module.trainer.optimizers[0])

    def configure_optimizer(self) -> Optimizer:
        """The module's optimizer factory (AdamW with the module's settings by default) over :func:`param_groups`."""
        module = self.module
        groups = param_groups(module.network)
        if module.optimizer_factory is not None:
            return module.optimizer_factory(groups)
        hp = self.settings
        precision = module.state_precision
        if precision.moments == "8bit":  # bitsandbytes' block-wise 8-bit AdamW, same settings
            return adamw_8bit(groups, hp.lr, tuple(hp.betas), hp.weight_decay, precision.min_8bit_size)
        return torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def owners(self, opt: Optimizer) -> list[int]:
        """:func:`param_group_owners` of ``opt``, worked out once per optimizer."""
        if self._owners is None or self._owners[0] != id(opt):
            self._owners = (id(opt), param_group_owners(opt, self.module.network))
        return self._owners[1]

    def lr_factor(self, step: int, horizon: float) -> float:
        """:func:`lr_factor` with the module's ``lr_schedule``, ``warmup_steps`` and ``min_lr_ratio``."""
        hp = self.settings
        return lr_factor(step, horizon, hp.lr_schedule, hp.warmup_steps, hp.min_lr_ratio)

    def set_learning_rates(self, opt: Optimizer) -> None:
        """Give every param group the learning rate of its group's next step (its own step count), so that the
        optimizer, and an LR monitor reading it before the step, hold the rate actually used."""
        module = self.module
        steps, horizons = module.group_steps.tolist(), module.lr_horizons.tolist()
        for pg, owner in zip(opt.param_groups, self.owners(opt)):
            if owner == SHARED:  # shared stem: trained every step
                pg["lr"] = pg["base_lr"] * self.lr_factor(int(module.step_count), horizons[-1])
            else:
                pg["lr"] = pg["base_lr"] * self.lr_factor(steps[owner], horizons[owner])

    def accumulate(
        self, opt: Any, loss: Tensor, trained: list[int], reduce_gradients: Callable[[list[Tensor]], None] | None
    ) -> Tensor | None:
        """Add one micro-batch's gradients (its loss scaled by 1/k) to the step's; at the k-th, take the optimizer
        step (:meth:`step`) and return the mean loss of its micro-batches. None while micro-batches are to come."""
        module, k = self.module, self.settings.accumulate_grad_batches
        if self.micro == 0:
            opt.zero_grad(set_to_none=True)
            self.accumulated = torch.zeros((), device=loss.device)
        module.manual_backward(loss / k if k > 1 else loss)
        assert self.accumulated is not None
        self.accumulated = self.accumulated + loss.detach()
        if self.micro + 1 < k:
            self.micro += 1
            return None
        self.micro = 0
        mean = self.accumulated / k
        self.step(opt, trained, reduce_gradients)
        return mean

    def step(self, opt: Any, trained: list[int], reduce_gradients: Callable[[list[Tensor]], None] | None) -> None:
        """One optimizer step of the ``trained`` groups (and the shared stem) from their accumulated gradients:
        average them over the processes that train them, clip, step at the scheduled rates, count, update the EMA,
        and leave the next step's rates where LR monitors read them."""
        module, network = self.module, self.module.network
        if reduce_gradients is not None:
            reduce_gradients([p for g in trained for p in network.group_parameters(g)] + network.shared_parameters())
        self.clip(trained)
        self.set_learning_rates(opt.optimizer)
        opt.step()
        module.group_steps[trained] += 1
        module.step_count += 1
        self.update_ema(trained)
        self.set_learning_rates(opt.optimizer)

    def clip(self, trained: Iterable[int]) -> None:
        """Clip the gradient norm of each trained group, and of the shared stem, on its own."""
        network, clip = self.module.network, self.settings.gradient_clip_val
        if not clip:
            return
        for params in [network.group_parameters(g) for g in trained] + [network.shared_parameters()]:
            with_grad = [p for p in params if p.grad is not None]
            if with_grad:
                torch.nn.utils.clip_grad_norm_(with_grad, clip)

    @torch.no_grad()
    def update_ema(self, trained: Sequence[int]) -> None:
        """Move the EMA copy of each trained group (and the shared stem) towards the live weights; its decay warms
        up in the group's own steps. Buffers are copied as they are."""
        module = self.module
        ema_network, network, decay_max = module.ema_network, module.network, self.settings.ema_decay
        if ema_network is None:
            return
        steps = module.group_steps.tolist()
        for g in trained:
            decay = min(decay_max, (1 + steps[g]) / (10 + steps[g]))
            ema, live = ema_network.group_parameters(g), network.group_parameters(g)
            torch._foreach_lerp_(ema, [p.detach() for p in live], 1.0 - decay)
        shared_ema, shared = ema_network.shared_parameters(), network.shared_parameters()
        if shared:
            step = int(module.step_count)
            decay = min(decay_max, (1 + step) / (10 + step))
            torch._foreach_lerp_(shared_ema, [p.detach() for p in shared], 1.0 - decay)
        for ema_b, live_b in zip(ema_network.buffers(), network.buffers()):
            ema_b.copy_(live_b)

    def optimizer_steps(self) -> float:
        """The optimizer steps this fit will take (Lightning's estimate counts batches once we accumulate)."""
        trainer, k = self.module.trainer, self.settings.accumulate_grad_batches
        if k == 1:
            return float(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else math.inf
        batches = float(trainer.num_training_batches) * epochs
        limit = trainer.max_steps if trainer.max_steps != -1 else math.inf
        total = min(math.ceil(batches / k) if math.isfinite(batches) else math.inf, limit)
        return float(total) if math.isfinite(total) else float(trainer.estimated_stepping_batches)

    def set_horizons(self) -> None:
        """Each group's (and the shared stem's) LR horizon for this fit, in ``module.lr_horizons``: a fresh fit
        shares its steps by the schedule's expectation; a resume keeps the horizons it started with, unless the
        module was marked ``recompute_horizons`` (resumed under another layout or schedule)."""
        module = self.module
        trainer, schedule = module.trainer, module._schedule
        recompute, module.recompute_horizons = getattr(module, "recompute_horizons", False), False
        if recompute:  # each group's share of the steps left, from now
            left = max(self.optimizer_steps() - trainer.global_step, 0.0)
            per_group = left if schedule is None else schedule.expected_steps(left)
            horizons = [float(s) + per_group for s in module.group_steps] + [float(module.step_count) + left]
            module.lr_horizons.copy_(torch.tensor(horizons, dtype=torch.float64).clamp_(min=1.0))
            return
        if trainer.global_step > 0 and bool(module.lr_horizons.any()):
            return  # a resumed run keeps the horizons it started with (same layout and schedule: checked)
        total = self.optimizer_steps()
        per_group = total if schedule is None else schedule.expected_steps(total)
        horizons = [float(s) + per_group if trainer.global_step == 0 else per_group for s in module.group_steps]
        horizons.append(float(module.step_count) + total)
        module.lr_horizons.copy_(torch.tensor(horizons, dtype=torch.float64).clamp_(min=1.0))
