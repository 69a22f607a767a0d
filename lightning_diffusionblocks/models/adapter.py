"""Make a plain transformer backbone DiffusionBlocks-ready without touching its source.

`ConditioningAdapter` wraps a backbone whose block stack maps (N, T, D) → (N, T, D) (timm ViT/DeiT, or a
user's own module). It

- gives every block a zero-initialised FiLM modulation of its input by the noise embedding (a submodule
  added to the block, so it belongs to the block's group; untrained, the backbone is unchanged);
- prepends the noisy-target token c_in·z (+ a learned position) to the tokens entering the stack, and
  reads that token back where the stack ends, skipping whatever the backbone computes after its stack;
- reads out the class logits with EDM preconditioning: D = c_out·norm(token) + c_skip·z, a final
  adaLN modulation and a linear classifier (as in the official ViT code).

It works through forward hooks on the blocks, so it also runs only the active group when DiffusionBlocks
replaces the stack, and it never needs to know how the backbone builds its tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.models.dit import NoiseEmbedding
from lightning_diffusionblocks.models.stack_hooks import StackHooks, infer_width
from lightning_diffusionblocks.partition import find_block_stack


class ConditioningAdapter(StackHooks, nn.Module):
    """σ-conditioned classifier around a plain backbone (see the module docstring).

    Args:
        backbone: e.g. ``timm.create_model("vit_tiny_patch16_224", num_classes=0)``.
        num_classes: size of the label embedding and of the readout.
        dim: token width (read from ``embed_dim``/``num_features``… when omitted).
        block_path: dotted path of the block stack (found automatically for timm/Hugging Face layouts).
        features: name of the backbone method that runs embedding and stack (``forward_features`` for timm;
            falls back to calling the backbone).
        learn_embedding: train the label embedding (official code). Must be False with per-group stems,
            where each group would otherwise learn its own, incompatible embedding space.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        dim: int | None = None,
        block_path: str | None = None,
        features: str = "forward_features",
        learn_embedding: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.backbone = backbone
        self.block_path, blocks = find_block_stack(backbone, block_path)
        #: where DiffusionBlocks finds the stack inside the adapter
        self.diffusionblocks_stack_path = f"backbone.{self.block_path}"
        self.dim = dim or infer_width(backbone)
        self.num_classes = num_classes
        self.features = features if hasattr(backbone, features) else None
        self.learn_embedding = learn_embedding
        d = self.dim
        self.noise_embed = NoiseEmbedding(d)
        self.label_embed = nn.Embedding(num_classes, d)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        self.label_embed.weight.requires_grad_(learn_embedding)
        self.target_pos = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.target_pos, std=0.02)
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, num_classes)
        for layer in (self.final_ada, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.install_stack_hooks(blocks)

    def _check_inputs(self, inputs: Tensor) -> None:
        patch_embed = getattr(self.backbone, "patch_embed", None)
        size = getattr(patch_embed, "img_size", None)
        strict = size is not None and getattr(patch_embed, "strict_img_size", True) and inputs.ndim == 4
        if strict and tuple(inputs.shape[-2:]) != tuple(size):
            raise ValueError(
                f"Images are {tuple(inputs.shape[-2:])} but the backbone was built for {tuple(size)}."
                f" Resize the data or create the backbone with img_size={tuple(inputs.shape[-2:])}."
            )

    # ------------------------------------------------------------------ forward
    def embeddings(self) -> Tensor:
        """The L2-normalised label embeddings (C, D): the clean targets, in training and sampling alike."""
        return F.normalize(self.label_embed.weight, dim=-1)

    def forward(
        self,
        inputs: Tensor | None = None,
        z: Tensor | None = None,
        sigma: Tensor | None = None,
        sigma_data: float = 0.5,
        mode: str = "logits",
    ) -> Tensor:
        """``mode="logits"``: class logits for noisy targets ``z`` (N, D) at noise ``sigma`` (N,).
        ``mode="embeddings"``: the normalised label embeddings (so per-group copies are used correctly)."""
        if mode == "embeddings":
            return self.embeddings()
        if mode != "logits" or inputs is None or z is None or sigma is None:
            raise ValueError("Call the adapter as adapter(inputs, z, sigma) or adapter(mode='embeddings').")
        self._check_inputs(inputs)
        sigma = sigma.float().view(-1, 1)
        sd2 = sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c = self.noise_embed((sigma.log() / 4).flatten())
        prepend = (c_in * z.float())[:, None, :] + self.target_pos
        call = getattr(self.backbone, self.features) if self.features is not None else self.backbone
        hidden = self.run_hooked(lambda: call(inputs), c, prepend)
        denoised = c_out * self.norm(hidden[:, 0].float()) + c_skip * z.float()
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.head(denoised * (1 + scale) + shift)
