"""The formulas the tests pin, written out here from the papers: the expected values of every formula test.

DiffusionBlocks (arXiv 2506.14202) with EDM's constants (App. E): log σ ~ N(P_mean, P_std²) truncated to
[σ_min, σ_max], σ_data = 0.5, c_skip = σd²/(σ²+σd²), c_out = σσd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ¼ ln σ,
λ(σ) = (σ²+σd²)/(σσd)²; masked diffusion (MD4) with α(t) = 1 − t; rectified flow with logit-normal t =
sigmoid(m + s·Z); DDPM's linear β schedule. Only plain ``math``, ``torch`` and ``statistics.NormalDist`` are used:
the package's helpers are only ever the thing under test, never the source of an expected value.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import torch
from torch import Tensor

P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = -1.2, 1.2, 0.002, 80.0, 0.5
T_MIN = 1e-4  # MaskingSchedule's default lower end of t (keeps the 1/t weight finite)
NORMAL = NormalDist()


def cdf(sigma: float) -> float:
    """Φ((ln σ − P_mean)/P_std)."""
    return NORMAL.cdf((math.log(sigma) - P_MEAN) / P_STD)


def icdf(q: float) -> float:
    """σ = exp(P_mean + P_std·Φ⁻¹(q))."""
    return math.exp(P_MEAN + P_STD * NORMAL.inv_cdf(q))


Q_MIN, Q_MAX = cdf(SIGMA_MIN), cdf(SIGMA_MAX)


def edm_boundaries(num_groups: int) -> list[float]:
    """Ascending σ_min = b_0 < … < b_B = σ_max at equal steps of the truncated CDF (paper §3.3)."""
    inner = [icdf(Q_MIN + b / num_groups * (Q_MAX - Q_MIN)) for b in range(1, num_groups)]
    return [SIGMA_MIN, *inner, SIGMA_MAX]


def edm_grid(steps: int) -> list[float]:
    """Descending inference σ grid, equally spaced in the truncated CDF, both ends included (App. H)."""
    if steps == 1:
        return [SIGMA_MAX]
    inner = [icdf(Q_MAX - k / (steps - 1) * (Q_MAX - Q_MIN)) for k in range(1, steps - 1)]
    return [SIGMA_MAX, *inner, SIGMA_MIN]


def coefficients(sigma: float) -> tuple[float, float, float, float]:
    """EDM (c_skip, c_out, c_in, c_noise)."""
    sd2 = SIGMA_DATA**2
    root = math.sqrt(sigma**2 + sd2)
    return sd2 / (sigma**2 + sd2), sigma * SIGMA_DATA / root, 1 / root, math.log(sigma) / 4


def coefficient_tensors(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same four, per sample, float64."""
    s = sigma.double()
    sd2 = SIGMA_DATA**2
    return sd2 / (s**2 + sd2), s * SIGMA_DATA / (s**2 + sd2).sqrt(), 1 / (s**2 + sd2).sqrt(), s.log() / 4


def weight(sigma: Tensor) -> Tensor:
    """λ(σ) = (σ² + σd²)/(σ·σd)², float64."""
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


def owner(level: float, ascending: list[float]) -> int:
    """Group owning ``level`` (0 = highest noise); a level on a boundary goes to the lower-noise group."""
    below = sum(1 for b in ascending[1:-1] if b < level)
    return len(ascending) - 2 - below


def masking_boundaries(num_groups: int) -> list[float]:
    """Equal drops of α(t) = 1 − t: t_b = b/B (paper §2.5), with t_0 = t_min."""
    return [T_MIN, *[b / num_groups for b in range(1, num_groups + 1)]]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−log softmax(logits)[target], float64, over the last axis."""
    logits = logits.double()
    return logits.logsumexp(-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def layer_norm(h: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-affine LayerNorm over the last axis."""
    h = h.double()
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    return (h - mean) / (var + eps).sqrt()


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def logit(t: float) -> float:
    return math.log(t / (1 - t))


def logit_normal_cdf(t: float, m: float = 0.0, s: float = 1.0) -> float:
    """P(sigmoid(m + sZ) ≤ t)."""
    return NORMAL.cdf((logit(t) - m) / s)


def flow_boundaries(num_groups: int, m: float = 0.0, s: float = 1.0, t_min: float = 1e-3, t_max: float = 0.999):
    """t_b at equal steps of the truncated logit-normal CDF: sigmoid(m + s·Φ⁻¹(q_b))."""
    q_lo, q_hi = logit_normal_cdf(t_min, m, s), logit_normal_cdf(t_max, m, s)
    inner = [sigmoid(m + s * NORMAL.inv_cdf(q_lo + b / num_groups * (q_hi - q_lo))) for b in range(1, num_groups)]
    return [t_min, *inner, t_max]


def linear_alpha_bar(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> list[float]:
    """ᾱ_k = ∏_{j≤k} (1 − β_j), β evenly spaced from β_start to β_end."""
    out, prod = [], 1.0
    for k in range(num_timesteps):
        beta = beta_start + (beta_end - beta_start) * k / (num_timesteps - 1)
        prod *= 1 - beta
        out.append(prod)
    return out


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
