"""The sampler: EDM direction, group routing, guidance, and steps chosen at sampling time."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.sampling import euler_sample
from tests.conftest import image_loader, tiny_dit, trainer_kwargs


def test_euler_recovers_gaussian_data_with_exact_denoiser():
    """For data ~ N(0, s²) the exact denoiser is D = z·s²/(s²+σ²); the Euler ODE must land on std s."""
    s = 0.5
    sigmas = ldb.EDM.inference_sigmas(200)
    z = torch.randn(20000, 1, generator=torch.Generator().manual_seed(0)) * 80.0
    out = euler_sample(lambda z, sig, g: z * s**2 / (s**2 + sig.view(-1, 1) ** 2), z, sigmas)
    assert float(out.std()) == pytest.approx(s, rel=0.05)


def test_euler_moves_toward_the_denoiser():
    target = torch.tensor([[3.0]])
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.1])
    path = []

    def denoise(z, sig, g):  # noqa: ANN001, ANN202
        path.append(float(z))
        return target.expand_as(z)

    out = euler_sample(denoise, torch.tensor([[23.0]]), sigmas)
    # each step closes the gap to the denoiser by the σ ratio: 20 → 10 → 2 → (0.2)
    gaps = [abs(p - 3.0) for p in path]
    assert gaps == pytest.approx([20.0, 10.0, 2.0, 0.2], rel=1e-5)
    assert torch.equal(out, target)
    with pytest.raises(ValueError, match="strictly decreasing"):
        euler_sample(denoise, torch.zeros(1, 1), torch.tensor([1.0, 2.0]))


def counting_module(num_blocks: int = 3, **kwargs) -> tuple[ldb.DiffusionBlocksModule, list]:  # noqa: ANN003
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=num_blocks, **kwargs)
    calls: list[tuple[int | None, float]] = []
    original = module.network.forward

    def counted(*args, group=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        sigma = float(torch.exp(4 * args[1][0]))  # c_noise = ¼ ln σ
        calls.append((group, sigma))
        return original(*args, group=group, **kw)

    module.network.forward = counted
    return module, calls


@pytest.mark.parametrize(("steps", "num_blocks"), [(50, 3), (7, 3), (12, 4), (3, 3)])
def test_sampling_calls_only_the_owning_group(steps, num_blocks):
    module, calls = counting_module(num_blocks)
    images = module.sample(labels=[0, 1, 2, 3], steps=steps)
    assert images.shape == (4, 1, 8, 8)
    assert torch.isfinite(images).all()
    assert len(calls) == steps
    b = module.boundaries
    for group, sigma in calls:
        lo, hi = float(b[num_blocks - 1 - group]), float(b[num_blocks - group])
        assert lo * (1 - 1e-4) <= sigma <= hi * (1 + 1e-4)
    groups = [g for g, _ in calls]
    assert groups == sorted(groups)  # high noise (group 0) first
    if steps >= num_blocks:
        assert set(groups) == set(range(num_blocks))
    if steps == 50:
        assert sorted(torch.tensor(groups).bincount().tolist()) == [16, 17, 17]


def test_guidance_doubles_the_batch_and_mixes():
    module, calls = counting_module()
    module.sample(labels=[1, 2], steps=4, guidance=2.0)
    assert len(calls) == 4  # conditional and unconditional halves share one call per step
    with pytest.raises(ValueError, match="needs `labels`"):
        module.sample(num_samples=2, guidance=2.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        module.sample(labels=[1], steps=0)


def test_guidance_formula():
    task = ldb.tasks.ImageGeneration()

    def run(x, c_noise, labels):  # noqa: ANN001, ANN202
        # conditional output +1, unconditional −1 (before preconditioning)
        return torch.where(labels.view(-1, 1, 1, 1) >= 0, 1.0, -1.0).expand_as(x)

    z, sigma = torch.zeros(2, 1, 2, 2), torch.full((2,), 1.0)
    cond = task.denoise(run, z, sigma, torch.tensor([0, 0]))
    uncond = task.denoise(run, z, sigma, torch.tensor([-1, -1]))
    guided = task.guided_denoise(run, z, sigma, torch.tensor([0, 0]), guidance=3.0)
    assert torch.allclose(guided, uncond + 3.0 * (cond - uncond))


def test_steps_are_not_stored_and_end_to_end_models_sample_whole(tmp_path):
    module, calls = counting_module()
    trainer = L.Trainer(strategy="auto", max_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    path = tmp_path / "e2e.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    assert not any("step" in k and "sampl" in k for k in state["hyper_parameters"])
    calls.clear()
    module.sample(num_samples=2, steps=5)
    assert [g for g, _ in calls] == [None] * 5  # trained end-to-end → the whole network at every step
    restored = ldb.DiffusionBlocksModule.load_from_checkpoint(path, net=tiny_dit(), task=ldb.tasks.ImageGeneration())
    assert not bool(restored.trained_blockwise)
    for steps in (3, 11):
        assert restored.sample(num_samples=1, steps=steps).shape == (1, 1, 8, 8)


def test_sample_is_deterministic_per_seed():
    module, _ = counting_module()
    a = module.sample(labels=[3, 4], steps=6, seed=5)
    b = module.sample(labels=[3, 4], steps=6, seed=5)
    c = module.sample(labels=[3, 4], steps=6, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
