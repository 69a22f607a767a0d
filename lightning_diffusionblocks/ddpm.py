"""Discrete timesteps of DDPM (Ho et al. 2020): x_k = √ᾱ_k·x + √(1 − ᾱ_k)·ε, k ∈ {0, …, T − 1}.

A timestep is an EDM noise level: x_k/√ᾱ_k = x + σ_k·ε with σ_k = √((1 − ᾱ_k)/ᾱ_k), increasing in k, so a larger
timestep is more noise and group 0 (the first layers) owns the largest timesteps. DiffusionBlocks' partition is
the quantiles of the training timestep distribution: uniform timesteps give each group an equal count.

Levels are timesteps as floats and the B+1 ascending boundaries sit half-way between timesteps
(−0.5, …, T − 0.5), so every timestep is owned by exactly one group. :class:`DDPMSchedule` is a
:class:`~lightning_diffusionblocks.levels.NoiseLevels` whose levels are timesteps; a sampler's walk ends at −1, the
clean data (ᾱ = 1, diffusers' ``final_alpha_cumprod``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_diffusionblocks.levels import NoiseLevels

BetaSchedule = Literal["linear", "cosine"]
DDPMPrediction = Literal["epsilon", "v"]
_MAX_BETA = 0.999  # the cosine schedule's clip (Nichol & Dhariwal 2021)


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> Tensor:
    """β_k evenly spaced from β_start to β_end (DDPM: 1e-4 to 0.02 over 1000 steps), float64."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008) -> Tensor:
    """β_k = 1 − ᾱ(k+1)/ᾱ(k) with ᾱ(u) = cos²((u/T + s)/(1 + s)·π/2), clipped at 0.999 (improved DDPM), float64."""
    u = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=_MAX_BETA)


def ddpm_target(prediction: DDPMPrediction, x: Tensor, eps: Tensor, alpha_bar: Tensor) -> Tensor:
    """What the network learns: ε, or v = √ᾱ·ε − √(1 − ᾱ)·x (Salimans & Ho 2022)."""
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x
    raise ValueError(f"Unknown prediction {prediction!r}; use 'epsilon' or 'v'.")


