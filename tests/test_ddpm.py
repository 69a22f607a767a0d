"""DDPM: the discrete timestep schedule (``ddpm.py``), the DDPM task and the DDIM step.

x_k = √ᾱ_k x + √(1 − ᾱ_k) ε with linear or cosine β; timesteps partitioned by count or by weight quantiles, the
ε/v losses, DDIM (Song et al. 2021, Eq. 12) with η, clipping and guidance. Expected values come from
``tests/reference.py`` and the formulas written in each test, never from the package.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.flow import FlowSchedule
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.sampling import ddim_step
from lightning_diffusionblocks.tasks import DDPM
from tests.fakes import FakeNet, bound, router
from tests.reference import close, gen, linear_alpha_bar


def test_ddpm_linear_and_cosine_alpha_bar() -> None:
    close(DDPMSchedule(num_timesteps=50).alpha_bar(), torch.tensor(linear_alpha_bar(50)), rtol=1e-12)
    # cosine: ᾱ_k = f(k + 1)/f(0), f(u) = cos²((u/T + s)/(1 + s)·π/2), until the 0.999 clip of β bites
    num, s = 100, 0.008

    def f(u: float) -> float:
        return math.cos((u / num + s) / (1 + s) * math.pi / 2) ** 2

    got = DDPMSchedule(num_timesteps=num, beta_schedule="cosine").alpha_bar()
    close(got[:90], torch.tensor([f(k + 1) / f(0) for k in range(90)]), rtol=1e-9)
    sigma = DDPMSchedule().sigma(torch.tensor([0, 999]))
    alpha_bar = linear_alpha_bar(1000)
    expected = [math.sqrt((1 - a) / a) for a in (alpha_bar[0], alpha_bar[999])]
    close(sigma, torch.tensor(expected, dtype=torch.float64), rtol=1e-9)


@pytest.mark.parametrize(("num_timesteps", "num_groups"), [(12, 3), (1000, 4), (1000, 3), (7, 7)])
def test_every_ddpm_timestep_is_owned_by_exactly_one_group_with_equal_counts(num_timesteps: int, num_groups: int):
    schedule = DDPMSchedule(num_timesteps=num_timesteps)
    b = schedule.boundaries(num_groups)
    groups = schedule.group_of(torch.arange(num_timesteps, dtype=torch.float64), b)
    counts = torch.bincount(groups, minlength=num_groups).tolist()
    assert sum(counts) == num_timesteps
    assert max(counts) - min(counts) <= 1
    if num_timesteps % num_groups == 0:
        assert counts == [num_timesteps // num_groups] * num_groups
    assert groups.tolist() == sorted(groups.tolist(), reverse=True)  # group 0 owns the largest timesteps
    for g in range(num_groups):  # each group's own range holds exactly its timesteps
        lo, hi = schedule.group_range(b, g, 0.0)
        owned = [k for k in range(num_timesteps) if lo <= k <= hi]
        assert owned == (groups == g).nonzero().flatten().tolist()


def test_weighted_ddpm_timesteps_cut_at_their_quantiles() -> None:
    """Boundaries at the quantiles of the weights: group edge = #timesteps with cumulative mass ≤ b/B."""
    weights = [k + 1.0 for k in range(20)]
    schedule = DDPMSchedule(num_timesteps=20, timestep_weights=tuple(weights))
    total, cumulative, edges = sum(weights), 0.0, []
    for w in weights:
        cumulative += w / total
        edges.append(cumulative)
    expected = [0] + [sum(1 for c in edges if c <= b / 3 + 1e-12) for b in (1, 2)] + [20]
    assert schedule.boundaries(3).tolist() == [e - 0.5 for e in expected]
    # draws inside a group follow the weights restricted there (exact inverse CDF of the generator's uniforms)
    lo, hi = expected[1] - 0.5, expected[2] - 0.5
    k = schedule.sample(5, lo, hi, generator=gen(4))
    u = torch.rand(5, dtype=torch.float64, generator=gen(4)).tolist()
    q_lo, q_hi = edges[expected[1] - 1], edges[expected[2] - 1]
    assert k.tolist() == [next(j for j, c in enumerate(edges) if c > q_lo + x * (q_hi - q_lo)) for x in u]
    with pytest.raises(ValueError, match="Lower B or flatten timestep_weights"):
        DDPMSchedule(num_timesteps=4, timestep_weights=(0.0, 0.0, 10.0, 0.1)).boundaries(3)


