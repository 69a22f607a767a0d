"""Group-routed samplers: walk the noise level from high to low and call only the group that owns each level.

EDM Euler in σ, flow-matching Euler/Heun in t, DDIM over DDPM timesteps, the label-embedding Euler chain of the
discrete-target tasks (classification, autoregressive LM), and classifier-free guidance.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.conditioning import with_null
from lightning_diffusionblocks.routing import Runner

#: denoise(z, sigma (N,), level) -> estimate of the clean target at noise level ``level``
Denoiser = Callable[[Tensor, Tensor, float], Tensor]


def euler_step(z: Tensor, denoised: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """One EDM Euler step z ← z + (σ_next − σ)·(z − D)/σ (the paper's printed Eq. 3–5 has the opposite sign)."""
    return z + (sigma_next - sigma) * (z - denoised) / sigma


def classifier_free_guidance(
    predict: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    z: Tensor,
    level: Tensor,
    labels: Any,
    null_label: Any,
    guidance: float,
) -> Tensor:
    """Classifier-free guidance u + g·(c − u) of ``predict(z, level, labels)`` (a denoised image, a velocity or an
    ε), the conditional and the null-label halves in one batch; a plain call without labels or at g = 1. ``labels``
    are class ids with the id ``null_label``, or a :class:`~lightning_diffusionblocks.conditioning.Conditioning`
    with its null conditioning as ``null_label``."""
    if labels is None or guidance == 1.0:
        return predict(z, level, labels)
    cond, uncond = predict(torch.cat([z, z]), torch.cat([level, level]), with_null(labels, null_label)).chunk(2)
    return uncond + guidance * (cond - uncond)


# ---------------------------------------------------------------------- argument checks shared by every sampler
#: a working value quoted when an argument is refused
_EXAMPLES = {"steps": "50", "num_samples": "8", "seed": "0", "length": "64"}


def check_integer(value: Any, name: str, call: str = "sample") -> int:
    """``value`` as an int, or a TypeError naming ``call``'s argument ``name`` (a float such as 2.5 is refused,
    not truncated)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        example = f"{call}({name}={_EXAMPLES.get(name, '...')})"
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}); e.g. {example}.")
    return int(value)


def check_count(value: Any, name: str, call: str = "sample") -> int:
    """``value`` as a positive integer, or a TypeError/ValueError naming ``call``'s argument ``name``."""
    value = check_integer(value, name, call)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}; e.g. {call}({name}={_EXAMPLES.get(name, '...')}).")
    return value


def check_clip(clip: Any) -> bool | tuple[float, float]:
    """``clip`` of a sampler: False, True (the training data's range) or an increasing ``(lo, hi)``."""
    if isinstance(clip, bool):
        return clip
    if isinstance(clip, (tuple, list)) and len(clip) == 2 and all(isinstance(v, numbers.Real) for v in clip):
        lo, hi = float(clip[0]), float(clip[1])
        if not lo < hi:
            raise ValueError(
                f"clip=({clip[0]}, {clip[1]}) is not an increasing range: clamping to it would turn every pixel into"
                f" one value. Pass clip=(lo, hi) with lo < hi, e.g. clip=({min(lo, hi)}, {max(lo, hi)})."
            )
        return lo, hi
    raise TypeError(f"clip takes False, True (the training data's range) or a (lo, hi) pair, got {clip!r}.")


def check_labels(
    labels: Tensor | Sequence[int] | None, num_samples: Any, device: torch.device | str | None = None
) -> tuple[Tensor | None, int | None]:
    """Sampling labels as a 1-D long tensor of class ids and the number of samples they make.

    Refused: non-integer labels (the same rule as in training), one-hot rows, an empty list, and a
    ``num_samples`` that disagrees with the number of labels (one sample is drawn per label).
    """
    if num_samples is not None:
        num_samples = check_count(num_samples, "num_samples")
    if labels is None:
        return None, num_samples
    given = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if given.is_floating_point() or given.is_complex() or given.dtype == torch.bool:
        hint = " For one-hot rows pass labels.argmax(-1)." if given.ndim == 2 else ""
        raise TypeError(
            f"labels must be integer class ids (one per sample), got a {given.dtype} tensor of shape"
            f" {tuple(given.shape)}.{hint} E.g. sample(labels=torch.tensor([0, 1, 2]))."
        )
    if given.ndim > 1 and not (given.ndim == 2 and given.shape[-1] == 1):
        raise ValueError(
            f"labels must be a 1-D tensor of class ids, got shape {tuple(given.shape)}; for one-hot rows pass"
            " labels.argmax(-1)."
        )
    flat = given.reshape(-1).to(device=device, dtype=torch.long)
    if flat.numel() == 0:
        raise ValueError("labels is empty; pass at least one class id, or num_samples=N for unconditional samples.")
    if num_samples is not None and num_samples != flat.numel():
        raise ValueError(
            f"sample() draws one sample per label, but got {flat.numel()} labels and num_samples={num_samples}."
            f" Pass {num_samples} labels (e.g. labels.repeat_interleave(k) for k samples of each) or leave out"
            " num_samples."
        )
    return flat, flat.numel()


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


