"""Times of rectified flow / flow matching: x_t = (1 − t)·x + t·ε, t ∈ [0, 1], t = 1 pure noise.

The state at t is a scaled EDM state: x_t = (1 − t)·(x + σε) with σ = t/(1 − t), so logit(t) = ln σ. A
logit-normal t (SD3's ``logit_normal``, minRF's ``ln=True``), t = sigmoid(m + s·Z) with Z ~ N(0, 1), is exactly
EDM's log-normal σ with P_mean = m and P_std = s, and DiffusionBlocks' equal-probability partition carries over
unchanged: boundaries t_b = sigmoid(m + s·Φ⁻¹(b/B)) (m=0, s=1, B=3 → 0.394, 0.606; the paper's EDM (−1.2, 1.2)
→ t = 0.152, 0.336, i.e. σ = 0.1796, 0.5050). A resolution shift α (t' = αt/(1 + (α − 1)t), i.e. σ' = ασ) is
m → m + ln α. Group 0 (the first layers) owns the highest t, the most noise, as it owns the highest σ in EDM.

:class:`FlowSchedule` is a :class:`~lightning_diffusionblocks.levels.NoiseLevels` whose levels are t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_diffusionblocks.levels import PARTITIONS, NoiseLevels

TimeDistribution = Literal["logit_normal", "uniform"]
Prediction = Literal["velocity", "x0", "epsilon"]
Grid = Literal["uniform", "equiprobable"]
Sampler = Literal["euler", "heun"]


def shift_time(t: Tensor, alpha: float) -> Tensor:
    """Resolution shift t' = α·t / (1 + (α − 1)·t) (SD3), i.e. σ' = α·σ and logit t' = logit t + ln α."""
    return alpha * t / (1 + (alpha - 1) * t)


def unshift_time(t: Tensor, alpha: float) -> Tensor:
    """Inverse of :func:`shift_time`: t = t' / (α − (α − 1)·t')."""
    return t / (alpha - (alpha - 1) * t)


