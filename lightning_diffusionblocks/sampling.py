"""Group-routed Euler sampling: walk σ from high to low and call only the group that owns each σ."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: denoise(z, sigma (N,), level) -> estimate of the clean target at noise level ``level``
Denoiser = Callable[[Tensor, Tensor, float], Tensor]


def euler_step(z: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One EDM Euler step z ← z + (σ_next − σ)·(z − D)/σ (the paper's printed Eq. 3–5 has the opposite sign)."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def check_grid(sigmas: Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError("sigmas must be a non-empty 1-D grid.")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (from high noise to low).")


@torch.no_grad()
def euler_sample(denoise: Denoiser, z: Tensor, sigmas: Tensor) -> Tensor:
    """Deterministic EDM Euler sampler over the descending grid ``sigmas``; ``z`` starts at σ = sigmas[0].

    ``denoise(z, sigma_vec, sigma)`` is called once per grid point (the caller routes ``sigma`` to its
    group). The last grid point is a plain evaluation whose D is returned.
    """
    check_grid(sigmas)
    n = z.shape[0]
    z = z.float()
    denoised = z
    grid = sigmas.tolist()
    for i, sigma in enumerate(grid):
        sigma_vec = torch.full((n,), sigma, device=z.device, dtype=torch.float32)
        denoised = denoise(z, sigma_vec, sigma).float()
        if i + 1 < len(grid):
            z = euler_step(z, denoised, sigma, grid[i + 1])
    return denoised
