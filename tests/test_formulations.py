"""Rectified flow and DDPM (issue #12): every formula pinned by a fast test.

Expected values are computed HERE from the formulas (rectified flow x_t = (1 − t)x + tε, v = ε − x; logit-normal
t = sigmoid(m + s·Z); DDPM x_k = √ᾱ_k x + √(1 − ᾱ_k) ε; DDIM, Song et al. 2021 Eq. 12), with plain ``math``,
``torch`` and ``statistics.NormalDist``; the package's helpers are only ever the thing under test. Tasks are
driven through their public ``loss(run, batch, t, generator)`` and ``sample(router, ...)`` with fake networks
that record what they receive and return known outputs.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.flow import FlowSchedule
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.sampling import classifier_free_guidance
from lightning_diffusionblocks.tasks import DDPM, FlowMatching

NORMAL = NormalDist()


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


class FakeNet(nn.Module):
    """Records (x, level, labels) and returns out(x, level, labels); one label embedding row per class + null."""

    def __init__(self, out, num_classes: int = 10) -> None:  # noqa: ANN001
        super().__init__()
        self.out, self.num_classes = out, num_classes
        self.channels, self.image_size = 1, 2
        self.calls: list[tuple[Tensor, Tensor, Tensor | None]] = []

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((x.clone(), t.clone(), None if labels is None else labels.clone()))
        return self.out(x, t, labels)


def bound(task: ldb.tasks.Task, net: nn.Module) -> ldb.tasks.Task:
    task.bind(net)
    return task


def router(net: nn.Module, schedule, boundaries: Tensor | None = None) -> Router:  # noqa: ANN001
    return Router(lambda group: net, schedule, boundaries)


# ============================================================================ flow: the distribution of t


def test_flow_boundaries_are_the_logit_normal_quantiles() -> None:
    """m=0, s=1, B=3 → t ≈ 0.394, 0.606 (sigmoid(±Φ⁻¹(1/3))); shift α=3 adds ln 3 to m → 0.661, 0.822."""
    got = FlowSchedule().boundaries(3).tolist()
    assert got == pytest.approx(flow_boundaries(3), abs=1e-9)
    assert got[1:3] == pytest.approx([sigmoid(NORMAL.inv_cdf(1 / 3)), sigmoid(NORMAL.inv_cdf(2 / 3))], abs=1e-9)
    assert got[1:3] == pytest.approx([0.394, 0.606], abs=5e-4)
    shifted = FlowSchedule(shift=3.0).boundaries(3).tolist()
    assert shifted == pytest.approx(flow_boundaries(3, m=math.log(3)), abs=1e-9)
    assert shifted[1:3] == pytest.approx([0.661, 0.822], abs=5e-4)
    untruncated = FlowSchedule(t_min=0.0, t_max=1.0).boundaries(4).tolist()
    assert untruncated == pytest.approx([0.0, *[sigmoid(NORMAL.inv_cdf(b / 4)) for b in (1, 2, 3)], 1.0], abs=1e-12)
    uniform = FlowSchedule(distribution="uniform", t_min=0.0, t_max=1.0).boundaries(4).tolist()
    assert uniform == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0], abs=1e-12)


def test_flow_boundaries_give_back_the_papers_edm_sigmas() -> None:
    """With EDM's (m, s) = (−1.2, 1.2) and σ range mapped by t = σ/(1+σ), σ_b = t_b/(1 − t_b) = 0.1796, 0.5050."""
    t_range = {"t_min": 0.002 / 1.002, "t_max": 80 / 81}
    t = FlowSchedule(m=-1.2, s=1.2, **t_range).boundaries(3).tolist()
    sigma = [x / (1 - x) for x in t]
    assert sigma == pytest.approx([0.002, 0.1796, 0.5050, 80.0], rel=2e-4)
    assert t[1:3] == pytest.approx([0.152, 0.336], abs=5e-4)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1])
def test_flow_overlap_is_the_edm_overlap_in_logit_t(gamma: float) -> None:
    """γ widens each group by γ × its width in logit t = ln σ: mapped to σ, exactly the paper's EDM ranges."""
    sigma_min, sigma_max, num_groups = 0.002, 80.0, 3
    schedule = FlowSchedule(m=-1.2, s=1.2, t_min=sigma_min / (1 + sigma_min), t_max=sigma_max / (1 + sigma_max))
    b = schedule.boundaries(num_groups)
    q = [NORMAL.cdf((math.log(s) + 1.2) / 1.2) for s in (sigma_min, sigma_max)]
    edm = [sigma_min, *[math.exp(-1.2 + 1.2 * NORMAL.inv_cdf(q[0] + k / 3 * (q[1] - q[0]))) for k in (1, 2)], sigma_max]
    for g in range(num_groups):
        lo, hi = edm[num_groups - 1 - g], edm[num_groups - g]
        alpha = (hi / lo) ** gamma
        expected = (max(lo / alpha, sigma_min), min(hi * alpha, sigma_max))
        t_lo, t_hi = schedule.group_range(b, g, gamma)
        assert (t_lo / (1 - t_lo), t_hi / (1 - t_hi)) == pytest.approx(expected, rel=1e-6)
    # the default schedule, widened in logit t by hand
    b = FlowSchedule().boundaries(3).tolist()
    for g in range(3):
        lo, hi = b[2 - g], b[3 - g]
        w = logit(hi) - logit(lo)
        expected = (max(sigmoid(logit(lo) - gamma * w), 1e-3), min(sigmoid(logit(hi) + gamma * w), 0.999))
        got = FlowSchedule().group_range(torch.tensor(b, dtype=torch.float64), g, gamma)
        assert got == pytest.approx(expected, abs=1e-12)


