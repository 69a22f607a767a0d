"""Noise levels of absorbing-state (masked) diffusion: the masking time t ∈ (0, 1].

A token is masked with probability 1 − α(t); with MD4's linear schedule α(t) = 1 − t. The continuous-time
ELBO weighs the masked cross-entropy at t by −α′(t)/(1 − α(t)) = 1/t, so the training mass over
[t_a, t_b] is α(t_a) − α(t_b): groups get equal drops of α, which for the linear schedule is t_b = b/B
(paper §2.5). Group 0 (the first layers) owns the most-masked levels, as with σ.

The class offers the same interface the module uses of :class:`~lightning_diffusionblocks.noise.NoiseSchedule`
(``boundaries``, ``group_range``, ``group_of``, ``sample``, ``sigma_min``/``sigma_max``), with t in place of σ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_diffusionblocks.noise import GroupRouting


@dataclass(frozen=True)
class MaskingSchedule(GroupRouting):
    """Linear masking schedule α(t) = 1 − t on [t_min, 1].

    ``t_min`` keeps the 1/t ELBO weight finite; the part of the ELBO below it is ~t_min × the per-token
    cross-entropy, negligible at the default.
    """

    t_min: float = 1e-4

    def __post_init__(self) -> None:
        if not 0 < self.t_min < 1:
            raise ValueError(f"t_min must be in (0, 1), got {self.t_min}.")

    # the module reads the full range through these names
    @property
    def sigma_min(self) -> float:
        return self.t_min

    @property
    def sigma_max(self) -> float:
        return 1.0

    def alpha(self, t: Tensor) -> Tensor:
        """Probability that a token is still visible at time t."""
        return 1.0 - t

    def loss_weight(self, t: Tensor) -> Tensor:
        """−α′(t)/(1 − α(t)) = 1/t, in float32."""
        return 1.0 / t.float()

    def boundaries(self, num_groups: int, partition: str = "equiprobable") -> Tensor:
        """B+1 ascending t values cut at equal drops of α (``equiprobable``, the paper) or equal steps of t
        (``linear``); both give t_b = b/B for the linear schedule."""
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
        if partition not in ("equiprobable", "linear"):
            raise ValueError(
                f"Masked diffusion partitions by equal drops of alpha(t); partition={partition!r} has no meaning"
                " here. Use partition='equiprobable' (or 'linear', identical for the linear schedule)."
            )
        out = torch.arange(num_groups + 1, dtype=torch.float64) / num_groups  # α drops equally: t = 1 − α
        out[0] = self.t_min
        return out

    def group_range(self, boundaries: Tensor, group: int, gamma: float = 0.0) -> tuple[float, float]:
        """(t_lo, t_hi) trained by ``group``, widened by γ × its width on both sides, clamped to [t_min, 1]."""
        num_groups = len(boundaries) - 1
        if not 0 <= group < num_groups:
            raise ValueError(f"group must be in [0, {num_groups}), got {group}.")
        if gamma < 0:
            raise ValueError(f"Overlap gamma must be >= 0, got {gamma}.")
        lo = float(boundaries[num_groups - 1 - group])
        hi = float(boundaries[num_groups - group])
        pad = gamma * (hi - lo)
        return max(lo - pad, self.t_min), min(hi + pad, 1.0)

    def sample(
        self,
        n: int,
        lo: float | None = None,
        hi: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """n masking times, stratified over [lo, hi] (one per 1/n slice, low-variance like MD4's antithetic
        draw), in random order; float32."""
        lo = self.t_min if lo is None else lo
        hi = 1.0 if hi is None else hi
        if not lo < hi:
            raise ValueError(f"Need lo < hi to sample t, got [{lo}, {hi}].")
        dev = generator.device if generator is not None else torch.device(device)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=dev)
        order = torch.randperm(n, generator=generator, device=dev)
        t = lo + (order + u) / n * (hi - lo)
        return t.clamp_(lo, hi).to(device=device, dtype=torch.float32)

    def grid(self, steps: int) -> Tensor:
        """Descending times 1 = t_0 > … > t_steps = 0 of an ancestral sampler with ``steps`` model calls."""
        if steps < 1:
            raise ValueError(f"Sampling needs at least 1 step, got steps={steps}.")
        return torch.arange(steps, -1, -1, dtype=torch.float64) / steps  # exact b/B points, no 1 − x round-off


LINEAR_MASKING = MaskingSchedule()
