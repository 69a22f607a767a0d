"""Activation checkpointing inside the running group: its blocks keep their inputs and recompute the rest at backward.

While a group runs with checkpointing on, each chosen block (every k-th of the group) gets an instance-level
``forward`` that runs its own forward under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant). The block
stays the same object, so the network's loop over its stack, attribute access and the block's forward hooks are
unchanged, and the hooks run once, around the checkpoint, never in the recomputation (which calls the original
forward directly). Randomness is replayed on recompute (``preserve_rng_state``), so dropout draws the same masks
and the gradients equal those without checkpointing. Without gradients (evaluation, sampling) blocks run plainly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_diffusionblocks.memory import SavedTensorMeter, checkpointed_indices

#: what ``activation_checkpointing`` accepts, for messages
ACCEPTED = 'None (no checkpointing), "every" (every block of the running group) or a positive int k (every k-th block)'

#: ``context(block) -> recompute context``: called at a checkpointed block's forward (after its pre-hooks), the
#: context manager it returns is entered around the block's recomputation (a network whose hooks on the block's
#: submodules need state set up by the block's pre-hooks restores it there)
RecomputeContext = Callable[[nn.Module], AbstractContextManager[Any]]


def checkpoint_every(option: Any) -> int | None:
    """``activation_checkpointing`` as the number k (checkpoint every k-th block of the running group) or None."""
    if option is None:
        return None
    if option == "every":
        return 1
    if isinstance(option, int) and not isinstance(option, bool) and option >= 1:
        return option
    raise ValueError(
        f"activation_checkpointing={option!r} is not an option: pass {ACCEPTED}, e.g."
        ' DiffusionBlocksModule(net, task, activation_checkpointing="every") or activation_checkpointing=2.'
    )


def _context_fn(block: nn.Module, recompute: RecomputeContext | None) -> Callable[[], tuple[Any, Any]]:
    """The checkpoint's (forward, recompute) contexts: an open memory meter counts what the recomputation will
    hold; the network's recompute context (if any) is captured now and entered at recomputation."""
    meter = SavedTensorMeter.open_meter()
    forward = meter.recomputation() if meter is not None else nullcontext()
    again = recompute(block) if recompute is not None else nullcontext()
    return lambda: (forward, again)


def _checkpointed_forward(
    block: nn.Module, original: Callable[..., Any], recompute: RecomputeContext | None, *args: Any, **kwargs: Any
) -> Any:
    if not torch.is_grad_enabled():
        return original(*args, **kwargs)
    return checkpoint(
        original, *args, use_reentrant=False, preserve_rng_state=True,
        context_fn=_context_fn(block, recompute), **kwargs,
    )  # fmt: skip


def _is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return isinstance(forward, partial) and forward.func is _checkpointed_forward


@contextmanager
def checkpointing(
    blocks: Sequence[nn.Module], every: int | None, recompute: RecomputeContext | None = None
) -> Iterator[list[nn.Module]]:
    """Inside the context, every ``every``-th of ``blocks`` (the running group's, in order) runs its forward under
    a checkpoint; yields those blocks. Blocks already checkpointed (a nested run) are left as they are."""
    chosen = [blocks[i] for i in checkpointed_indices(len(blocks), every)]
    installed = []
    try:
        for block in chosen:
            if _is_checkpointed(block):
                continue
            had_own = "forward" in block.__dict__
            previous = block.__dict__.get("forward")
            block.__dict__["forward"] = partial(_checkpointed_forward, block, block.forward, recompute)
            installed.append((block, had_own, previous))
        yield chosen
    finally:
        for block, had_own, previous in installed:
            if had_own:
                block.__dict__["forward"] = previous
            else:
                del block.__dict__["forward"]


__all__ = ["ACCEPTED", "RecomputeContext", "checkpoint_every", "checkpointing"]