def test_flow_overlap_needs_a_finite_logit_range() -> None:
    schedule = FlowSchedule(t_min=0.0, t_max=1.0)
    with pytest.raises(ValueError, match="0 < t_min and t_max < 1"):
        schedule.group_range(schedule.boundaries(3), 0, 0.05)
    assert schedule.group_range(schedule.boundaries(3), 1, 0.05)[0] > 0  # a finite middle group is fine


def test_flow_group_zero_owns_the_highest_t() -> None:
    schedule = FlowSchedule()
    b = schedule.boundaries(3)
    low, high = flow_boundaries(3)[1:3]
    t = torch.tensor([0.999, 0.7, high, 0.5, low, 0.2, 0.001], dtype=torch.float64)
    assert schedule.group_of(t, b).tolist() == [0, 0, 1, 1, 2, 2, 2]  # on a boundary: the lower-noise group


@pytest.mark.parametrize(("m", "s", "shift", "group"), [(0.0, 1.0, 1.0, 1), (0.0, 1.0, 3.0, 0), (-0.5, 0.8, 1.0, 2)])
def test_flow_t_is_drawn_by_inverse_cdf_of_the_truncated_logit_normal(m: float, s: float, shift: float, group: int):
    schedule = FlowSchedule(m=m, s=s, shift=shift)
    m_eff = m + math.log(shift)
    lo, hi = schedule.group_range(schedule.boundaries(3), group, 0.05)
    t = schedule.sample(20_000, lo, hi, generator=gen(3))
    assert t.dtype == torch.float32
    assert lo <= float(t.min())
    assert float(t.max()) <= hi
    # exact: the first draws are icdf(q_lo + u·(q_hi − q_lo)) of the generator's own uniforms
    u = torch.rand(5, dtype=torch.float64, generator=gen(3)).tolist()
    q_lo, q_hi = logit_normal_cdf(lo, m_eff, s), logit_normal_cdf(hi, m_eff, s)
    exact = [sigmoid(m_eff + s * NORMAL.inv_cdf(q_lo + x * (q_hi - q_lo))) for x in u]
    assert t[:5].tolist() == pytest.approx(exact, rel=1e-6)
    # and the whole sample follows the truncated CDF (Kolmogorov–Smirnov distance)
    for x in torch.linspace(lo, hi, 9)[1:-1].tolist():
        expected = (logit_normal_cdf(x, m_eff, s) - q_lo) / (q_hi - q_lo)
        assert float((t <= x).double().mean()) == pytest.approx(expected, abs=0.015)


def test_flow_uniform_t_with_shift() -> None:
    """Uniform t shifted by α: P(T' ≤ t) = t/(α − (α − 1)t)."""
    schedule = FlowSchedule(distribution="uniform", shift=2.0, t_min=0.0, t_max=1.0)
    t = schedule.sample(20_000, generator=gen(0))
    for x in (0.2, 0.5, 0.8):
        assert float((t <= x).double().mean()) == pytest.approx(x / (2 - x), abs=0.015)
    assert schedule.boundaries(2).tolist()[1] == pytest.approx(2 * 0.5 / (1 + 0.5), abs=1e-12)


# ============================================================================ flow: loss


