"""What every DiffusionBlocks language model shares: the token layout of each objective and the readout.

Subclasses supply the token embedding and the stack (`TransformerLM`: our own adaLN blocks;
`DecoderAdapter`: a Hugging Face decoder, unchanged). This base builds what the stack sees:

- ``objective="masked"`` (absorbing-state diffusion): the partly masked tokens (mask id = ``vocab_size``),
  bidirectional attention, conditioned on the masking time t; logits for every position.
- ``objective="autoregressive"``: the clean tokens followed by one noisy target token per position, the
  noisy embedding z_i = e(x_i) + σε of token i, preconditioned by EDM's c_in. A noisy token attends only
  to the clean tokens before it and to itself, so one pass trains every position (the clean‖noisy layout
  of Block Diffusion); at generation the layout is the prompt followed by one noisy token, which is plain
  causal attention. The readout is EDM's D = c_out·norm(F) + c_skip·z, then a final adaLN and a linear
  head give logits over the vocabulary.

The autoregressive targets e(x) (``target_embedding``) are the L2-normalised rows of: ``"random"`` (default)
a fixed random table (a buffer, seeded); ``"learned"`` a separate learned table; ``"input"`` the model's own
input token embedding f_in (the paper's App. B: "z = f_in(x) followed by z_σ = z + σε"), trained through
both the clean-token path and the target path. A trained table needs ``DiffusionBlocksModule(stem="shared")``
(:meth:`DiffusionLM.diffusionblocks_check_stem` refuses per-group stems): with per-group stems every group
holds a copy of the stem, and learned copies would drift into incompatible target spaces, while group b's
output (softmax·E) is group b+1's input.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.models.dit import NoiseEmbedding, modulate
from lightning_diffusionblocks.noise import edm_scalings
from lightning_diffusionblocks.records import RecordsInitArgs

Objective = Literal["masked", "autoregressive"]
TargetEmbedding = Literal["random", "learned", "input"]
TARGET_EMBEDDINGS = ("random", "learned", "input")


def resolve_target_embedding(
    target_embedding: TargetEmbedding | None, learn_target_embedding: bool | None, objective: str
) -> TargetEmbedding:
    """The target embedding meant by the new option and the legacy flag (``learn_target_embedding=True`` is
    ``"learned"``, ``False`` is ``"random"``); refuses the two when they disagree."""
    legacy: TargetEmbedding | None = None
    if learn_target_embedding is not None:
        legacy = "learned" if learn_target_embedding else "random"
    if target_embedding is not None and target_embedding not in TARGET_EMBEDDINGS:
        raise ValueError(f"target_embedding must be one of {TARGET_EMBEDDINGS}, got {target_embedding!r}.")
    if target_embedding is not None and legacy is not None and target_embedding != legacy:
        raise ValueError(
            f"learn_target_embedding={learn_target_embedding} means target_embedding={legacy!r} but"
            f" target_embedding={target_embedding!r} was given too; pass only target_embedding={target_embedding!r}."
        )
    resolved: TargetEmbedding = target_embedding or legacy or "random"
    if resolved != "random" and objective != "autoregressive":
        raise ValueError(
            f"target_embedding={resolved!r} applies to objective='autoregressive' only (the masked objective has"
            " no target embedding); leave it unset."
        )
    return resolved


def autoregressive_mask(length: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean (2L, 2L) attention mask of the clean‖noisy layout; True = may attend.

    Clean token i sees clean tokens ≤ i; noisy token i sees clean tokens < i and itself; nothing sees a
    noisy token but itself.
    """
    idx = torch.arange(length, device=device)
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool, device=device)
    allowed[:length, :length] = idx[:, None] >= idx[None, :]
    allowed[length:, :length] = idx[:, None] > idx[None, :]
    allowed[length + idx, length + idx] = True
    return allowed


