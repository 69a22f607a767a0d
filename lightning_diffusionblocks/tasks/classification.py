"""Discrete targets: image classification as denoising of L2-normalised label embeddings.

Training (paper App. C; official ViT code): the clean target is y = normalize(E[label]); the group sees
z = y + σε with σ from its range and reads out class logits; the loss is the per-sample σ-weighted
cross-entropy. Prediction walks an equi-probable σ grid from σ_max: at each step the owning group gives
logits, their expectation softmax(logits)·Ê (the *same* normalised embeddings as in training) is the
denoised estimate for the Euler step, and the last step's softmax is the class distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.tasks.base import Runner, Task


class Classification(Task):
    """Batches are ``(inputs, labels)``; the network is a :class:`ConditioningAdapter`-like module:
    ``net(inputs, z, sigma)`` → logits and ``net(mode="embeddings")`` → normalised label embeddings.

    ``weighting``: ``"per_sample"`` multiplies each sample's cross-entropy by w(σ) (the paper's formula);
    ``"batch_mean"`` multiplies the batch's mean cross-entropy by the batch's mean w(σ) (what the official
    code computes, through a broadcast); ``"none"`` is plain cross-entropy. With per-sample weights the
    lowest-σ samples, whose noisy target already reveals the label, carry weights up to ~2.5e5 and drown
    the image-dependent signal of the others; ``"batch_mean"`` keeps every sample's share equal.
    """

    def __init__(
        self,
        num_classes: int,
        noise: NoiseSchedule = EDM,
        weighting: Literal["per_sample", "batch_mean", "none"] = "per_sample",
    ) -> None:
        super().__init__(noise)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if weighting not in ("per_sample", "batch_mean", "none"):
            raise ValueError(f"weighting must be 'per_sample', 'batch_mean' or 'none', got {weighting!r}.")
        self.num_classes = num_classes
        self.weighting = weighting

    def split(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("Classification expects batches of `(inputs, labels)`.")
        inputs, labels = batch
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.ndim != 1:
            raise ValueError(f"Labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}.")
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"Labels must be in [0, {self.num_classes}); got {labels[bad][:5].tolist()}."
                " Check num_classes or the data set's label mapping."
            )
        return inputs, labels.long()

    def batch_size(self, batch: Any) -> int:
        return self.split(batch)[0].shape[0]

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        inputs, labels = self.split(batch)
        targets = run(mode="embeddings")[labels]
        eps = torch.randn(targets.shape, generator=generator, device=generator.device).to(targets)
        z = targets + sigma.view(-1, 1).to(targets) * eps
        logits = run(inputs, z, sigma, sigma_data=self.noise.sigma_data)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        if self.weighting == "per_sample":
            return self.noise.loss_weight(sigma) * ce
        if self.weighting == "batch_mean":
            return self.noise.loss_weight(sigma).mean() * ce
        return ce

    @torch.no_grad()
    def predict(
        self,
        run_group: Callable[[int | None], Runner],
        route: Callable[[float], int | None],
        inputs: Tensor,
        steps: int,
        seed: int = 0,
    ) -> Tensor:
        """Class probabilities (N, C) after ``steps`` σ steps (chosen now, default B in the module)."""
        if steps < 1:
            raise ValueError(f"Prediction needs at least 1 inference step, got steps={steps}.")
        sigmas = self.noise.inference_sigmas(steps).tolist()
        n = inputs.shape[0]
        embeddings = run_group(route(sigmas[0]))(mode="embeddings")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        z = (torch.randn(n, embeddings.shape[1], generator=gen) * sigmas[0]).to(inputs.device)
        probs = None
        for i, sigma in enumerate(sigmas):
            run = run_group(route(sigma))
            sigma_vec = torch.full((n,), sigma, device=inputs.device)
            probs = run(inputs, z, sigma_vec, sigma_data=self.noise.sigma_data).float().softmax(-1)
            if i + 1 < len(sigmas):
                denoised = probs @ run(mode="embeddings").float()
                z = z + (sigmas[i + 1] - sigma) * (z - denoised) / sigma
        assert probs is not None
        return probs