@pytest.mark.parametrize(
    ("prediction", "time_scale", "reverse_time"),
    [("velocity", 1.0, False), ("velocity", 1000.0, False), ("velocity", 1.0, True), ("x0", 1.0, False),
     ("epsilon", 1.0, False)],
)  # fmt: skip
def test_flow_loss_is_the_mse_to_its_target(prediction: str, time_scale: float, reverse_time: bool) -> None:
    net = FakeNet(lambda x, t, y: 0.5 * x + 0.1 * t.view(-1, 1, 1, 1) / time_scale + 0.01 * y.view(-1, 1, 1, 1))
    task = bound(FlowMatching(prediction=prediction, label_dropout=0.0, time_scale=time_scale,
                              reverse_time=reverse_time), net)  # fmt: skip
    images = torch.randn(4, 1, 2, 2, generator=gen(1))
    labels = torch.tensor([0, 3, 5, 9])
    t = torch.tensor([0.9, 0.5, 0.3, 0.01])
    loss = task.loss(net, (images, labels), t, gen(7))
    eps = torch.randn(images.shape, generator=gen(7))
    tt = t.view(-1, 1, 1, 1)
    z = (1 - tt) * images + tt * eps
    x_in, t_in, y_in = net.calls[-1]
    close(x_in, z)
    close(t_in, time_scale * ((1 - t) if reverse_time else t))
    assert torch.equal(y_in, labels)
    out = 0.5 * z + 0.1 * t_in.view(-1, 1, 1, 1) / time_scale + 0.01 * labels.view(-1, 1, 1, 1)
    target = {"velocity": eps - images, "x0": images, "epsilon": eps}[prediction]
    if reverse_time:  # the network's own velocity is dx/d(1 − t) = x − ε
        target = images - eps
    close(loss, ((out - target) ** 2).flatten(1).mean(1))


def test_flow_label_dropout_uses_the_null_label() -> None:
    net = FakeNet(lambda x, t, y: x)
    task = bound(FlowMatching(label_dropout=0.5), net)
    task.loss(net, (torch.zeros(64, 1, 2, 2), torch.zeros(64, dtype=torch.long)), torch.full((64,), 0.5), gen(0))
    drop = torch.rand(64, generator=gen(0)) < 0.5
    assert torch.equal(net.calls[-1][2], torch.where(drop, 10, 0))  # the network's num_classes row


# ============================================================================ flow: samplers and guidance


def flow_grid(steps: int, t_max: float = 0.999) -> list[float]:
    return [t_max * (1 - i / steps) for i in range(steps)] + [0.0]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_flow_euler_sampler(steps: int) -> None:
    """z ← z + (t_next − t)·v(z, t) from pure noise at t_max down to 0, one call per step."""
    net = FakeNet(lambda x, t, y: -0.7 * x + t.view(-1, 1, 1, 1))
    task = bound(FlowMatching(), net)
    out = task.sample(router(net, task.noise), num_samples=3, steps=steps, seed=5)
    z = torch.randn(3, 1, 2, 2, generator=gen(5)).double()
    grid = flow_grid(steps)
    for t, t_next in zip(grid[:-1], grid[1:]):
        z = z + (t_next - t) * (-0.7 * z + t)
    close(out, z)
    assert [float(c[1][0]) for c in net.calls] == pytest.approx(grid[:-1], rel=1e-6)


@pytest.mark.parametrize("steps", [1, 3])
def test_flow_heun_sampler(steps: int) -> None:
    """Heun: z ← z + Δt·(v(z, t) + v(z + Δt·v, t_next))/2, the last step into t = 0 an Euler step."""
    net = FakeNet(lambda x, t, y: -0.7 * x + t.view(-1, 1, 1, 1) ** 2)
    task = bound(FlowMatching(sampler="heun"), net)
    out = task.sample(router(net, task.noise), num_samples=2, steps=steps, seed=1)
    z = torch.randn(2, 1, 2, 2, generator=gen(1)).double()
    grid = flow_grid(steps)

    def v(z: Tensor, t: float) -> Tensor:
        return -0.7 * z + t**2

    for t, t_next in zip(grid[:-1], grid[1:]):
        dt = t_next - t
        euler = z + dt * v(z, t)
        z = euler if t_next == 0 else z + dt * (v(z, t) + v(euler, t_next)) / 2
    close(out, z)
    assert len(net.calls) == 2 * steps - 1


@pytest.mark.parametrize("prediction", ["x0", "epsilon"])
def test_flow_sampler_converts_x0_and_epsilon_predictions(prediction: str) -> None:
    """x₀-prediction v = (z − x̂)/t; ε-prediction v = (ε̂ − z)/(1 − t)."""
    net = FakeNet(lambda x, t, y: 0.3 * x + 0.2)
    task = bound(FlowMatching(prediction=prediction), net)
    out = task.sample(router(net, task.noise), num_samples=2, steps=2, seed=0)
    z = torch.randn(2, 1, 2, 2, generator=gen(0)).double()
    grid = flow_grid(2)
    for t, t_next in zip(grid[:-1], grid[1:]):
        pred = 0.3 * z + 0.2
        v = (z - pred) / t if prediction == "x0" else (pred - z) / (1 - t)
        z = z + (t_next - t) * v
    close(out, z, rtol=1e-4, atol=1e-5)