#: logits_at(run, z, sigma (N,)) -> logits over the embedded classes (classes or vocabulary) at noisy targets z
LogitsAt = Callable[[Runner, Tensor, Tensor], Tensor]


def embedding_chain(
    runner_at: Callable[[float], Runner],
    logits_at: LogitsAt,
    shape: Sequence[int],
    sigmas: Sequence[float],
    seed: int,
    device: torch.device | str,
) -> Iterator[tuple[float, Tensor]]:
    """The label-embedding Euler chain of a discrete target: from z ~ N(0, σ₀²) of ``shape`` (N, …, D), at each
    σ of the descending grid ``sigmas`` the group owning it (``runner_at(σ)``) gives logits, and their expectation
    softmax(logits)·Ê under its normalised embeddings (``run(mode="embeddings")``) is the denoised estimate for
    the EDM Euler step to the next σ. Yields (σ, float32 logits) of every step, one at a time (a vocabulary's
    logits are large); the last is the answer. Run it under ``torch.no_grad()``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    z = (torch.randn(tuple(shape), generator=gen) * sigmas[0]).to(device)
    for i, sigma in enumerate(sigmas):
        run = runner_at(sigma)
        logits = logits_at(run, z, torch.full((z.shape[0],), sigma, device=device)).float()
        yield sigma, logits
        if i + 1 < len(sigmas):
            z = euler_step(z, logits.softmax(-1) @ run(mode="embeddings").float(), sigma, sigmas[i + 1])


# ---------------------------------------------------------------------- flow matching (time t, t = 1 noise)
#: velocity(z, t (N,), level) -> dz/dt at time ``level``
Velocity = Callable[[Tensor, Tensor, float], Tensor]


def flow_euler_step(z: Tensor, velocity: Tensor, t: float, t_next: float) -> Tensor:
    """One Euler step of the flow ODE dz/dt = v: z ← z + (t_next − t)·v (t decreasing towards the data)."""
    return z + (t_next - t) * velocity


@torch.no_grad()
def flow_sample(velocity: Velocity, z: Tensor, times: Tensor, method: str = "euler") -> Tensor:
    """Integrate dz/dt = v from times[0] down to times[-1] (usually 0) with Euler or Heun.

    ``velocity(z, t_vec, t)`` is called at every time but the last (Heun: twice per step, its second call at
    the step's end, except on the final step into the last time, which is an Euler step, as in EDM's Heun), so
    the caller can route each call to the group owning ``t``.
    """
    if method not in ("euler", "heun"):
        raise ValueError(f"Unknown sampler {method!r}; use 'euler' or 'heun'.")
    if times.ndim != 1 or len(times) < 2 or not bool((times[1:] < times[:-1]).all()):
        raise ValueError("times must be a strictly decreasing 1-D grid of at least two points (start, …, end).")
    n = z.shape[0]
    z = z.float()
    grid = times.tolist()

    def v_at(state: Tensor, t: float) -> Tensor:
        return velocity(state, torch.full((n,), t, device=z.device, dtype=torch.float32), t).float()

    for t, t_next in zip(grid[:-1], grid[1:]):
        v = v_at(z, t)
        euler = flow_euler_step(z, v, t, t_next)
        if method == "heun" and t_next != grid[-1]:
            z = flow_euler_step(z, (v + v_at(euler, t_next)) / 2, t, t_next)
        else:
            z = euler
    return z


# ---------------------------------------------------------------------- DDPM timesteps
def ddim_step(
    x0: Tensor, eps: Tensor, alpha_bar: float, alpha_bar_prev: float, eta: float = 0.0, noise: Tensor | None = None
) -> Tensor:
    """One DDIM step (Song et al. 2021, Eq. 12) from ᾱ to ᾱ_prev given the predictions x̂₀ and ε̂:
    x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − s²)·ε̂ + s·ξ, s = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev)."""
    s = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
    out = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(max(1 - alpha_bar_prev - s**2, 0.0)) * eps
    if s > 0:
        if noise is None:
            raise ValueError("A stochastic DDIM step (eta > 0) needs `noise`.")
        out = out + s * noise
    return out


@torch.no_grad()
def ddim_sample(
    eps_and_x0: Callable[[Tensor, Tensor, int], tuple[Tensor, Tensor]],
    z: Tensor,
    timesteps: Sequence[int],
    alpha_bar: Sequence[float],
    eta: float,
    generator: torch.Generator,
) -> Tensor:
    """DDIM over the descending ``timesteps`` from ``z`` at the first; ``eps_and_x0(z, k_vec, k)`` gives the
    predictions (ε̂, x̂₀) at timestep k (the caller routes k to its group, guides and clips). The last step goes to
    ᾱ = 1 and so returns x̂₀; with ``eta`` > 0 the fresh noise comes from ``generator`` (on the CPU)."""
    n = z.shape[0]
    for i, k in enumerate(timesteps):
        k_vec = torch.full((n,), k, dtype=torch.long, device=z.device)
        eps, x0 = eps_and_x0(z, k_vec, k)
        prev = alpha_bar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        xi = torch.randn(z.shape, generator=generator).to(z) if eta > 0 and prev < 1.0 else None
        z = ddim_step(x0, eps, alpha_bar[k], prev, eta, xi)
    return z
