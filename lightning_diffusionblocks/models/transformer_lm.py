"""Our own small transformer language model for DiffusionBlocks: DiT-style adaLN-Zero blocks over tokens,
with rotary position embeddings (Llama-style), which give bidirectional masked diffusion the sense of
"nearby" that learned absolute positions take thousands of steps to find."""

from __future__ import annotations

from torch import Tensor, nn

from lightning_diffusionblocks.models.diffusion_lm import DiffusionLM, Objective, TargetEmbedding
from lightning_diffusionblocks.models.dit import DiTBlock, rotary_tables


class TransformerLM(DiffusionLM):
    """Token embedding, ``depth`` adaLN-Zero blocks with rotary positions (the stack at ``blocks``).

    ``objective``: ``"masked"`` (masked-diffusion LM, bidirectional) or ``"autoregressive"`` (clean‖noisy
    layout); see :class:`~lightning_diffusionblocks.models.diffusion_lm.DiffusionLM`.
    ``target_embedding`` (autoregressive): ``"random"`` (default), ``"learned"`` or ``"input"`` (the rows of
    ``tok_embed``); the last two need ``DiffusionBlocksModule(stem="shared")``. ``learn_target_embedding=True``
    is the older spelling of ``"learned"``.
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
        learn_target_embedding: bool | None = None,
        target_embedding: TargetEmbedding | None = None,
    ) -> None:
        super().__init__(vocab_size, dim, objective, context_length, learn_target_embedding,
                         target_embedding=target_embedding)  # fmt: skip
        self.tok_embed = nn.Embedding(self.input_vocab_size, dim)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim={dim} must split into {heads} heads of even width (rotary positions).")
        self.head_dim = dim // heads
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, mlp_ratio) for _ in range(depth))

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        return self.tok_embed(tokens)

    def input_embedding_weight(self) -> Tensor:
        return self.tok_embed.weight

    def run_stack(self, h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        rope = rotary_tables(positions, self.head_dim)
        for block in self.blocks:
            h = block(h, c, allowed, rope)
        return h