def test_ddpm_overlap_widens_in_timesteps() -> None:
    schedule = DDPMSchedule(num_timesteps=300)
    b = schedule.boundaries(3)  # -0.5, 99.5, 199.5, 299.5
    assert schedule.group_range(b, 1, 0.1) == pytest.approx((89.5, 209.5))
    assert schedule.group_range(b, 0, 0.1) == pytest.approx((189.5, 299.5))
    k = schedule.sample(4000, 89.5, 209.5, generator=gen(0))
    assert (k.min(), k.max()) == (90, 209)
    assert torch.equal(k, k.round())


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_ddpm_loss_is_the_mse_to_epsilon_or_v(prediction: str) -> None:
    net = FakeNet(lambda x, k, y: 0.5 * x + 0.001 * k.view(-1, 1, 1, 1))
    task = bound(DDPM(DDPMSchedule(num_timesteps=50), prediction=prediction, label_dropout=0.0), net)
    images = torch.randn(3, 1, 2, 2, generator=gen(1))
    k = torch.tensor([49.0, 20.0, 0.0])
    loss = task.loss(net, (images, torch.tensor([1, 2, 3])), k, gen(9))
    eps = torch.randn(images.shape, generator=gen(9))
    a = torch.tensor([linear_alpha_bar(50)[i] for i in (49, 20, 0)]).view(-1, 1, 1, 1)
    z = a.sqrt() * images + (1 - a).sqrt() * eps
    x_in, k_in, _ = net.calls[-1]
    close(x_in, z)
    assert k_in.dtype == torch.long  # the network receives integer timesteps
    assert k_in.tolist() == [49, 20, 0]
    out = 0.5 * z + 0.001 * k.view(-1, 1, 1, 1)
    target = eps if prediction == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * images
    close(loss, ((out - target) ** 2).flatten(1).mean(1))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_song_et_al_eq_12(eta: float) -> None:
    """DDIM (Song et al. 2021, Eq. 12): x_prev = √ᾱ_prev·x̂₀ + √(1 − ᾱ_prev − s²)·ε̂ + s·ξ,
    s = η·√((1 − ᾱ_prev)/(1 − ᾱ))·√(1 − ᾱ/ᾱ_prev)."""
    x0 = torch.randn(5, 2, generator=gen(0))
    eps = torch.randn(5, 2, generator=gen(1))
    xi = torch.randn(5, 2, generator=gen(2))
    for alpha_bar, alpha_bar_prev in ((0.3, 0.6), (0.05, 0.2), (0.7, 0.95)):
        s = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * math.sqrt(1 - alpha_bar / alpha_bar_prev)
        expected = math.sqrt(alpha_bar_prev) * x0.double() + math.sqrt(1 - alpha_bar_prev - s**2) * eps.double()
        expected = expected + s * xi.double()
        got = ddim_step(x0, eps, alpha_bar, alpha_bar_prev, eta=eta, noise=xi)
        close(got, expected, rtol=1e-6, atol=1e-7)
    if eta == 0.0:  # deterministic by default: no noise needed
        close(ddim_step(x0, eps, 0.3, 0.6), math.sqrt(0.6) * x0.double() + math.sqrt(0.4) * eps.double(), rtol=1e-6)
    else:
        with pytest.raises(ValueError, match=r"^A stochastic DDIM step \(eta > 0\) needs `noise`\.$"):
            ddim_step(x0, eps, 0.3, 0.6, eta=eta)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_ddim_sampler(prediction: str, guidance: float) -> None:
    """DDIM (η = 0) over timesteps 9, 6, 3, 0 of T = 10: x̂₀ from ε̂ (or v̂), z ← √ᾱ'x̂₀ + √(1 − ᾱ')ε̂; CFG on
    the output; the last step returns x̂₀."""
    net = FakeNet(lambda x, k, y: 0.4 * x + 0.05 * k.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1))
    task = bound(DDPM(DDPMSchedule(num_timesteps=10), prediction=prediction), net)
    out = task.sample(router(net, task.noise), labels=[2, 4], steps=4, guidance=guidance, seed=3)
    alpha_bar = linear_alpha_bar(10)
    z = torch.randn(2, 1, 2, 2, generator=gen(3)).double()
    y = torch.tensor([2.0, 4.0]).view(-1, 1, 1, 1)
    grid = [9, 6, 3, 0]
    for i, k in enumerate(grid):
        cond, uncond = 0.4 * z + 0.05 * k + 0.1 * y, 0.4 * z + 0.05 * k + 0.1 * 10
        pred = uncond + guidance * (cond - uncond)
        a = alpha_bar[k]
        if prediction == "epsilon":
            eps, x0 = pred, (z - math.sqrt(1 - a) * pred) / math.sqrt(a)
        else:
            eps, x0 = math.sqrt(1 - a) * z + math.sqrt(a) * pred, math.sqrt(a) * z - math.sqrt(1 - a) * pred
        a_prev = alpha_bar[grid[i + 1]] if i + 1 < len(grid) else 1.0
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    close(out, z, rtol=1e-4, atol=1e-5)
    assert [int(c[1][0]) for c in net.calls] == grid