class DiffusionLM(RecordsInitArgs, nn.Module):
    """Base of the language models (see the module docstring). Subclasses implement :meth:`embed_tokens`
    and :meth:`run_stack`."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        objective: Objective,
        context_length: int,
        learn_target_embedding: bool | None = None,
        target_seed: int = 0,
        target_embedding: TargetEmbedding | None = None,
    ) -> None:
        super().__init__()
        if objective not in ("masked", "autoregressive"):
            raise ValueError(f"objective must be 'masked' or 'autoregressive', got {objective!r}.")
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}.")
        self.vocab_size, self.dim, self.objective = vocab_size, dim, objective
        self.context_length = context_length
        #: where the targets e(x) come from (see the module docstring)
        self.target_embedding = resolve_target_embedding(target_embedding, learn_target_embedding, objective)
        self.learn_target_embedding = self.target_embedding == "learned"  # the legacy flag, kept readable
        self.noise_embed = NoiseEmbedding(dim)
        nn.init.normal_(self.noise_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.noise_embed.mlp[2].weight, std=0.02)
        if objective == "autoregressive":
            # "target_table" keeps the state-dict key of earlier versions ("input" has no table of its own)
            if self.target_embedding != "input":
                table = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(target_seed))
                if self.target_embedding == "learned":
                    self.target_table = nn.Parameter(table)
                else:
                    self.register_buffer("target_table", table)
            self.noisy_type = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(dim, 2 * dim)
        self.head = nn.Linear(dim, vocab_size)
        for layer in (self.final_ada, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    # ------------------------------------------------------------------ subclass API
    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """(N, L) ids → (N, L, D) input embeddings."""
        raise NotImplementedError

    def run_stack(self, h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        """Run the block stack on ``h`` (N, T, D) with attention mask ``allowed`` ((T, T) bool, None =
        everything), token ``positions`` (T,) and conditioning ``c`` (N, D); return (N, T, D)."""
        raise NotImplementedError

    def input_embedding_weight(self) -> Tensor:
        """The input token embedding table f_in (at least ``vocab_size`` rows; ``embed_tokens`` looks ids up in it),
        needed by ``target_embedding="input"``."""
        raise NotImplementedError(
            f"{type(self).__name__} does not expose its input embedding table; implement input_embedding_weight()"
            " or use target_embedding='random' or 'learned'."
        )

    # ------------------------------------------------------------------ DiffusionBlocksModule protocol
    def diffusionblocks_check_stem(self, stem: str) -> None:
        """Asked by :class:`~lightning_diffusionblocks.DiffusionBlocksModule` before it partitions the network:
        a trained target embedding must be one table for all groups (group b's output softmax·E is group b+1's
        input), so per-group stems, where every group trains its own copy, are refused."""
        if stem == "per_group" and self.target_embedding != "random":
            raise ValueError(
                f"target_embedding={self.target_embedding!r} trains the target embedding, but with"
                " stem='per_group' every group owns a copy of it, and the copies would drift into incompatible"
                " target spaces while group b's output (softmax·E) is group b+1's input. Use"
                " DiffusionBlocksModule(..., stem='shared') (the official code), or build the network with"
                " target_embedding='random' (learn_target_embedding=False)."
            )

    # ------------------------------------------------------------------ helpers
    @property
    def mask_id(self) -> int:
        """The id of the mask token (masked objective): one past the vocabulary."""
        return self.vocab_size

    @property
    def input_vocab_size(self) -> int:
        return self.vocab_size + (1 if self.objective == "masked" else 0)

    def embeddings(self) -> Tensor:
        """The L2-normalised target embeddings (V, D) of the autoregressive objective."""
        if self.objective != "autoregressive":
            raise ValueError("Target embeddings exist only for objective='autoregressive'.")
        if self.target_embedding == "input":
            return F.normalize(self.input_embedding_weight()[: self.vocab_size], dim=-1)
        return F.normalize(self.target_table, dim=-1)

    def check_tokens(self, tokens: Tensor, extra_positions: int = 0) -> None:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Tokens must be an (N, L) integer tensor, got {tokens.dtype} {tuple(tokens.shape)}.")
        length = tokens.shape[1] + extra_positions
        if length > self.context_length:
            raise ValueError(
                f"Sequence of {length} positions is longer than the model's context of {self.context_length}."
                " Use shorter sequences (seq_len) or build the model with a larger context_length."
            )
        if tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.input_vocab_size:
                mask = " (the mask token included)" if self.objective == "masked" else ""
                raise ValueError(
                    f"Token ids must be in [0, {self.input_vocab_size}){mask}; got ids in [{lo}, {hi}]."
                    " Build the model with the tokenizer's vocab_size."
                )

    def readout(self, hidden: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.final_ada(F.silu(c.float())).chunk(2, dim=-1)
        return self.head(modulate(hidden, shift, scale))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: Tensor | None = None,
        z: Tensor | None = None,
        level: Tensor | None = None,
        sigma_data: float = 0.5,
        mode: Literal["train", "next", "embeddings"] = "train",
    ) -> Tensor:
        """Logits (N, L, V).

        masked: ``net(tokens, level=t)`` with tokens holding ``mask_id`` where masked.
        autoregressive: ``net(tokens, z, level=σ)``: ``mode="train"``: z (N, L, D) holds the noisy
        embedding of every token, logits[:, i] predict token i from tokens[:, :i]; ``mode="next"``: z
        (N, 1, D) is the noisy embedding of the token after ``tokens`` (logits (N, 1, V)).
        ``mode="embeddings"``: the normalised target embeddings (V, D).
        """
        if mode == "embeddings":
            return self.embeddings()
        if tokens is None or level is None:
            raise ValueError("Call the model as net(tokens, level=t) or net(tokens, z, level=sigma).")
        if mode not in ("train", "next"):
            raise ValueError(f"mode must be 'train', 'next' or 'embeddings', got {mode!r}.")
        n, length = tokens.shape[0], tokens.shape[1] if tokens.ndim == 2 else 0
        if self.objective == "masked":
            self.check_tokens(tokens)
            c = self.noise_embed(level.float().view(-1))
            positions = torch.arange(length, device=tokens.device)
            hidden = self.run_stack(self.embed_tokens(tokens), None, positions, c)
            return self.readout(self.norm(hidden.float()), c)
        if z is None:
            raise ValueError("The autoregressive objective needs the noisy target embeddings z.")
        self.check_tokens(tokens, extra_positions=1 if mode == "next" else 0)
        expected = (n, length if mode == "train" else 1, self.dim)
        if tuple(z.shape) != expected:
            raise ValueError(f"z must have shape {expected} for mode={mode!r}, got {tuple(z.shape)}.")
        c_skip, c_out, c_in, c_noise = edm_scalings(level.float().view(-1, 1, 1), sigma_data)
        c = self.noise_embed(c_noise.view(-1))
        clean = self.embed_tokens(tokens)
        noisy = (c_in * z.float() + self.noisy_type).to(clean.dtype)
        steps = torch.arange(length, device=tokens.device)
        if mode == "train":
            positions, allowed = torch.cat([steps, steps]), autoregressive_mask(length, tokens.device)
        else:
            positions = torch.arange(length + 1, device=tokens.device)
            allowed = torch.ones(length + 1, length + 1, dtype=torch.bool, device=tokens.device).tril_()
        hidden = self.run_stack(torch.cat([clean, noisy], dim=1), allowed, positions, c)[:, length:]
        denoised = c_out * self.norm(hidden.float()) + c_skip * z.float()
        return self.readout(denoised, c)