def eps_and_x0(prediction: DDPMPrediction, out: Tensor, z: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
    """(ε̂, x̂₀) implied by a network output at state z: ε-prediction x̂₀ = (z − √(1−ᾱ)ε̂)/√ᾱ; v-prediction
    x̂₀ = √ᾱ·z − √(1−ᾱ)·v̂ and ε̂ = √(1−ᾱ)·z + √ᾱ·v̂."""
    a, b = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    if prediction == "epsilon":
        return out, (z - b * out) / a
    if prediction == "v":
        return b * z + a * out, a * z - b * out
    raise ValueError(f"Unknown prediction {prediction!r}; use 'epsilon' or 'v'.")


@dataclass(frozen=True)
class DDPMSchedule(NoiseLevels):
    """A β schedule over T discrete timesteps and the training distribution of those timesteps.

    Args:
        num_timesteps: T.
        beta_schedule: ``"linear"`` (β from ``beta_start`` to ``beta_end``, DDPM) or ``"cosine"`` (improved DDPM).
        timestep_weights: relative training frequency of each timestep (length T); default uniform. The
            partition is at the quantiles of this distribution and training draws timesteps from it.
    """

    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    timestep_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.num_timesteps, bool) or not isinstance(self.num_timesteps, int) or self.num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {self.num_timesteps!r}.")
        if self.beta_schedule not in ("linear", "cosine"):
            raise ValueError(f"Unknown beta_schedule {self.beta_schedule!r}; use 'linear' or 'cosine'.")
        if not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"Need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}.")
        if self.timestep_weights is not None:
            weights = tuple(float(w) for w in self.timestep_weights)
            if len(weights) != self.num_timesteps or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"timestep_weights must hold {self.num_timesteps} non-negative numbers (one per timestep) with a"
                    f" positive sum; got {len(weights)} numbers. Pass None for uniform timesteps."
                )
            object.__setattr__(self, "timestep_weights", weights)

    level_name = "timesteps"
    pipeline_time = "discrete"
    level_end = -1.0
    partitions = ("equiprobable", "linear")

    # the full range: every timestep, with half-step margins
    @property
    def level_min(self) -> float:
        return -0.5

    @property
    def level_max(self) -> float:
        return self.num_timesteps - 0.5

    # --- the noise schedule --------------------------------------------------------------------
    def betas(self) -> Tensor:
        """β_0 … β_{T−1}, float64."""
        if self.beta_schedule == "cosine":
            return cosine_betas(self.num_timesteps)
        return linear_betas(self.num_timesteps, self.beta_start, self.beta_end)

    def alpha_bar(self, timesteps: Tensor | None = None) -> Tensor:
        """ᾱ_k = ∏_{j ≤ k} (1 − β_j) of each timestep (all T by default), float64."""
        table = torch.cumprod(1 - self.betas(), dim=0)
        if timesteps is None:
            return table
        return table.to(timesteps.device)[timesteps.long()]

    def sigma(self, timesteps: Tensor) -> Tensor:
        """The EDM noise level of a timestep, σ_k = √((1 − ᾱ_k)/ᾱ_k) (x_k/√ᾱ_k = x + σ_k·ε)."""
        a = self.alpha_bar(timesteps)
        return ((1 - a) / a).sqrt()

    def edm_sigma(self, levels: Tensor) -> Tensor:
        """σ_k of each timestep; between two timesteps (where a group edge sits) linear in k."""
        table = self.sigma(torch.arange(self.num_timesteps))
        k = torch.as_tensor(levels, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        lo, hi = k.floor().long(), k.ceil().long()
        return torch.lerp(table[lo], table[hi], k - lo)

    def probabilities(self) -> Tensor:
        """Training probability of each timestep, float64 (uniform unless ``timestep_weights``)."""
        if self.timestep_weights is None:
            return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)
        w = torch.tensor(self.timestep_weights, dtype=torch.float64)
        return w / w.sum()

    def loss_weight(self, timesteps: Tensor) -> Tensor:
        """Per-sample weight: 1 (DDPM's simple loss), float32."""
        return torch.ones_like(timesteps, dtype=torch.float32)

    def cdf(self, level: Tensor | float) -> Tensor:
        """P(K ≤ level) of the training distribution of timesteps K, float64."""
        level = torch.as_tensor(level, dtype=torch.float64)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.probabilities(), 0)])
        count = (torch.floor(level) + 1).clamp(0, self.num_timesteps).long()  # timesteps 0 … ⌊level⌋
        return cumulative.to(count.device)[count]

    def icdf(self, q: Tensor | float) -> Tensor:
        """The smallest timestep k with P(K ≤ k) ≥ q, as float64."""
        q = torch.as_tensor(q, dtype=torch.float64)
        cumulative = torch.cumsum(self.probabilities(), 0).to(q.device)
        k = torch.searchsorted(cumulative, q.reshape(-1), right=False).clamp_(0, self.num_timesteps - 1)
        return k.to(torch.float64).reshape(q.shape)

    def mass(self, lo: float, hi: float) -> float:
        """Training probability of the timesteps inside [lo, hi]."""
        k = torch.arange(self.num_timesteps, dtype=torch.float64)
        return float(self.probabilities()[(k >= lo) & (k <= hi)].sum())

    # --- partition --------------------------------------------------------------------------------
    def boundaries(self, num_groups: int, partition: str = "equiprobable") -> Tensor:
        """B+1 ascending boundaries at half timesteps; the timesteps in [b_i, b_{i+1}] belong to group B−1−i.

        ``equiprobable`` cuts at the quantiles of the training distribution: group edge c_b = the number of
        timesteps whose cumulative probability is ≤ b/B (uniform timesteps: equal counts, ±1 when B does not
        divide T); ``linear`` cuts at equal counts whatever the weights.
        """
        if num_groups > self.num_timesteps:
            raise ValueError(
                f"num_groups={num_groups} exceeds the {self.num_timesteps} timesteps; every group needs one. Lower B."
            )
        return super().boundaries(num_groups, partition)

    def cut(self, frac: Tensor, partition: str) -> Tensor:
        """Group edges at half timesteps (see :meth:`boundaries`)."""
        t = self.num_timesteps
        if partition == "equiprobable":
            cumulative = torch.cumsum(self.probabilities(), 0)
            edges = torch.searchsorted(cumulative, frac + 1e-12, right=True)
        elif partition == "linear":
            edges = torch.round(frac * t).long()
        else:
            raise ValueError(
                f"Partition {partition!r} has no meaning for discrete timesteps; use 'equiprobable' (quantiles of the"
                " timestep distribution) or 'linear' (equal timestep counts)."
            )
        edges[0], edges[-1] = 0, t
        if not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError(
                f"The quantiles of the timestep weights leave a group without timesteps (edges {edges.tolist()}): one"
                " timestep carries more than 1/B of the training probability. Lower B or flatten timestep_weights."
            )
        return edges.to(torch.float64) - 0.5

    # widening: the base class's γ × the width in timesteps on both sides (the space the training distribution and
    # the partition live in), clamped to [−0.5, T − 0.5]

    # --- drawing timesteps ----------------------------------------------------------------------------
    def draw(self, n: int, lo: float, hi: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """n timesteps k with lo ≤ k ≤ hi from the training distribution restricted there, by inverse CDF (no
        rejection loop); integer values (float32 once :meth:`sample` returns them)."""
        k_lo, k_hi = max(math.ceil(lo), 0), min(math.floor(hi), self.num_timesteps - 1)
        cumulative = torch.cumsum(self.probabilities(), 0)
        q_lo = float(cumulative[k_lo - 1]) if k_lo > 0 else 0.0
        q_hi = float(cumulative[k_hi]) if k_hi >= k_lo else q_lo
        if not q_hi > q_lo:
            raise ValueError(f"No timestep with training probability lies in [{lo}, {hi}].")
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=device)
        q = q_lo + u * (q_hi - q_lo)
        return torch.searchsorted(cumulative.to(device), q, right=True).clamp_(k_lo, k_hi)

    def grid(self, steps: int) -> Tensor:
        """Descending timesteps T − 1 = k_0 > … > k_{steps−1} = 0 where DDIM calls the network (evenly spaced,
        both ends included), long."""
        t = self.num_timesteps
        if not 1 <= steps <= t:
            raise ValueError(f"DDIM needs 1 <= steps <= num_timesteps={t}, got steps={steps}.")
        if steps == 1:
            return torch.tensor([t - 1])
        return torch.round(torch.linspace(t - 1, 0, steps, dtype=torch.float64)).long()

    def sampling_grid(self, steps: int) -> Tensor:
        """:meth:`grid` as float64, then −1 (the clean data, ᾱ = 1)."""
        return torch.cat([self.grid(steps).to(torch.float64), torch.tensor([self.level_end], dtype=torch.float64)])


DDPM_LINEAR = DDPMSchedule()
