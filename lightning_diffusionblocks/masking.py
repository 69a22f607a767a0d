"""Noise levels of absorbing-state (masked) diffusion: the masking time t ∈ (0, 1].

A token is masked with probability 1 − α(t); with MD4's linear schedule α(t) = 1 − t. The continuous-time
ELBO weighs the masked cross-entropy at t by −α′(t)/(1 − α(t)) = 1/t, so the training mass over
[t_a, t_b] is α(t_a) − α(t_b): groups get equal drops of α, which for the linear schedule is t_b = b/B
(paper §2.5). Group 0 (the first layers) owns the most-masked levels, as with σ.

:class:`MaskingSchedule` is a :class:`~lightning_diffusionblocks.levels.NoiseLevels` whose levels are t; the
training mass of its CDF is the drop of α, t itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_diffusionblocks.levels import NoiseLevels


@dataclass(frozen=True)
class MaskingSchedule(NoiseLevels):
    """Linear masking schedule α(t) = 1 − t on [t_min, 1].

    ``t_min`` keeps the 1/t ELBO weight finite; the part of the ELBO below it is ~t_min × the per-token
    cross-entropy, negligible at the default.
    """

    t_min: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}.")

    level_name = "t"
    partitions = ("equiprobable", "linear")

    @property
    def level_min(self) -> float:
        return self.t_min

    @property
    def level_max(self) -> float:
        return 1.0

    def cdf(self, t: Tensor | float) -> Tensor:
        """The ELBO's training mass below t, 1 − α(t) = t (clamped to [0, 1]), float64."""
        return torch.as_tensor(t, dtype=torch.float64).clamp(0.0, 1.0)

    def icdf(self, q: Tensor | float) -> Tensor:
        """t = q, float64."""
        return torch.as_tensor(q, dtype=torch.float64).clone()

    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still visible at time t."""
        return 1.0 - t

    def loss_weight(self, t: Tensor) -> Tensor:
        """−α′(t)/(1 − α(t)) = 1/t, in float32."""
        return 1.0 / t.float()

    def cut(self, frac: Tensor, partition: str) -> Tensor:
        """Cut points at equal drops of α (``equiprobable``, the paper) or equal steps of t (``linear``) over [0, 1];
        both give t_b = b/B for the linear schedule (the lowest end is then raised to t_min)."""
        if partition not in self.partitions:
            raise ValueError(
                f"Masked diffusion partitions by equal drops of alpha(t); partition={partition!r} has no meaning"
                " here. Use partition='equiprobable' (or 'linear', identical for the linear schedule)."
            )
        return frac.clone()  # α drops equally: t = 1 − α

    # widening: the base class's γ × the group's width on both sides, clamped to [t_min, 1]

    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """n masking times, stratified over [lo, hi] (one per 1/n slice, low-variance like MD4's antithetic
        draw), in random order; float64."""
        self.check_range(lo, hi)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        order = torch.randperm(n, generator=generator, device=device)
        t = lo + (order + u) / n * (hi - lo)
        return t.clamp_(lo, hi)

    def grid(self, steps: int) -> Tensor:
        """Descending times 1 = t_0 > … > t_steps = 0 of an ancestral sampler with ``steps`` model calls."""
        if steps < 1:
            raise ValueError(f"Sampling needs at least 1 step, got steps={steps}.")
        return torch.arange(steps, -1, -1, dtype=torch.float64) / steps  # exact b/B points, no 1 − x round-off

    def sampling_grid(self, steps: int) -> Tensor:
        """The same as :meth:`grid`."""
        return self.grid(steps)


LINEAR_MASKING = MaskingSchedule()
