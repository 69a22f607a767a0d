"""Noise conditioning for a backbone's blocks without touching its source: forward hooks on the blocks.

Adapters (`ConditioningAdapter`, `DecoderAdapter`) mix in :class:`StackHooks`. Each block gets a
zero-initialised modulation by the noise embedding c (a submodule added to the block, so it belongs to that
block's group), in one of two forms:

- ``"film"``: shift/scale of the block's input. Untrained, the backbone computes what it always did.
- ``"adaln_zero"`` (DiT, the paper's layers): shift/scale of the outputs of the block's two pre-norms and a
  gate on each residual branch, from one Linear(SiLU(c)) → 6·D. Zero init makes every gate 0, so an
  untrained block is the identity (the backbone's own function is *not* kept; DiT's choice for training
  from scratch). It needs pre-norm residual blocks whose sublayers it can find (:func:`residual_branches`).

The last block that runs ends the backbone's forward pass early, so whatever the backbone computes after
its stack (final norm, pooling, its own head) is skipped and the adapter reads the stack output itself.
Hooks are bound methods (not closures), so deep copies (EMA weights) hook into their own copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.models.dit import modulate
from lightning_diffusionblocks.partition import BlockStack, _get

Conditioning = Literal["film", "adaln_zero"]
CONDITIONINGS: tuple[str, ...] = ("film", "adaln_zero")

# the order of one pre-norm block's sublayer calls, as adaLN-Zero sees them
_ADALN_STEPS = ("norm1", "branch1", "norm2", "branch2")


class StackFinished(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the last block's hook to stop the backbone right after its stack."""

    def __init__(self, output: Tensor) -> None:
        super().__init__()
        self.output = output


class AdapterError(ValueError):
    """The adapter's own check refused the backbone (as opposed to an error raised inside the backbone)."""


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


