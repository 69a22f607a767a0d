"""DDPM: discrete timesteps k ∈ {0, …, T − 1}, x_k = √ᾱ_k·x + √(1 − ᾱ_k)·ε, ε- or v-prediction, DDIM sampling.

The network is the user's, unchanged: ``forward(x_k, k, labels)`` receives integer timesteps (a long tensor).
Group 0 (the first layers) owns the largest timesteps, the most noise; each group owns an equal share of the
training timestep distribution. Its null label, call convention and sample shape are discovered as for
:class:`ImageGeneration`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.ddpm import DDPM_LINEAR, DDPMPrediction, DDPMSchedule, ddpm_target, eps_and_x0
from lightning_diffusionblocks.levels import append_dims
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import classifier_free_guidance, ddim_sample
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration

EXPECTED_CALL = (
    "DDPM calls the network as forward(x_k, k, labels=None) (x_k = √ᾱ_k·x + √(1 − ᾱ_k)·ε, k = integer timesteps"
    " per sample, labels = class ids) and reads its output as ε (or v, see `prediction`)"
)


class DDPM(ImageGeneration):
    """Class-conditional (or unconditional) DDPM, trained block-wise over its timesteps.

    Batches are ``(images, labels)`` or ``images``, scaled to about [-1, 1]. The loss is DDPM's simple loss, the
    MSE of the output against ε (or v), times the schedule's weight (1). A share ``label_dropout`` of labels
    becomes the null label so classifier-free guidance works. Sampling is DDIM over ``steps`` evenly spaced
    timesteps from T − 1 to 0, each served by the group that owns it.

    Args:
        noise: the :class:`~lightning_diffusionblocks.ddpm.DDPMSchedule` (T, linear or cosine β, timestep weights).
        prediction: what the network outputs: ``"epsilon"`` or ``"v"``.
        label_dropout: share of labels dropped to the null label in training.
        null_label: the network's "no label" id; default discovered (see :class:`ImageGeneration`).
        null_conditioning: the "no conditioning" value of dict-batch keys (see :class:`ImageGeneration`).
        conditioning_keys: the dict-batch keys the network takes (see :class:`ImageGeneration`).
        eta: DDIM's η (0 deterministic; 1 ≈ DDPM's ancestral sampler).
        loss_bins: when > 0, validation also logs the loss in that many equal ranges of timesteps
            (``loss_k_<first>-<last>``), each sample served by the group owning its timestep.
    """

    expected_call = EXPECTED_CALL

    def __init__(
        self,
        noise: DDPMSchedule = DDPM_LINEAR,
        prediction: DDPMPrediction = "epsilon",
        label_dropout: float = 0.1,
        null_label: int | None = None,
        eta: float = 0.0,
        loss_bins: int = 0,
        null_conditioning: Mapping[str, Any] | None = None,
        conditioning_keys: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(noise, DDPMSchedule):
            raise TypeError(f"DDPM needs a DDPMSchedule (lightning_diffusionblocks.ddpm), got {noise!r}.")
        if prediction not in ("epsilon", "v"):
            raise ValueError(f"Unknown prediction {prediction!r}; use 'epsilon' or 'v'.")
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM), got {eta}.")
        if isinstance(loss_bins, bool) or not isinstance(loss_bins, int) or not 0 <= loss_bins <= noise.num_timesteps:
            raise ValueError(f"loss_bins must be an integer in [0, {noise.num_timesteps}], got {loss_bins!r}.")
        super().__init__(
            label_dropout=label_dropout,
            noise=noise,
            null_label=null_label,
            null_conditioning=null_conditioning,
            conditioning_keys=conditioning_keys,
        )
        self.noise: DDPMSchedule = noise  # levels are timesteps
        self.prediction = prediction
        self.eta = eta
        self.loss_bins = loss_bins

    def noise_input(self) -> dict[str, Any]:
        """What the network receives as its noise level (see :meth:`ImageGeneration.noise_input`): the integer
        timestep k ∈ {0, …, T − 1}."""
        return {"kind": "ddpm_timestep", "num_timesteps": self.noise.num_timesteps}

    # ------------------------------------------------------------------ formulas
    def predict(self, run: Runner, z: Tensor, timesteps: Tensor, labels: Tensor | None) -> Tensor:
        """The network's output (ε̂ or v̂) at state z and integer timesteps, fp32."""
        return self.convention.call(run, z, timesteps.long(), labels).float()

    def denoise(self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """The clean-image estimate x̂₀ at timesteps k (passed as ``sigma``, the module's name for a level)."""
        alpha_bar = append_dims(self.noise.alpha_bar(sigma).float(), z.ndim)
        return eps_and_x0(self.prediction, self.predict(run, z, sigma, labels), z.float(), alpha_bar)[1]

    def per_sample_loss(
        self, run: Runner, images: Tensor, labels: Tensor | None, timesteps: Tensor, eps: Tensor
    ) -> Tensor:
        """w(k)·mean((output − target)²) per sample at timesteps k (N,) with noise ε."""
        alpha_bar = append_dims(self.noise.alpha_bar(timesteps).float(), images.ndim)
        z = (alpha_bar.sqrt() * images.float() + (1 - alpha_bar).sqrt() * eps.float()).to(images.dtype)
        out = self.predict(run, z, timesteps, labels)
        target = ddpm_target(self.prediction, images.float(), eps.float(), alpha_bar)
        return self.noise.loss_weight(timesteps) * (out - target).pow(2).flatten(1).mean(1)

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        images, labels = self.split(batch)
        labels = self.drop_labels(labels, generator)
        eps = torch.randn(images.shape, generator=generator, device=generator.device).to(images)
        return self.per_sample_loss(run, images, labels, sigma.to(images.device), eps)

    # ------------------------------------------------------------------ evaluation and inference
    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """The loss in ``loss_bins`` equal ranges of timesteps, each sample routed to the group owning its timestep."""
        if not self.loss_bins:
            return {}
        edges = torch.round(torch.linspace(0, self.noise.num_timesteps, self.loss_bins + 1)).long().tolist()
        bins = [(f"loss_k_{first}-{end - 1}", first - 0.5, end - 0.5) for first, end in zip(edges[:-1], edges[1:])]
        return self.binned_losses(router, batch, batch_idx, [b for b in bins if self.noise.mass(b[1], b[2]) > 0])

    def integrate(
        self,
        router: Router,
        noise: Tensor,
        labels: Tensor | None,
        guidance: float,
        steps: int,
        generator: torch.Generator,
        clip: bool | tuple[float, float],
    ) -> Tensor:
        """DDIM over ``steps`` timesteps (1 ≤ steps ≤ T), each call served by the group owning its timestep; the
        last step returns x̂₀. ``guidance`` > 1 mixes conditional and null-label outputs, u + g·(c − u). ``clip``
        clamps x̂₀ at *every* step, with ε̂ recomputed from the clamped x̂₀ (DDPM's ``clip_denoised``): an
        ε-prediction's error is multiplied by 1/√ᾱ in x̂₀ at high noise (×156 at the linear schedule's last
        timestep), and the clamp keeps it from compounding. Called by :meth:`ImageGeneration.sample`, which holds
        the arguments and clamps the result once more."""
        alpha_bar = self.noise.alpha_bar().tolist()

        def eps_x0(z: Tensor, k_vec: Tensor, k: int) -> tuple[Tensor, Tensor]:
            predict = partial(self.predict, router.at(float(k)))
            out = classifier_free_guidance(predict, z, k_vec, labels, self.null_of(labels), guidance)
            eps, x0 = eps_and_x0(self.prediction, out, z, torch.tensor(alpha_bar[k]))
            if clip is not False:
                x0 = self._clip(x0, clip)
                eps = (z - math.sqrt(alpha_bar[k]) * x0) / math.sqrt(1 - alpha_bar[k])
            return eps, x0

        timesteps = self.noise.grid(steps).tolist()
        return ddim_sample(eps_x0, noise.to(router.device), timesteps, alpha_bar, self.eta, generator)
