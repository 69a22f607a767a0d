"""The sampler: EDM direction, group routing, guidance, and steps chosen at sampling time."""

from __future__ import annotations

import inspect
import math
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.sampling import euler_sample
from lightning_diffusionblocks.tasks import ImageGeneration
from tests.conftest import image_loader, tiny_dit, trainer_kwargs
from tests.fakes import COND, FACTORS, FakeDenoiser, label_term
from tests.reference import SIGMA_MAX, close, coefficients, edm_boundaries, edm_grid, gen, owner


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


# ------------------------------------------------ the sampling loops against the paper's equations (tests/reference.py)


def test_euler_sampler_trajectory() -> None:
    """Euler step of the probability-flow ODE (EDM form; the paper's printed Eq. 3–5 has the sign flipped)."""
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.3, 0.01], dtype=torch.float64)
    z0 = torch.randn(3, 2, generator=gen(0)) * 10
    seen: list[Tensor] = []

    def denoise(z: Tensor, sigma: Tensor, *_: Any) -> Tensor:
        seen.append(z.clone())
        return 0.3 * z + sigma.view(-1, 1) * 0.1

    routed = "route" in inspect.signature(euler_sample).parameters  # older signature took a router
    out = euler_sample(denoise, z0, sigmas, lambda s: None) if routed else euler_sample(denoise, z0, sigmas)
    z = z0.double()
    for i, s in enumerate(sigmas.tolist()):
        close(seen[i], z, rtol=1e-5, atol=1e-5)
        d = 0.3 * z + s * 0.1
        if i + 1 < len(sigmas):
            z = z + (float(sigmas[i + 1]) - s) * (z - d) / s
    close(out, d, rtol=1e-5, atol=1e-5)


def test_euler_grid_must_be_strictly_decreasing_and_one_dimensional() -> None:
    """The Euler sampler walks a non-empty, strictly decreasing 1-D σ grid; anything else is refused."""
    z = torch.zeros(2, 3)

    def denoise(z: Tensor, *_: Any) -> Tensor:
        return z

    for bad in (torch.tensor([3.0, 2.0, 2.0]), torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match=r"^sigmas must be strictly decreasing \(from high noise to low\)\.$"):
            euler_sample(denoise, z, bad)
    for bad in (torch.tensor([[3.0], [2.0], [1.0]]), torch.tensor([])):
        with pytest.raises(ValueError, match=r"^sigmas must be a non-empty 1-D grid\.$"):
            euler_sample(denoise, z, bad)
    close(euler_sample(denoise, z, torch.tensor([5.0])), z)  # one point: a plain evaluation


def expected_image(z0: Tensor, labels: Tensor | None, steps: int, guidance: float) -> tuple[Tensor, list[Tensor]]:
    """The EDM Euler trajectory (z ← z + (σ_next − σ)(z − D)/σ) with CFG D_u + g(D_c − D_u); returns (D_last, zs)."""
    bounds, sigmas = edm_boundaries(3), edm_grid(steps)
    z, zs, denoised = z0.double(), [], z0.double()
    cond = COND * label_term(labels, 4).view(-1, 1, 1, 1)
    for i, s in enumerate(sigmas):
        c_skip, c_out, c_in, _ = coefficients(s)
        zs.append(z)
        f_uncond = FACTORS[owner(s, bounds)] * c_in * z
        d_cond = c_skip * z + c_out * (f_uncond + cond)
        d_uncond = c_skip * z + c_out * f_uncond
        denoised = d_cond if guidance == 1.0 else d_uncond + guidance * (d_cond - d_uncond)
        if i + 1 < len(sigmas):
            z = z + (sigmas[i + 1] - s) * (z - denoised) / s
    return denoised, zs