def test_ddim_with_clip_clamps_the_denoised_estimate_at_every_step() -> None:
    """clip=(lo, hi): x̂₀ ← clamp(x̂₀) at every step and ε̂ ← (z − √ᾱ·x̂₀)/√(1 − ᾱ) before the DDIM step (DDPM's
    clip_denoised), so the output is inside the range too."""
    net = FakeNet(lambda x, k, y: 0.3 * x - 0.2)
    task = bound(DDPM(DDPMSchedule(num_timesteps=10)), net)
    out = task.sample(router(net, task.noise), num_samples=2, steps=3, seed=5, clip=(-0.5, 0.5))
    alpha_bar = linear_alpha_bar(10)
    z = torch.randn(2, 1, 2, 2, generator=gen(5)).double()
    grid = [9, 4, 0]  # round(linspace(9, 0, 3))
    for i, k in enumerate(grid):
        a = alpha_bar[k]
        x0 = ((z - math.sqrt(1 - a) * (0.3 * z - 0.2)) / math.sqrt(a)).clamp(-0.5, 0.5)
        eps = (z - math.sqrt(a) * x0) / math.sqrt(1 - a)
        a_prev = alpha_bar[grid[i + 1]] if i + 1 < len(grid) else 1.0
        z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    close(out, z, rtol=1e-4, atol=1e-5)
    assert float(out.abs().max()) <= 0.5 + 1e-6
    assert [int(c[1][0]) for c in net.calls] == grid


def test_ddim_with_eta_adds_the_papers_noise() -> None:
    """η > 0: x_prev = √ᾱ'x̂₀ + √(1 − ᾱ' − s²)ε̂ + s·ξ, s = η√((1 − ᾱ')/(1 − ᾱ))√(1 − ᾱ/ᾱ')."""
    net = FakeNet(lambda x, k, y: 0.2 * x)
    task = bound(DDPM(DDPMSchedule(num_timesteps=10), eta=0.5), net)
    out = task.sample(router(net, task.noise), num_samples=2, steps=2, seed=4)
    g = gen(4)
    z = torch.randn(2, 1, 2, 2, generator=g).double()
    a, a_prev = linear_alpha_bar(10)[9], linear_alpha_bar(10)[0]
    eps = 0.2 * z
    x0 = (z - math.sqrt(1 - a) * eps) / math.sqrt(a)
    s = 0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    z = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - s**2) * eps + s * torch.randn(2, 1, 2, 2, generator=g)
    eps = 0.2 * z
    close(out, (z - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev), rtol=1e-4, atol=1e-5)


def test_ddpm_steps_and_errors_name_the_fix() -> None:
    net = FakeNet(lambda x, k, y: 0 * x)
    task = bound(DDPM(DDPMSchedule(num_timesteps=10)), net)
    with pytest.raises(ValueError, match="1 <= steps <= num_timesteps=10"):
        task.sample(router(net, task.noise), num_samples=1, steps=11)
    assert DDPMSchedule(num_timesteps=10).grid(1).tolist() == [9]
    with pytest.raises(ValueError, match=r"DDPM calls the network as forward\(x_k, k, labels=None\)"):
        DDPM().bind(nn.Linear(2, 2))  # forward(input): no timestep argument
    with pytest.raises(TypeError, match="needs a DDPMSchedule"):
        DDPM(noise=FlowSchedule())


def test_ddpm_per_timestep_bin_validation_loss() -> None:
    schedule = DDPMSchedule(num_timesteps=30)
    nets = [FakeNet(lambda x, k, y, j=j: 0 * x + j) for j in range(3)]
    task = bound(DDPM(schedule, loss_bins=2, label_dropout=0.0), nets[0])
    b = schedule.boundaries(3)
    metrics = task.validation_metrics(Router(lambda g: nets[g], schedule, b), torch.randn(8, 1, 2, 2), 0)
    assert list(metrics) == ["loss_k_0-14", "loss_k_15-29"]
    for j, net in enumerate(nets):
        for _, k, _ in net.calls:
            assert set(schedule.group_of(k.double(), b).tolist()) == {j}
