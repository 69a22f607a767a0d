"""Refusals of module options, and of fits that Lightning would run wrongly, or silently, with a block-wise module.

Constructor options out of range, Trainer options that only apply to automatic optimisation (the module optimises
one group at a time by hand), a multi-process strategy that hands the module no DiffusionBlocks schedule, a module
switched between block-wise and end-to-end training, a fit whose training data had no batch, and a loss that is
not finite. Each error names the working call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_diffusionblocks.dashboard import check_group_loss_monitors
from lightning_diffusionblocks.tasks.base import Task

if TYPE_CHECKING:
    from lightning_diffusionblocks.module import DiffusionBlocksModule

MAX_GAMMA = 0.5


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops before the bad step touches any weight."""


def check_options(net: Any, task: Any, num_blocks: Any, gamma: float) -> tuple[nn.Module, Task]:
    """Refuse a network, task, number of groups or overlap the module cannot be built with; the network and task
    are returned as what they were checked to be."""
    if not isinstance(task, Task):
        raise TypeError(f"task must be a lightning_diffusionblocks Task (e.g. ImageGeneration()), got {type(task)}.")
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module with a block stack, got {type(net).__name__}.")
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int):
        raise TypeError(f"num_blocks must be an integer number of groups, got {num_blocks!r}.")
    if not 0.0 <= gamma < MAX_GAMMA:
        raise ValueError(
            f"gamma={gamma} is outside [0, {MAX_GAMMA}): the overlap widens each group's range by gamma x its log-width"
            f" on both sides, so gamma >= {MAX_GAMMA} lets neighbouring ranges swallow each other and removes the"
            " partition. The paper uses 0.05 (0.1 in its ablation)."
        )
    return net, task


def non_finite_loss(loss: Tensor, step: int, group: int | None, level_range: tuple[float, float]) -> NonFiniteLossError:
    """The error for a NaN or infinite loss at ``step``, naming what was trained on which noise levels."""
    lo, hi = level_range
    which = "the whole network (end-to-end)" if group is None else f"group {group}"
    return NonFiniteLossError(
        f"Loss is {loss.item()} at step {step} while training {which} on sigma in [{lo:.4g}, {hi:.4g}]."
        " Training stopped before this step changed any weight; the last saved checkpoint is intact."
        " Lower `lr`, set `gradient_clip_val`, or check the data for NaNs."
    )


class TrainingDataCheck(L.Callback):
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


def check_trainer_options(trainer: L.Trainer | None) -> None:
    """Refuse the Trainer's clipping and accumulation, which apply only to automatic optimisation, naming the
    module's own options. Called from ``configure_callbacks``, before Lightning's generic check of the same."""
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


def check_training_kind(module: DiffusionBlocksModule, blockwise: bool) -> None:
    """Refuse a multi-process fit without a DiffusionBlocks schedule, say when training is end to end, and refuse a
    module trained one way (block-wise or end to end) being fit the other way: its routing would change."""
    trainer = module.trainer
    strategy = type(trainer.strategy).__name__
    check_group_loss_monitors(trainer)  # once per fit, not at every step that logs a group's loss
    if not blockwise and trainer.world_size > 1 and module.num_blocks > 1:
        # a multi-process strategy of Lightning's own: every process would train the whole network end to end
        # (with num_blocks=1 that is what block-wise training is, so e.g. an end-to-end DDP baseline may run)
        world = trainer.world_size
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
    if int(module.step_count) > 0 and blockwise != module.blockwise:
        before = "block-wise" if module.blockwise else "end to end"
        now = "block-wise" if blockwise else "end to end (strategy without a DiffusionBlocks schedule)"
        strategy = "'diffusionblocks'" if module.blockwise else "'auto'"
        raise MisconfigurationException(
            f"This module was trained {before} for {int(module.step_count)} steps and would now be trained {now};"
            f" its routing would silently change. Fit it with the strategy it was trained with"
            f" (strategy={strategy}), or build a fresh DiffusionBlocksModule for the other kind of training."
        )
