"""Hugging Face decoder models (GPT-2, Llama, …) as DiffusionBlocks language models, source unchanged.

The backbone (e.g. ``GPT2Model(GPT2Config(...))`` or ``LlamaForCausalLM(LlamaConfig(...))``) is called
with ``inputs_embeds`` (its own token embedding of our layout), an explicit 4-D attention mask (so the
clean‖noisy layout, or bidirectional attention for masked diffusion, replaces its causal mask) and our
``position_ids`` (a noisy token shares the position of the token it predicts). Its blocks get the noise
conditioning through :class:`~lightning_diffusionblocks.models.stack_hooks.StackHooks`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_diffusionblocks.models.diffusion_lm import DiffusionLM, Objective, TargetEmbedding
from lightning_diffusionblocks.models.stack_hooks import StackHooks, infer_width
from lightning_diffusionblocks.partition import find_block_stack


def _context_length(backbone: nn.Module) -> int | None:
    config = getattr(backbone, "config", None)
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


class DecoderAdapter(StackHooks, DiffusionLM):
    """A decoder backbone (``transformers`` model or any module taking ``inputs_embeds``, ``attention_mask``
    and ``position_ids``) as a masked-diffusion or autoregressive DiffusionBlocks LM.

    Args:
        backbone: randomly initialised or pretrained; its input embedding must hold ``vocab_size`` ids
            (+1 for the mask token of the masked objective).
        vocab_size: the tokenizer's vocabulary (the readout's size).
        objective: ``"masked"`` or ``"autoregressive"``.
        dim, block_path, context_length: read from the backbone and its config when omitted.
        target_embedding: the autoregressive targets: ``"random"`` (default), ``"learned"`` or ``"input"``
            (the rows of the backbone's ``get_input_embeddings()``); the last two need
            ``DiffusionBlocksModule(stem="shared")``. ``learn_target_embedding=True`` means ``"learned"``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        vocab_size: int,
        objective: Objective = "autoregressive",
        dim: int | None = None,
        block_path: str | None = None,
        context_length: int | None = None,
        learn_target_embedding: bool | None = None,
        target_embedding: TargetEmbedding | None = None,
    ) -> None:
        context_length = context_length or _context_length(backbone)
        if context_length is None:
            raise ValueError("Cannot read the backbone's context length; pass DecoderAdapter(..., context_length=N).")
        super().__init__(vocab_size, dim or infer_width(backbone), objective, context_length, learn_target_embedding,
                         target_embedding=target_embedding)  # fmt: skip
        self.backbone = backbone
        self.block_path, blocks = find_block_stack(backbone, block_path)
        #: where DiffusionBlocks finds the stack inside the adapter
        self.diffusionblocks_stack_path = f"backbone.{self.block_path}"
        if not hasattr(backbone, "get_input_embeddings"):
            raise ValueError(f"{type(backbone).__name__} has no get_input_embeddings(); use a transformers model.")
        rows = backbone.get_input_embeddings().num_embeddings
        if rows < self.input_vocab_size:
            extra = " plus the mask token" if objective == "masked" else ""
            raise ValueError(
                f"The backbone embeds {rows} token ids but the tokenizer has {vocab_size}{extra}."
                f" Build its config with vocab_size >= {self.input_vocab_size}."
            )
        implementation = getattr(getattr(backbone, "config", None), "_attn_implementation", None) or "eager"
        if "flash" in implementation:
            raise ValueError(
                f"attn_implementation={implementation!r} cannot take the custom attention masks DiffusionBlocks"
                " needs; build the model with attn_implementation='sdpa' or 'eager'."
            )
        self._boolean_mask = implementation != "eager"
        self.install_stack_hooks(blocks)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.backbone.get_input_embeddings()(tokens)

    def input_embedding_weight(self) -> Tensor:
        return self.backbone.get_input_embeddings().weight

    def run_stack(self, h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        n, length = h.shape[:2]
        if allowed is None:
            allowed = torch.ones(length, length, dtype=torch.bool, device=h.device)
        allowed = allowed[None, None].expand(n, 1, length, length)
        if self._boolean_mask:  # sdpa takes True = attend
            mask = allowed
        else:  # eager attention adds the mask to the scores
            mask = torch.zeros(allowed.shape, device=h.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)
        position_ids = positions[None].expand(n, -1)
        return self.run_hooked(
            lambda: self.backbone(inputs_embeds=h, attention_mask=mask, position_ids=position_ids, use_cache=False),
            c,
        )
