"""Rectified flow: the logit-normal schedule of t (``flow.py``) and the FlowMatching task.

x_t = (1 − t)x + tε, v = ε − x; t = sigmoid(m + s·Z) truncated, shifted by ln α; its equal-probability partition,
overlap in logit t, inverse-CDF draws, the loss, the Euler and Heun samplers, x₀/ε conversions and guidance.
Expected values come from ``tests/reference.py`` and the formulas written in each test, never from the package.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_diffusionblocks.flow import FlowSchedule
from lightning_diffusionblocks.routing import Router
from lightning_diffusionblocks.sampling import classifier_free_guidance, flow_euler_step
from lightning_diffusionblocks.tasks import FlowMatching
from tests.fakes import FakeNet, bound, router
from tests.reference import NORMAL, close, flow_boundaries, gen, logit, logit_normal_cdf, sigmoid


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


def test_flow_euler_step() -> None:
    """Euler step of the flow ODE dz/dt = v from t to t_next: z + (t_next − t)·v."""
    z = torch.randn(4, 3, generator=gen(0))
    v = torch.randn(4, 3, generator=gen(1))
    for t, t_next in ((1.0, 0.75), (0.6, 0.2), (0.3, 0.0)):
        close(flow_euler_step(z, v, t, t_next), z.double() + (t_next - t) * v.double(), rtol=1e-6, atol=1e-7)


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