@pytest.mark.parametrize(("guidance", "steps"), [(1.0, 6), (2.5, 6), (1.0, 1)])
def test_image_sampling_is_routed_euler_with_guidance(guidance: float, steps: int) -> None:
    """Sampling (App. H + CFG): z_0 ~ N(0, σ_max²), routed Euler over the equi-probable grid, D_u + g(D_c − D_u)."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)  # never trained: still block-wise
    labels = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    n = len(labels)
    out = module.sample(labels=labels, steps=steps, guidance=guidance, seed=3, shape=(1, 4, 4))
    first = net.calls[0]["x"][:n].double()
    z0 = first / coefficients(SIGMA_MAX)[2]  # undo c_in(σ_max)
    assert 0.8 * SIGMA_MAX < float(z0.std()) < 1.2 * SIGMA_MAX
    expected, zs = expected_image(z0, labels, steps, guidance)
    sigmas = edm_grid(steps)
    assert len(net.calls) == steps
    for call, z, s in zip(net.calls, zs, sigmas):
        close(call["x"][:n], coefficients(s)[2] * z, rtol=1e-4, atol=1e-4)  # network input c_in·z
        close(call["c_noise"].view(-1), torch.full((call["x"].shape[0],), math.log(s) / 4), rtol=1e-6, atol=1e-7)
        assert torch.equal(call["labels"][:n], labels)
        if guidance != 1.0:  # the unconditional half carries the null label
            uncond = call["labels"][n:]
            assert uncond.shape == labels.shape
            assert len(uncond.unique()) == 1
            assert not 0 <= int(uncond[0]) < net.num_classes
            documented = getattr(module.task, "null_label", None)
            assert documented is None or int(uncond[0]) == documented
    close(out, expected, rtol=1e-4, atol=1e-4)


def test_argument_checks_name_the_call_and_show_an_example() -> None:
    """check_integer/check_count name the argument and the call (``sample`` unless given) with an example value
    (``...`` for a name without one); check_clip takes False, True or an increasing pair and says why it refuses."""
    from lightning_diffusionblocks.sampling import check_clip, check_count, check_integer

    assert check_integer(3, "steps") == 3
    with pytest.raises(TypeError, match=r"^steps must be an integer, got 2\.5 \(float\); e\.g\. sample\(steps=50\)\.$"):
        check_integer(2.5, "steps")
    with pytest.raises(TypeError, match=r"^width must be an integer, got True \(bool\); e\.g\. grow\(width=\.{3}\)\.$"):
        check_integer(True, "width", "grow")
    with pytest.raises(ValueError, match=r"^num_samples must be >= 1, got 0; e\.g\. sample\(num_samples=8\)\.$"):
        check_count(0, "num_samples")
    with pytest.raises(ValueError, match=r"^width must be >= 1, got -2; e\.g\. grow\(width=\.\.\.\)\.$"):
        check_count(-2, "width", "grow")
    with pytest.raises(TypeError, match=r"^length must be an integer, got '4' \(str\); e\.g\. generate\(length=64\)"):
        check_count("4", "length", "generate")
    assert (check_clip(False), check_clip(True), check_clip([-1, 2]), check_clip((0.5, 0.75))) == (
        False, True, (-1.0, 2.0), (0.5, 0.75),
    )  # fmt: skip
    with pytest.raises(
        ValueError,
        match=r"^clip=\(1, 1\) is not an increasing range: clamping to it would turn every pixel into one value\. Pass"
        r" clip=\(lo, hi\) with lo < hi, e\.g\. clip=\(1\.0, 1\.0\)\.$",
    ):
        check_clip((1, 1))
    refused = r"^clip takes False, True \(the training data's range\) or a \(lo, hi\) pair, got "
    shown_as = (((0, 1, 2), r"\(0, 1, 2\)"), ((0, "1"), r"\(0, '1'\)"), ("(0, 1)", r"'\(0, 1\)'"), (None, "None"))
    for bad, shown in shown_as:
        with pytest.raises(TypeError, match=refused + shown + r"\.$"):
            check_clip(bad)
