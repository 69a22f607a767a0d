"""Noise-level math of DiffusionBlocks: pure tensor functions, no state.

Everything follows the paper (arXiv 2506.14202, App. C/E) and EDM (Karras et al. 2022):
log σ ~ N(P_mean, P_std²) truncated to [σ_min, σ_max]; groups cut the stack so that each one owns an
equal share of that probability mass; group 0 (the first layers) owns the *highest* noise.

Boundaries are returned ascending (index 0 = σ_min, index B = σ_max), like the official code; use
:meth:`~lightning_diffusionblocks.levels.NoiseLevels.group_range` to get the range owned by a group in layer order.
:class:`NoiseSchedule` is a :class:`~lightning_diffusionblocks.levels.NoiseLevels` whose levels are σ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_diffusionblocks.levels import PARTITIONS, GroupRouting, NoiseLevels

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


@dataclass(frozen=True)
class NoiseSchedule(NoiseLevels):
    """EDM log-normal training distribution and preconditioning constants (paper defaults); levels are σ.

    Partitions (:meth:`boundaries`): ``equiprobable`` cuts at equal steps of the truncated CDF (paper §3.3; B=3 →
    0.1796, 0.5050), ``uniform_log`` at equal steps of ln σ (the ablation's "uniform"), ``linear`` at equal steps of σ.
    """

    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    level_name = "sigma"
    partitions = PARTITIONS

    def __post_init__(self) -> None:
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"Need 0 < sigma_min < sigma_max, got {self.sigma_min} and {self.sigma_max}.")
        if self.p_std <= 0 or self.sigma_data <= 0:
            raise ValueError(f"p_std and sigma_data must be positive, got {self.p_std} and {self.sigma_data}.")

    @property
    def level_min(self) -> float:
        return self.sigma_min

    @property
    def level_max(self) -> float:
        return self.sigma_max

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
    def cut_other(self, frac: Tensor, partition: str) -> Tensor:
        """``uniform_log``: equal steps of ln σ."""
        if partition != "uniform_log":
            raise self.unknown_partition(partition)
        return torch.exp(math.log(self.sigma_min) + frac * (math.log(self.sigma_max) - math.log(self.sigma_min)))

    def widen(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """Overlap multiplies/divides each end by α = (σ_hi/σ_lo)^γ, i.e. adds γ × the log-width on both sides
        (paper App. C); :meth:`group_range` then clamps to [σ_min, σ_max]."""
        alpha = (hi / lo) ** gamma
        return lo / alpha, hi * alpha

    # --- sampling σ ---------------------------------------------------------------------------
    def inference_sigmas(self, steps: int) -> Tensor:
        """Descending grid of ``steps`` σ points, equally spaced in the truncated CDF, both ends included.

        Each group therefore gets about 1/B of the steps (paper App. H); the last point is σ_min. The same as
        :meth:`sampling_grid` without its final 0.
        """
        return self.equiprobable_grid(steps)

    # --- EDM preconditioning and loss weight --------------------------------------------------
    def precondition(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) of EDM with this schedule's σ_data (see :func:`edm_scalings`)."""
        return edm_scalings(sigma, self.sigma_data)

    def edm_sigma(self, levels: Tensor) -> Tensor:
        """σ itself: EDM's levels are its σ."""
        return torch.as_tensor(levels, dtype=torch.float64)

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """Per-sample weight w(σ) = (σ² + σ_d²)/(σ·σ_d)², always in float32 (reaches ~2.5e5 at σ=0.002)."""
        s = sigma.float()
        return (s**2 + self.sigma_data**2) / (s * self.sigma_data) ** 2


EDM = NoiseSchedule()

__all__ = ["EDM", "GroupRouting", "NoiseSchedule", "Partition", "edm_scalings"]
