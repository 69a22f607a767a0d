"""Classifier-free guidance: D_u + g·(D_c − D_u) from one doubled batch, and no guidance by default."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.sampling import classifier_free_guidance
from lightning_diffusionblocks.tasks import ImageGeneration
from tests.fakes import Recorder
from tests.reference import close, coefficient_tensors, gen


@pytest.mark.parametrize("guidance", [1.0, 2.0, 3.5])
def test_classifier_free_guidance_mixes_only_when_guided(guidance: float) -> None:
    """CFG: D_u + g·(D_c − D_u) from one doubled batch; at g = 1 it is D_c, from one plain call."""
    n, null = 4, 9
    z = torch.randn(n, 3, generator=gen(0))
    level = torch.full((n,), 0.7)
    labels = torch.tensor([0, 2, 1, 2])
    calls: list[Tensor] = []

    def predict(z: Tensor, level: Tensor, labels: Tensor | None) -> Tensor:
        assert labels is not None
        calls.append(labels.clone())
        return z * 0.5 + labels.view(-1, 1).float() * 0.1  # a conditional term, none for the null label

    got = classifier_free_guidance(predict, z, level, labels, null, guidance)
    cond = z.double() * 0.5 + labels.view(-1, 1).double() * 0.1
    uncond = z.double() * 0.5 + null * 0.1
    if guidance == 1.0:
        assert len(calls) == 1
        assert torch.equal(calls[0], labels)  # one plain call of N rows
        close(got, cond, rtol=1e-6, atol=1e-6)
    else:
        assert len(calls) == 1
        assert torch.equal(calls[0], torch.cat([labels, torch.full_like(labels, null)]))
        close(got, uncond + guidance * (cond - uncond), rtol=1e-5, atol=1e-5)


def test_guided_denoise_defaults_to_no_guidance() -> None:
    """guided_denoise without a guidance scale is the plain denoiser D = c_skip·z + c_out·F (one call, N rows)."""
    n = 4
    z = torch.randn(n, 1, 2, 2, generator=gen(0)) * 3
    sigma = torch.tensor([0.05, 0.5, 2.0, 20.0])
    labels = torch.tensor([1, 0, 3, 2])
    net_out = torch.randn(n, 1, 2, 2, generator=gen(1))
    run = Recorder(net_out)
    got = ImageGeneration().guided_denoise(run, z, sigma, labels)
    assert len(run.calls) == 1
    assert run.calls[0][0][0].shape[0] == n
    c_skip, c_out, _, _ = (c.view(-1, 1, 1, 1) for c in coefficient_tensors(sigma))
    close(got, c_skip * z.double() + c_out * net_out.double(), rtol=1e-5, atol=1e-6)


def test_guided_denoise_is_the_unconditional_plus_scale_times_the_difference():
    task = ldb.tasks.ImageGeneration()

    def run(x, c_noise, labels):  # noqa: ANN001, ANN202
        # conditional output +1, unconditional −1 (before preconditioning)
        return torch.where(labels.view(-1, 1, 1, 1) >= 0, 1.0, -1.0).expand_as(x)

    z, sigma = torch.zeros(2, 1, 2, 2), torch.full((2,), 1.0)
    cond = task.denoise(run, z, sigma, torch.tensor([0, 0]))
    uncond = task.denoise(run, z, sigma, torch.tensor([-1, -1]))
    guided = task.guided_denoise(run, z, sigma, torch.tensor([0, 0]), guidance=3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond))
