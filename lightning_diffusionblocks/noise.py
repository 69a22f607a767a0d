"""Noise-level math of DiffusionBlocks: pure tensor functions, no state.

Everything follows the paper (arXiv 2506.14202, App. C/E) and EDM (Karras et al. 2022):
log σ ~ N(P_mean, P_std²) truncated to [σ_min, σ_max]; groups cut the stack so that each one owns an
equal share of that probability mass; group 0 (the first layers) owns the *highest* noise.

Boundaries are returned ascending (index 0 = σ_min, index B = σ_max), like the official code; use
:func:`group_range` to get the range owned by a group in layer order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Partition = Literal["equiprobable", "uniform_log", "linear"]


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM (Karras et al. 2022, Table 1); D = c_skip·z + c_out·F(c_in·z, c_noise)."""
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class GroupRouting:
    """Routing shared by every noise schedule (σ of EDM, t of masked diffusion)."""

    def group_of(self, level: Tensor, boundaries: Tensor) -> Tensor:
        """Group index (0 = highest noise) owning each noise level, given B+1 ascending boundaries.

        A level on a boundary goes to the lower-noise group.
        """
        num_groups = len(boundaries) - 1
        inner = boundaries[1:-1].to(dtype=torch.float64, device=level.device)
        bucket = torch.bucketize(level.to(torch.float64), inner, right=False)  # 0 = lowest noise; b < x <= b'
        return (num_groups - 1 - bucket).clamp_(0, num_groups - 1)


@dataclass(frozen=True)
class NoiseSchedule(GroupRouting):
    """EDM log-normal training distribution and preconditioning constants (paper defaults)."""

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}.")
        if self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError(f"p_std and sigma_data must be positive, got {self.p_std} and {self.sigma_data}.")

    # --- log-normal CDF and its inverse -------------------------------------------------------
    def cdf(self, sigma: Tensor | float) -> Tensor:
        """Φ((ln σ − P_mean)/P_std), in float64."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        return torch.special.ndtr((s.log() - self.p_mean) / self.p_std)

    def icdf(self, q: Tensor | float) -> Tensor:
        """σ = exp(P_mean + P_std·Φ⁻¹(q)), in float64."""
        q = torch.as_tensor(q, dtype=torch.float64)
        return torch.exp(self.p_mean + self.p_std * torch.special.ndtri(q))

    # --- partition ----------------------------------------------------------------------------
    def boundaries(self, num_groups: int, partition: Partition = "equiprobable") -> Tensor:
        """B+1 ascending σ values; interval [b_i, b_{i+1}] is owned by group B−1−i.

        ``equiprobable`` cuts at equal steps of the truncated CDF (paper §3.3; B=3 → 0.1796, 0.5050),
        ``uniform_log`` at equal steps of ln σ (the ablation's "uniform"), ``linear`` at equal steps of σ.
        """
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
        frac = torch.arange(num_groups + 1, dtype=torch.float64) / num_groups
        if partition == "equiprobable":
            q_lo, q_hi = self.cdf(self.sigma_min), self.cdf(self.sigma_max)
            out = self.icdf(q_lo + frac * (q_hi - q_lo))
        elif partition == "uniform_log":
            out = torch.exp(math.log(self.sigma_min) + frac * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        elif partition == "linear":
            out = self.sigma_min + frac * (self.sigma_max - self.sigma_min)
        else:
            raise ValueError(f"Unknown partition {partition!r}; use 'equiprobable', 'uniform_log' or 'linear'.")
        out[0], out[-1] = self.sigma_min, self.sigma_max  # exact ends, no round-off
        return out

    def group_range(self, boundaries: Tensor, group: int, gamma: float = 0.0) -> tuple[float, float]:
        """(σ_lo, σ_hi) trained by ``group`` (0 = first layers = highest noise), widened by overlap γ.

        Overlap multiplies/divides each end by α = (σ_hi/σ_lo)^γ, i.e. adds γ × the log-width on both
        sides, then clamps to [σ_min, σ_max] (paper App. C).
        """
        num_groups = len(boundaries) - 1
        if not 0 <= group < num_groups:
            raise ValueError(f"group must be in [0, {num_groups}), got {group}.")
        if gamma < 0:
            raise ValueError(f"Overlap gamma must be >= 0, got {gamma}.")
        lo = float(boundaries[num_groups - 1 - group])
        hi = float(boundaries[num_groups - group])
        alpha = (hi / lo) ** gamma
        return max(lo / alpha, self.sigma_min), min(hi * alpha, self.sigma_max)

    # --- sampling σ ---------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        lo: float | None = None,
        hi: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw n σ from the log-normal truncated to [lo, hi] by inverse CDF (float32 result)."""
        lo = self.sigma_min if lo is None else lo
        hi = self.sigma_max if hi is None else hi
        if not lo < hi:
            raise ValueError(f"Need lo < hi to sample sigma, got [{lo}, {hi}].")
        dev = generator.device if generator is not None else torch.device(device)
        q_lo, q_hi = self.cdf(lo).to(dev), self.cdf(hi).to(dev)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=dev)
        sigma = self.icdf(q_lo + u * (q_hi - q_lo)).clamp_(lo, hi)
        return sigma.to(device=device, dtype=torch.float32)

    def inference_sigmas(self, steps: int) -> Tensor:
        """Descending grid of ``steps`` σ points, equally spaced in the truncated CDF, both ends included.

        Each group therefore gets about 1/B of the steps (paper App. H); the last point is σ_min.
        """
        if steps < 1:
            raise ValueError(f"Sampling needs at least 1 step, got steps={steps}.")
        if steps == 1:
            return torch.tensor([self.sigma_max], dtype=torch.float64)
        q_lo, q_hi = self.cdf(self.sigma_min), self.cdf(self.sigma_max)
        q = q_hi - torch.arange(steps, dtype=torch.float64) / (steps - 1) * (q_hi - q_lo)
        out = self.icdf(q)
        out[0], out[-1] = self.sigma_max, self.sigma_min
        return out

    # --- EDM preconditioning and loss weight --------------------------------------------------
    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM with this schedule's σ_data (see :func:`edm_scalings`)."""
        return edm_scalings(sigma, self.sigma_data)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Per-sample weight w(σ) = (σ² + σ_d²)/(σ·σ_d)², always in float32 (reaches ~2.5e5 at σ=0.002)."""
        s = sigma.float()
        return (s**2 + self.sigma_data**2) / (s * self.sigma_data) ** 2

    def mass(self, lo: float, hi: float) -> float:
        """Probability mass of the truncated log-normal inside [lo, hi]."""
        total = self.cdf(self.sigma_max) - self.cdf(self.sigma_min)
        return float((self.cdf(hi) - self.cdf(lo)) / total)


EDM = NoiseSchedule()