def interpolate(x: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """The rectified-flow state x_t = (1 − t)·x + t·ε (``t`` broadcast over the sample dimensions)."""
    return (1 - t) * x + t * eps


def flow_target(prediction: Prediction, x: Tensor, eps: Tensor) -> Tensor:
    """What the network learns to output: velocity v = ε − x (= dx_t/dt), or x₀ = x, or ε."""
    if prediction == "velocity":
        return eps - x
    if prediction == "x0":
        return x
    if prediction == "epsilon":
        return eps
    raise ValueError(f"Unknown prediction {prediction!r}; use 'velocity', 'x0' or 'epsilon'.")


def velocity_of(prediction: Prediction, out: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """The velocity implied by a network output at state z and time t ∈ (0, 1):
    x₀-prediction v = (z − x̂)/t, ε-prediction v = (ε̂ − z)/(1 − t)."""
    if prediction == "velocity":
        return out
    if prediction == "x0":
        return (z - out) / t
    if prediction == "epsilon":
        return (out - z) / (1 - t)
    raise ValueError(f"Unknown prediction {prediction!r}; use 'velocity', 'x0' or 'epsilon'.")


@dataclass(frozen=True)
class FlowSchedule(NoiseLevels):
    """Training distribution of the flow time t and its DiffusionBlocks partition.

    Args:
        distribution: ``"logit_normal"`` (t = sigmoid(m + s·Z), SD3 / minRF) or ``"uniform"`` (t ~ U[0, 1]).
        m, s: mean and standard deviation of logit(t) before the shift (logit-normal only).
        shift: resolution shift α ≥ 1 applied to the distribution (and to the sampling grid): t' = αt/(1+(α−1)t),
            for the logit-normal m → m + ln α.
        t_min, t_max: the trained range of t. They keep every group's width in logit(t) = ln σ finite, which the
            overlap γ is measured in (exactly as EDM truncates σ to [0.002, 80]), and keep x₀/ε conversions away
            from their poles at t = 0 and 1. The mass they cut off is ~1e-12 for m=0, s=1.
    """

    distribution: TimeDistribution = "logit_normal"
    m: float = 0.0
    s: float = 1.0
    shift: float = 1.0
    t_min: float = 1e-3
    t_max: float = 1.0 - 1e-3

    def __post_init__(self) -> None:
        if self.distribution not in ("logit_normal", "uniform"):
            raise ValueError(f"Unknown distribution {self.distribution!r}; use 'logit_normal' or 'uniform'.")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            raise ValueError(f"Need 0 <= t_min < t_max <= 1, got t_min={self.t_min} and t_max={self.t_max}.")
        if self.s <= 0:
            raise ValueError(f"The logit-normal's s must be positive, got {self.s}.")
        if self.shift <= 0:
            raise ValueError(f"The shift alpha must be positive (1 = no shift), got {self.shift}.")

    level_name = "t"
    pipeline_time = "flow"
    partitions = PARTITIONS

    @property
    def level_min(self) -> float:
        return self.t_min

    @property
    def level_max(self) -> float:
        return self.t_max

    # --- the distribution of t ------------------------------------------------------------------
    def cdf(self, t: Tensor | float) -> Tensor:
        """P(T ≤ t) of the shifted distribution before truncation, in float64: Φ((logit t − m − ln α)/s) or the
        shifted uniform's t/(α − (α − 1)t)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        u = unshift_time(t, self.shift)
        if self.distribution == "uniform":
            return u.clamp(0.0, 1.0)
        return torch.special.ndtr((torch.special.logit(u) - self.m) / self.s)

    def icdf(self, q: Tensor | float) -> Tensor:
        """Inverse of :meth:`cdf`: t = sigmoid(m + ln α + s·Φ⁻¹(q)), or the shifted uniform's shift(q); float64."""
        q = torch.as_tensor(q, dtype=torch.float64)
        u = q if self.distribution == "uniform" else torch.sigmoid(self.m + self.s * torch.special.ndtri(q))
        return shift_time(u, self.shift)

    def edm_sigma(self, levels: Tensor) -> Tensor:
        """σ = t/(1 − t): x_t/(1 − t) = x + σ·ε."""
        t = torch.as_tensor(levels, dtype=torch.float64)
        return t / (1 - t)

    def loss_weight(self, t: Tensor) -> Tensor:
        """Per-sample weight of the flow-matching loss: 1 (the plain MSE of rectified flow), float32."""
        return torch.ones_like(t, dtype=torch.float32)

    # --- partition --------------------------------------------------------------------------------
    def cut_other(self, frac: Tensor, partition: str) -> Tensor:
        """``uniform_log``: equal steps of logit t = ln σ (``equiprobable``: t_b = sigmoid(m + ln α + s·Φ⁻¹(b/B)) up to
        the truncation; ``linear``: equal steps of t)."""
        if partition != "uniform_log":
            raise self.unknown_partition(partition)
        lo, hi = _logit(self.t_min), _logit(self.t_max)
        if not math.isfinite(hi - lo):
            raise ValueError("partition='uniform_log' needs 0 < t_min and t_max < 1 (logit t must be finite).")
        return torch.sigmoid(lo + frac * (hi - lo))

    def widen(self, lo: float, hi: float, gamma: float) -> tuple[float, float]:
        """The overlap is applied in logit(t) = ln σ, the space the paper defines it in for EDM (App. C): each end
        moves out by γ × the group's width in logit t (then :meth:`group_range` clamps to [t_min, t_max]). A
        FlowMatching group therefore trains on exactly the relative noise levels the EDM group with
        P_mean = m, P_std = s trains on. (A linear widening in t, as one peer does, would give the narrow middle
        groups almost no overlap and the wide outer ones a lot.)
        """
        if gamma == 0:
            return lo, hi
        width = _logit(hi) - _logit(lo)
        if not math.isfinite(width):
            raise ValueError(
                f"The group spanning [{lo}, {hi}] is infinitely wide in logit t, so the overlap gamma={gamma}"
                " (measured in logit t = ln sigma) has no size. Give the FlowSchedule 0 < t_min and t_max < 1 (the"
                " defaults 1e-3 and 1 - 1e-3), or use gamma=0."
            )
        lo_w = torch.sigmoid(torch.tensor(_logit(lo) - gamma * width, dtype=torch.float64)).item()
        hi_w = torch.sigmoid(torch.tensor(_logit(hi) + gamma * width, dtype=torch.float64)).item()
        return lo_w, hi_w

    # --- the sampling grid ------------------------------------------------------------------------
    def grid(self, steps: int, spacing: Grid = "uniform") -> Tensor:
        """Descending times t_0 = t_max > … > t_{steps−1} ≥ t_min where the sampler calls the network, then 0.

        ``uniform``: equal steps of t from t_max to 0, shifted by α like the training distribution (SD3);
        ``equiprobable``: equal steps of the truncated CDF, so each group serves ~1/B of the steps (paper App. H).
        """
        if steps < 1:
            raise ValueError(f"Sampling needs at least 1 step, got steps={steps}.")
        if spacing == "uniform":
            frac = 1 - torch.arange(steps, dtype=torch.float64) / steps  # 1, …, 1/steps
            points = (shift_time(frac, self.shift) * self.t_max).clamp(self.t_min, self.t_max)
            points[0] = self.t_max
        elif spacing == "equiprobable":
            points = self.equiprobable_grid(steps)
        else:
            raise ValueError(f"Unknown grid spacing {spacing!r}; use 'uniform' or 'equiprobable'.")
        return torch.cat([points, torch.zeros(1, dtype=torch.float64)])

    def sampling_grid(self, steps: int) -> Tensor:
        """:meth:`grid` with its default ``uniform`` spacing: ``steps`` times from t_max, then 0."""
        return self.grid(steps)


def _logit(t: float) -> float:
    """ln(t / (1 − t)) = ln σ, ±inf at the ends."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t / (1.0 - t))


RECTIFIED_FLOW = FlowSchedule()
