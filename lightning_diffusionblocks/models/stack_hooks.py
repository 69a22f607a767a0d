"""Noise conditioning for a backbone's blocks without touching its source: forward hooks on the blocks.

Adapters (`ConditioningAdapter`, `DecoderAdapter`) mix in :class:`StackHooks`. Each block gets a
zero-initialised FiLM modulation of its input by the noise embedding (a submodule added to the block, so
it belongs to that block's group; untrained, the backbone computes what it always did). The last block
that runs ends the backbone's forward pass early, so whatever the backbone computes after its stack
(final norm, pooling, its own head) is skipped and the adapter reads the stack output itself. Hooks are
bound methods (not closures), so deep copies (EMA weights) hook into their own copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.models.dit import modulate
from lightning_diffusionblocks.partition import BlockStack, _get


class StackFinished(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the last block's hook to stop the backbone right after its stack."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


class BlockModulation(nn.Module):
    """shift, scale = Linear(SiLU(c)), zero-initialised: x ↦ x·(1 + scale) + shift."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.linear(F.silu(c)).chunk(2, dim=-1)
        return modulate(x, shift, scale)


def infer_width(backbone: nn.Module) -> int:
    """Token width of a timm / Hugging Face / custom backbone, from its usual attribute names."""
    config = getattr(backbone, "config", None)
    for owner in (backbone, config):
        for name in ("embed_dim", "num_features", "hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(owner, name, None)
            if isinstance(value, int):
                return value
    raise ValueError(f"Cannot tell the token width of {type(backbone).__name__}; pass dim=<width> to the adapter.")


class StackHooks:
    """Mixin for an ``nn.Module`` adapter holding ``self.backbone`` whose block stack is at ``self.block_path``."""

    backbone: nn.Module
    block_path: str
    dim: int

    def install_stack_hooks(self, blocks: Sequence[nn.Module]) -> None:
        for index, block in enumerate(blocks):
            block.add_module("noise_modulation", BlockModulation(self.dim))
            block.register_forward_pre_hook(self._enter_block, with_kwargs=True)
            block.register_forward_hook(partial(self._leave_block, index))
        self._hook_ctx: dict[str, Any] | None = None

    def _enter_block(self, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx = self._hook_ctx
        if ctx is None:
            return None  # called outside the adapter: the backbone behaves as it always did
        x = args[0]
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(
                f"The block stack receives shape {tuple(x.shape)}; the adapter needs (N, T, {self.dim}) tokens."
            )
        if ctx["prepend"] is not None:
            token, ctx["prepend"] = ctx["prepend"], None
            x = torch.cat([token.to(x.dtype), x], dim=1)
        x = block.noise_modulation(x, ctx["c"].to(x.dtype))
        return (x, *args[1:]), kwargs

    def _leave_block(self, index: int, block: nn.Module, args: tuple, output: Any) -> None:
        ctx = self._hook_ctx
        if ctx is None:
            return
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.shape != args[0].shape:
            raise ValueError(
                f"Block {index} ({type(block).__name__}) maps shape {tuple(args[0].shape)} to {tuple(out.shape)}."
                " DiffusionBlocks needs every block to keep the token count and width unchanged."
            )
        if index == ctx["last"]:
            raise StackFinished(out)

    def _last_block(self) -> int:
        stack = _get(self.backbone, self.block_path)
        if isinstance(stack, BlockStack):
            return stack.active_indices()[-1]
        return len(stack) - 1

    def run_hooked(self, call: Callable[[], Any], c: Tensor, prepend: Tensor | None = None) -> Tensor:
        """Run ``call()`` (the backbone) with every block modulated by ``c`` (N, D); return the stack output.

        ``prepend`` (N, K, D) is concatenated in front of the tokens entering the first block that runs.
        """
        self._hook_ctx = {"c": c, "prepend": prepend, "last": self._last_block()}
        try:
            call()
        except StackFinished as done:
            return done.output
        finally:
            self._hook_ctx = None
        raise RuntimeError(f"The backbone finished without running its block stack `{self.block_path}`.")
