"""Our own small transformer language model for DiffusionBlocks: DiT-style adaLN-Zero blocks over tokens."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_diffusionblocks.models.diffusion_lm import DiffusionLM, Objective
from lightning_diffusionblocks.models.dit import DiTBlock


class TransformerLM(DiffusionLM):
    """Token + learned position embedding, ``depth`` adaLN-Zero blocks (the stack at ``blocks``).

    ``objective``: ``"masked"`` (masked-diffusion LM, bidirectional) or ``"autoregressive"`` (clean‖noisy
    layout); see :class:`~lightning_diffusionblocks.models.diffusion_lm.DiffusionLM`.
    """

    def __init__(
        self,
        vocab_size: int,
        objective: Objective = "autoregressive",
        dim: int = 256,
        depth: int = 6,
        heads: int = 4,
        context_length: int = 256,
        mlp_ratio: float = 4.0,
        learn_target_embedding: bool = False,
    ) -> None:
        super().__init__(vocab_size, dim, objective, context_length, learn_target_embedding)
        self.tok_embed = nn.Embedding(self.input_vocab_size, dim)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(torch.randn(context_length, dim) * 0.02)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.tok_embed(tokens)

    def run_stack(self, h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        h = h + self.pos_embed[positions]
        for block in self.blocks:
            h = block(h, c, allowed)
        return h