class AdaLNZeroModulation(nn.Module):
    """(shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c)) → 6·D, zero-initialised (gates start at 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: Tensor) -> tuple[Tensor, ...]:
        return self.linear(F.silu(c)).chunk(6, dim=-1)


def residual_branches(block: nn.Module) -> tuple[nn.Module, nn.Module, list[nn.Module]] | None:
    """(norm1, norm2, branch ends) of a pre-norm block ``x + end1(… norm1(x) …)``, ``x + end2(… norm2(x) …)``.

    The branch ends are the drop-path modules (``drop_path1``/``drop_path2``, or one ``drop_path`` called once
    per branch): every timm pre-norm family calls them on the finished branch (after LayerScale ``ls``/
    ``gamma``), with tokens as (N, T, D) even where the branch transposes inside (Mixer, ResMLP). Covers timm
    ViT/DeiT ``Block``, ``EvaBlock``, BEiT ``Block``, ``RelPosBlock``, ``MixerBlock`` and ResMLP ``ResBlock``.
    """
    norm1, norm2 = getattr(block, "norm1", None), getattr(block, "norm2", None)
    if not isinstance(norm1, nn.Module) or not isinstance(norm2, nn.Module) or norm1 is norm2:
        return None
    ends = [getattr(block, name, None) for name in ("drop_path1", "drop_path2")]
    if not all(isinstance(end, nn.Module) for end in ends):
        ends = [getattr(block, "drop_path", None)]
        if not isinstance(ends[0], nn.Module):
            return None
    return norm1, norm2, list({id(end): end for end in ends}.values())


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

    def install_stack_hooks(self, blocks: Sequence[nn.Module], conditioning: Conditioning = "film") -> None:
        """Add each block's zero-initialised ``noise_modulation`` and the hooks that apply it (see module doc)."""
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}.")
        found = []
        if conditioning == "adaln_zero":
            for index, block in enumerate(blocks):
                branches = residual_branches(block)
                if branches is None:
                    raise AdapterError(
                        f"conditioning='adaln_zero' cannot find the residual branches of block {index}"
                        f" ({type(block).__name__}): it needs a pre-norm block with `norm1`, `norm2` and"
                        " `drop_path1`/`drop_path2` (or one `drop_path`), as timm ViT/DeiT/EVA/BEiT/Mixer/ResMLP"
                        " blocks have. Use conditioning='film', which only needs the block's input."
                    )
                found.append(branches)
        self.conditioning: Conditioning = conditioning
        for index, block in enumerate(blocks):
            if conditioning == "film":
                block.add_module("noise_modulation", BlockModulation(self.dim))
            else:
                block.add_module("noise_modulation", AdaLNZeroModulation(self.dim))
                norm1, norm2, ends = found[index]
                norm1.register_forward_hook(partial(self._adaln_norm, index, "norm1"))
                norm2.register_forward_hook(partial(self._adaln_norm, index, "norm2"))
                for end in ends:
                    end.register_forward_hook(partial(self._adaln_gate, index))
            block.register_forward_pre_hook(partial(self._enter_block, index), with_kwargs=True)
            block.register_forward_hook(partial(self._leave_block, index))
        self._hook_ctx: dict[str, Any] | None = None

    def _enter_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        ctx = self._hook_ctx
        if ctx is None:
            return None  # called outside the adapter: the backbone behaves as it always did
        x = args[0]
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise AdapterError(
                f"The block stack receives shape {tuple(x.shape)}; the adapter needs (N, T, {self.dim}) tokens."
            )
        if ctx["prepend"] is not None:
            token, ctx["prepend"] = ctx["prepend"], None
            x = torch.cat([token.to(x.dtype), x], dim=1)
        if ctx["add"] is not None:
            extra, ctx["add"] = ctx["add"], None
            x = x + (extra[:, None, :] if extra.ndim == 2 else extra).to(x.dtype)
        c = ctx["c"].to(x.dtype)
        if self.conditioning == "film":
            x = block.noise_modulation(x, c)
        else:
            ctx["adaln"][index] = {"mods": block.noise_modulation(c), "step": 0, "input": x, "block": block}
        return (x, *args[1:]), kwargs

    def _adaln_state(self, index: int, step: str) -> dict[str, Any] | None:
        """This block's modulation during its forward; checks the sublayers run in pre-norm order."""
        ctx = self._hook_ctx
        state = None if ctx is None else ctx["adaln"].get(index)
        if state is None:
            return None
        if state["step"] >= len(_ADALN_STEPS) or _ADALN_STEPS[state["step"]] != step:
            due = _ADALN_STEPS[state["step"]] if state["step"] < len(_ADALN_STEPS) else "the block's end"
            self._not_pre_norm(state["block"], f"`{step}` ran where `{due}` was due")
        state["step"] += 1
        return state

    @staticmethod
    def _not_pre_norm(block: nn.Module, why: str) -> None:
        raise AdapterError(
            f"conditioning='adaln_zero' needs a pre-norm block (x + branch(norm1(x)), then x + branch(norm2(x))),"
            f" but {type(block).__name__} is not one: {why}. Use conditioning='film'."
        )

    def _adaln_norm(self, index: int, step: str, norm: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        state = self._adaln_state(index, step)
        if state is None:
            return None
        if step == "norm1" and state["input"] is not None and args[0] is not state["input"]:
            self._not_pre_norm(state["block"], "`norm1` does not normalise the block's input (post-norm?)")
        shift, scale = state["mods"][0:2] if step == "norm1" else state["mods"][3:5]
        return modulate(output, shift, scale)

    def _adaln_gate(self, index: int, end: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        ctx = self._hook_ctx
        state = None if ctx is None else ctx["adaln"].get(index)
        if state is None:
            return None
        step = "branch1" if state["step"] < 2 else "branch2"
        self._adaln_state(index, step)
        gate = state["mods"][2] if step == "branch1" else state["mods"][5]
        return output * gate.unsqueeze(1)

    def _leave_block(self, index: int, block: nn.Module, args: tuple, output: Any) -> None:
        ctx = self._hook_ctx
        if ctx is None:
            return
        state = ctx["adaln"].pop(index, None)
        if state is not None and state["step"] != len(_ADALN_STEPS):
            self._not_pre_norm(block, f"only {_ADALN_STEPS[: state['step']]} of {_ADALN_STEPS} ran")
        out = output[0] if isinstance(output, (tuple, list)) else output
        if out.shape != args[0].shape:
            raise AdapterError(
                f"Block {index} ({type(block).__name__}) maps shape {tuple(args[0].shape)} to {tuple(out.shape)}."
                " DiffusionBlocks needs every block to keep the token count and width unchanged."
            )
        if index == ctx["last"]:
            raise StackFinished(out)

    def diffusionblocks_recompute_context(self, block: nn.Module) -> AbstractContextManager[None]:
        """What the adaLN-Zero hooks on ``block``'s sublayers need when activation checkpointing recomputes it at
        backward (after this forward pass ended): its modulation, captured now (its pre-hook has run), set again
        around the recomputation. FiLM modulates the block's input in the pre-hook, outside the checkpoint."""
        ctx = self._hook_ctx
        found = [] if ctx is None else [(i, s) for i, s in ctx["adaln"].items() if s["block"] is block]
        if not found:
            return nullcontext()
        index, state = found[0]
        return self._recomputing(index, state["mods"], block)

    @contextmanager
    def _recomputing(self, index: int, mods: tuple[Tensor, ...], block: nn.Module) -> Iterator[None]:
        previous = self._hook_ctx
        state = {"mods": mods, "step": 0, "input": None, "block": block}  # the input is the checkpoint's copy
        self._hook_ctx = {"c": None, "prepend": None, "add": None, "adaln": {index: state}, "last": None}
        try:
            yield
        finally:
            self._hook_ctx = previous

    def _last_block(self) -> int:
        stack = _get(self.backbone, self.block_path)
        if isinstance(stack, BlockStack):
            return stack.active_indices()[-1]
        return len(stack) - 1

    def run_hooked(
        self, call: Callable[[], Any], c: Tensor, prepend: Tensor | None = None, add: Tensor | None = None
    ) -> Tensor:
        """Run ``call()`` (the backbone) with every block modulated by ``c`` (N, D); return the stack output.

        ``prepend`` (N, K, D) is concatenated in front of the tokens entering the first block that runs;
        ``add`` (N, D) or (N, T, D) is added to them.
        """
        self._hook_ctx = {"c": c, "prepend": prepend, "add": add, "adaln": {}, "last": self._last_block()}
        try:
            call()
        except StackFinished as done:
            return done.output
        finally:
            self._hook_ctx = None
        raise RuntimeError(f"The backbone finished without running its block stack `{self.block_path}`.")
