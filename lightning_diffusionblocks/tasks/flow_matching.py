"""Rectified flow / flow matching: x_t = (1 − t)·x + t·ε, the network predicts the velocity v = ε − x.

The network is the user's, unchanged, in its own time convention: ``forward(x_t, t, labels)`` with t ∈ [0, 1]
(``time_scale`` multiplies it, e.g. 1000 for networks that embed t·1000; ``reverse_time`` for projects whose
t = 0 is noise and whose velocity is x − ε). Group 0 (the first layers) owns the highest t, the most noise. Its
null label, call convention and sample shape are discovered as for :class:`ImageGeneration`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.flow import (
    RECTIFIED_FLOW,
    FlowSchedule,
    Grid,
    Prediction,
    Sampler,
    flow_target,
    interpolate,
    velocity_of,
)
from lightning_diffusionblocks.levels import append_dims
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import classifier_free_guidance, flow_sample
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration

EXPECTED_CALL = (
    "FlowMatching calls the network as forward(x_t, t, labels=None) (x_t = (1 − t)·x + t·ε, t = time_scale·t per"
    " sample, labels = class ids) and reads its output as the velocity ε − x (or x₀ / ε, see `prediction`)"
)


class FlowMatching(ImageGeneration):
    """Class-conditional (or unconditional) generation with rectified flow, trained block-wise in t.

    Batches are ``(images, labels)`` or ``images``, scaled to about [-1, 1]. The loss is the MSE of the network's
    output against its target (velocity ε − x by default) times the schedule's weight (1). A share
    ``label_dropout`` of labels becomes the null label so classifier-free guidance works.

    Args:
        noise: the :class:`~lightning_diffusionblocks.flow.FlowSchedule` (logit-normal (m, s) with a shift, or uniform).
        prediction: what the network outputs: ``"velocity"`` (ε − x), ``"x0"`` or ``"epsilon"``.
        label_dropout: share of labels dropped to the null label in training.
        null_label: the network's "no label" id; default discovered (see :class:`ImageGeneration`).
        null_conditioning: the "no conditioning" value of dict-batch keys (see :class:`ImageGeneration`).
        conditioning_keys: the dict-batch keys the network takes (see :class:`ImageGeneration`).
        time_scale: the network receives ``time_scale``·t (1 for t ∈ [0, 1], 1000 for t·1000 conventions).
        reverse_time: the network's time runs the other way (t = 0 noise, t = 1 data; Lipman et al., torchcfm): it
            receives ``time_scale``·(1 − t) and a velocity output is read as x − ε.
        sampler: ``"euler"`` (``steps`` network calls) or ``"heun"`` (2·steps − 1 calls).
        grid: the sampling times: ``"uniform"`` in t (shifted like the training distribution) or ``"equiprobable"``
            (each group serves ~1/B of the steps).
        loss_bins: when > 0, validation also logs the loss in that many equal bins of t (``loss_t_<lo>-<hi>``),
            each sample served by the group owning its t.
    """

    expected_call = EXPECTED_CALL

    def __init__(
        self,
        noise: FlowSchedule = RECTIFIED_FLOW,
        prediction: Prediction = "velocity",
        label_dropout: float = 0.1,
        null_label: int | None = None,
        time_scale: float = 1.0,
        reverse_time: bool = False,
        sampler: Sampler = "euler",
        grid: Grid = "uniform",
        loss_bins: int = 0,
        null_conditioning: Mapping[str, Any] | None = None,
        conditioning_keys: Sequence[str] | None = None,
    ) -> None:
        if not isinstance(noise, FlowSchedule):
            raise TypeError(f"FlowMatching needs a FlowSchedule (lightning_diffusionblocks.flow), got {noise!r}.")
        if prediction not in ("velocity", "x0", "epsilon"):
            raise ValueError(f"Unknown prediction {prediction!r}; use 'velocity', 'x0' or 'epsilon'.")
        if sampler not in ("euler", "heun"):
            raise ValueError(f"Unknown sampler {sampler!r}; use 'euler' or 'heun'.")
        if grid not in ("uniform", "equiprobable"):
            raise ValueError(f"Unknown grid {grid!r}; use 'uniform' or 'equiprobable'.")
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}.")
        if isinstance(loss_bins, bool) or not isinstance(loss_bins, int) or loss_bins < 0:
            raise ValueError(f"loss_bins must be a non-negative integer, got {loss_bins!r}.")
        super().__init__(
            label_dropout=label_dropout,
            noise=noise,
            null_label=null_label,
            null_conditioning=null_conditioning,
            conditioning_keys=conditioning_keys,
        )
        self.noise: FlowSchedule = noise  # levels are t
        self.prediction = prediction
        self.time_scale = time_scale
        self.reverse_time = reverse_time
        self.sampler = sampler
        self.grid = grid
        self.loss_bins = loss_bins

    def noise_input(self) -> dict[str, Any]:
        """What the network receives as its noise level (see :meth:`ImageGeneration.noise_input`): time_scale·t, or
        time_scale·(1 − t) with ``reverse_time``, t ∈ [0, 1] the share of noise."""
        return {"kind": "flow_time", "scale": self.time_scale, "reverse": self.reverse_time}

    # ------------------------------------------------------------------ formulas
    def network_time(self, t: Tensor) -> Tensor:
        """What the network receives for time t: time_scale·t, or time_scale·(1 − t) with ``reverse_time``."""
        return self.time_scale * ((1 - t) if self.reverse_time else t).float()

    def predict(self, run: Runner, z: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The network's output at (z, t) in this task's convention (a ``reverse_time`` velocity flips sign), fp32."""
        out = self.convention.call(run, z, self.network_time(t), labels).float()
        return -out if self.reverse_time and self.prediction == "velocity" else out

    def velocity(self, run: Runner, z: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """dz/dt at (z, t) from the network's prediction (see :func:`~lightning_diffusionblocks.flow.velocity_of`)."""
        return velocity_of(self.prediction, self.predict(run, z, t, labels), z.float(), append_dims(t.float(), z.ndim))

    def denoise(self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """The clean-image estimate at time t (passed as ``sigma``, the module's name for a level): x̂ = z − t·v."""
        return z.float() - append_dims(sigma.float(), z.ndim) * self.velocity(run, z, sigma, labels)

    def per_sample_loss(self, run: Runner, images: Tensor, labels: Tensor | None, t: Tensor, eps: Tensor) -> Tensor:
        """w(t)·mean((output − target)²) per sample at times t (N,) with noise ε."""
        z = interpolate(images, eps, append_dims(t, images.ndim).to(images))
        out = self.predict(run, z, t, labels)
        target = flow_target(self.prediction, images.float(), eps.float())
        return self.noise.loss_weight(t) * (out - target).pow(2).flatten(1).mean(1)

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        images, labels = self.split(batch)
        labels = self.drop_labels(labels, generator)
        eps = torch.randn(images.shape, generator=generator, device=generator.device).to(images)
        return self.per_sample_loss(run, images, labels, sigma.to(images.device), eps)

    # ------------------------------------------------------------------ evaluation and inference
    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """The loss in ``loss_bins`` equal bins of t (minRF's per-t-bin loss), each sample routed to its group."""
        if not self.loss_bins:
            return {}
        bins = []
        for k in range(self.loss_bins):
            lo, hi = k / self.loss_bins, (k + 1) / self.loss_bins
            inside = max(lo, self.noise.level_min), min(hi, self.noise.level_max)
            if inside[0] < inside[1]:  # else a bin outside the trained range of t
                bins.append((f"loss_t_{lo:g}-{hi:g}", *inside))
        return self.binned_losses(router, batch, batch_idx, bins)

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
        """Integrate the flow from pure noise (t = t_max) to t = 0, every call served by the group owning its t
        (Euler: ``steps`` calls; Heun: 2·steps − 1); ``guidance`` > 1 mixes conditional and null-label velocities,
        v_u + g·(v_c − v_u). Called by :meth:`ImageGeneration.sample`, which holds the arguments."""

        def velocity(z: Tensor, t_vec: Tensor, t: float) -> Tensor:
            predict = partial(self.velocity, router.at(t))
            return classifier_free_guidance(predict, z, t_vec, labels, self.null_of(labels), guidance)

        return flow_sample(velocity, noise.to(router.device), self.noise.grid(steps, self.grid), self.sampler)
