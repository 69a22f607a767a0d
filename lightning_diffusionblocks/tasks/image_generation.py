"""Continuous targets: class-conditional image generation with EDM preconditioning and an L2 loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.tasks.base import Runner, Task


class ImageGeneration(Task):
    """Denoise images y + σε back to y; the conditioning x is the class label (or nothing).

    Batches are ``(images, labels)`` or ``images``; images should be scaled to about [-1, 1]. During
    training a share ``label_dropout`` of labels is replaced by -1 (the null label) so the model also
    learns the unconditional denoiser that classifier-free guidance needs.
    """

    def __init__(self, label_dropout: float = 0.1, noise: NoiseSchedule = EDM) -> None:
        super().__init__(noise)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        self.label_dropout = label_dropout

    @staticmethod
    def split(batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            "ImageGeneration expects batches of `images` or `(images, labels)`, got"
            f" {type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}."
        )

    def batch_size(self, batch: Any) -> int:
        return self.split(batch)[0].shape[0]

    def denoise(self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """EDM denoiser D(z; σ) = c_skip·z + c_out·F(c_in·z, c_noise, labels), in float32."""
        c_skip, c_out, c_in, c_noise = self.noise.precondition(sigma.float())
        shape = (-1,) + (1,) * (z.ndim - 1)
        out = run((c_in.view(shape) * z).to(z.dtype), c_noise, labels)
        return c_skip.view(shape) * z.float() + c_out.view(shape) * out.float()

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        images, labels = self.split(batch)
        if labels is not None and self.label_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=generator.device) < self.label_dropout
            labels = torch.where(drop.to(labels.device), torch.full_like(labels, -1), labels)
        eps = torch.randn(images.shape, generator=generator, device=generator.device).to(images)
        shape = (-1,) + (1,) * (images.ndim - 1)
        z = images + sigma.view(shape).to(images) * eps
        denoised = self.denoise(run, z, sigma, labels)
        per_sample = (denoised - images.float()).pow(2).flatten(1).mean(1)
        return self.noise.loss_weight(sigma) * per_sample

    def guided_denoise(
        self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None, guidance: float = 1.0
    ) -> Tensor:
        """Denoiser with classifier-free guidance: D_u + g·(D_c − D_u), both halves in one batch."""
        if labels is None or guidance == 1.0:
            return self.denoise(run, z, sigma, labels)
        both = self.denoise(
            run, torch.cat([z, z]), torch.cat([sigma, sigma]), torch.cat([labels, -torch.ones_like(labels)])
        )
        cond, uncond = both.chunk(2)
        return uncond + guidance * (cond - uncond)