def test_flow_equiprobable_grid_and_shift() -> None:
    schedule = FlowSchedule(shift=3.0)
    q_lo, q_hi = logit_normal_cdf(1e-3, math.log(3)), logit_normal_cdf(0.999, math.log(3))
    expected = [sigmoid(math.log(3) + NORMAL.inv_cdf(q_hi - k / 3 * (q_hi - q_lo))) for k in range(4)]
    expected[0], expected[-1] = 0.999, 1e-3
    assert schedule.grid(4, "equiprobable").tolist() == pytest.approx([*expected, 0.0], abs=1e-9)
    shifted = [3 * f / (1 + 2 * f) * 0.999 for f in (1.0, 0.75, 0.5, 0.25)]
    assert schedule.grid(4).tolist() == pytest.approx([*shifted, 0.0], abs=1e-12)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_flow_classifier_free_guidance(guidance: float) -> None:
    """v = v_u + g·(v_c − v_u), v_u at the discovered null label (the network's num_classes = 10)."""
    net = FakeNet(lambda x, t, y: 0 * x + y.float().view(-1, 1, 1, 1))
    task = bound(FlowMatching(), net)
    out = task.sample(router(net, task.noise), labels=[3, 7], steps=1, guidance=guidance, seed=2)
    z = torch.randn(2, 1, 2, 2, generator=gen(2)).double()
    cond = torch.tensor([3.0, 7.0]).view(-1, 1, 1, 1)
    v = cond if guidance == 1.0 else 10 + guidance * (cond - 10)
    close(out, z - 0.999 * v)
    assert net.calls[-1][2].tolist() == ([3, 7] if guidance == 1.0 else [3, 7, 10, 10])
    direct = classifier_free_guidance(lambda z, t, y: y.float(), torch.zeros(2), torch.zeros(2), torch.tensor([1, 2]),
                                      5, 3.0)  # fmt: skip
    assert direct.tolist() == [5 + 3 * (1 - 5), 5 + 3 * (2 - 5)]


def test_flow_sampling_calls_only_the_owning_group() -> None:
    schedule = FlowSchedule()
    b = schedule.boundaries(3)
    nets = [FakeNet(lambda x, t, y, k=k: 0 * x + k) for k in range(3)]
    task = bound(FlowMatching(), nets[0])
    task.sample(Router(lambda g: nets[g], schedule, b), num_samples=1, steps=10)
    for g, net in enumerate(nets):
        for _, t, _ in net.calls:
            assert int(schedule.group_of(t.double(), b)[0]) == g
    # t = 0.999·(1 − i/10): 0.999 … 0.6993 | 0.5994, 0.4995, 0.3996 | 0.2997 … 0.0999, against 0.394 and 0.606
    assert [len(n.calls) for n in nets] == [4, 3, 3]


def test_flow_per_t_bin_validation_loss() -> None:
    schedule = FlowSchedule()
    b = schedule.boundaries(3)
    nets = [FakeNet(lambda x, t, y, k=k: 0 * x + k) for k in range(3)]
    task = bound(FlowMatching(loss_bins=4, label_dropout=0.0), nets[0])
    images = torch.randn(6, 1, 2, 2, generator=gen(0))
    metrics = task.validation_metrics(Router(lambda g: nets[g], schedule, b), (images, torch.arange(6)), 0)
    assert list(metrics) == ["loss_t_0-0.25", "loss_t_0.25-0.5", "loss_t_0.5-0.75", "loss_t_0.75-1"]
    for net in nets:  # each sample was served by the group owning its t
        for _, t, _ in net.calls:
            assert set(schedule.group_of(t.double(), b).tolist()) == {nets.index(net)}
    assert all(torch.isfinite(v) for v in metrics.values())
    assert FlowMatching().validation_metrics(Router(lambda g: nets[0], schedule, None), images, 0) == {}


# ============================================================================ DDPM: schedule and partition


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


# ============================================================================ DDPM: loss and DDIM


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


def test_denoise_is_the_clean_image_estimate() -> None:
    """The inherited ``denoise``/``guided_denoise`` give x̂₀: flow z − t·v; DDPM (z − √(1−ᾱ)ε̂)/√ᾱ."""
    net = FakeNet(lambda x, t, y: 0.5 * x + 1.0)
    z, level = torch.randn(2, 1, 2, 2, generator=gen(0)), torch.tensor([0.3, 0.8])
    flow = bound(FlowMatching(), net)
    close(flow.guided_denoise(net, z, level, None), z - level.view(-1, 1, 1, 1) * (0.5 * z + 1))
    ddpm = bound(DDPM(DDPMSchedule(num_timesteps=10)), net)
    k = torch.tensor([2.0, 9.0])
    a = torch.tensor([linear_alpha_bar(10)[2], linear_alpha_bar(10)[9]]).view(-1, 1, 1, 1)
    close(ddpm.denoise(net, z, k, None), (z - (1 - a).sqrt() * (0.5 * z + 1)) / a.sqrt(), rtol=1e-4)
