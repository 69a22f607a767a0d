"""Group-routed Euler sampling: walk σ from high to low and call only the group that owns each σ."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: denoise(z, sigma (N,), group) -> estimate of the clean target; group None means the whole network
Denoiser = Callable[[Tensor, Tensor, "int | None"], Tensor]


@torch.no_grad()
def euler_sample(
    denoise: Denoiser,
    z: Tensor,
    sigmas: Tensor,
    route: Callable[[float], int | None],
) -> Tensor:
    """Deterministic EDM Euler sampler over the descending grid ``sigmas``; ``z`` starts at σ = sigmas[0].

    Each step moves toward the denoiser, z ← z + (σ_next − σ)·(z − D)/σ (the EDM form; the paper's printed
    Eq. 3–5 has the opposite sign). The last grid point is a plain evaluation whose D is returned.
    """
    if sigmas.ndim != 1 or len(sigmas) < 1:
        raise ValueError("sigmas must be a non-empty 1-D grid.")
    if len(sigmas) > 1 and not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (from high noise to low).")
    n = z.shape[0]
    z = z.float()
    denoised = z
    for i, sigma in enumerate(sigmas.tolist()):
        sigma_vec = torch.full((n,), sigma, device=z.device, dtype=torch.float32)
        denoised = denoise(z, sigma_vec, route(sigma)).float()
        if i + 1 < len(sigmas):
            sigma_next = float(sigmas[i + 1])
            z = z + (sigma_next - sigma) * (z - denoised) / sigma
    return denoised
