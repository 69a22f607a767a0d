"""Every formulation through the one noise-level interface (:class:`~lightning_diffusionblocks.levels.NoiseLevels`):
the same checks for EDM σ, rectified-flow t, DDPM timesteps, masking t and a formulation written here in a few lines.
Expected numbers come from reference CDFs written out below, not from the classes under test."""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import pytest
import torch
from torch import Tensor

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.flow import FlowSchedule
from lightning_diffusionblocks.levels import NoiseLevels, append_dims
from lightning_diffusionblocks.masking import MaskingSchedule
from lightning_diffusionblocks.noise import NoiseSchedule
from lightning_diffusionblocks.tasks import (
    DDPM,
    AutoregressiveLM,
    Classification,
    FlowMatching,
    ImageGeneration,
    MaskedLM,
)
from tests.reference import SIGMA_MAX, SIGMA_MIN, T_MIN

NORMAL = NormalDist()


class LogUniformSigma(NoiseLevels):
    """A formulation written against the interface alone: σ log-uniform on [a, b] (its CDF, inverse CDF, range and
    weight); partition, overlap, sampling and grid come from the base class."""

    level_name = "sigma"

    def __init__(self, a: float = 0.5, b: float = 2.0) -> None:
        self.a, self.b = a, b

    @property
    def level_min(self) -> float:
        return self.a

    @property
    def level_max(self) -> float:
        return self.b

    def cdf(self, level: Tensor | float) -> Tensor:
        s = torch.as_tensor(level, dtype=torch.float64)
        return (s.log() - math.log(self.a)) / (math.log(self.b) - math.log(self.a))

    def icdf(self, q: Tensor | float) -> Tensor:
        q = torch.as_tensor(q, dtype=torch.float64)
        return torch.exp(math.log(self.a) + q * (math.log(self.b) - math.log(self.a)))

    def loss_weight(self, level: Tensor) -> Tensor:
        return torch.ones_like(level, dtype=torch.float32)


def lognormal_mass(m: float, s: float, lo: float, hi: float, a: float, b: float) -> float:
    """P(lo ≤ σ ≤ hi) of log σ ~ N(m, s²) truncated to [a, b]."""
    cdf = lambda x: NORMAL.cdf((math.log(x) - m) / s)  # noqa: E731
    return (cdf(hi) - cdf(lo)) / (cdf(b) - cdf(a))


def logit(t: float) -> float:
    return math.log(t / (1 - t))


#: each formulation, with an independent reference of its truncated mass P(lo ≤ level ≤ hi) and how exactly its
#: equal-probability partition gives each group 1/B (masking cuts the untruncated α drops: off by ≤ t_min)
CASES: dict[str, tuple[NoiseLevels, Callable[[float, float], float], float]] = {
    "edm": (NoiseSchedule(), lambda lo, hi: lognormal_mass(-1.2, 1.2, lo, hi, 0.002, 80.0), 1e-9),
    "edm_custom": (
        NoiseSchedule(p_mean=0.3, p_std=0.7, sigma_min=0.01, sigma_max=20.0),
        lambda lo, hi: lognormal_mass(0.3, 0.7, lo, hi, 0.01, 20.0),
        1e-9,
    ),
    "flow": (
        FlowSchedule(),
        lambda lo, hi: lognormal_mass(0.0, 1.0, lo / (1 - lo), hi / (1 - hi), 1e-3 / (1 - 1e-3), 0.999 / 0.001),
        1e-9,
    ),
    "flow_shifted": (
        FlowSchedule(m=0.5, s=0.8, shift=3.0),  # σ' = 3σ: log σ ~ N(0.5 + ln 3, 0.8²)
        lambda lo, hi: lognormal_mass(
            0.5 + math.log(3), 0.8, lo / (1 - lo), hi / (1 - hi), 1e-3 / (1 - 1e-3), 0.999 / 0.001
        ),
        1e-9,
    ),
    "flow_uniform": (FlowSchedule(distribution="uniform"), lambda lo, hi: (hi - lo) / (0.999 - 1e-3), 1e-9),
    "ddpm": (
        DDPMSchedule(num_timesteps=12),
        lambda lo, hi: sum(1 for k in range(12) if lo <= k <= hi) / 12,
        1e-12,
    ),
    "ddpm_cosine_weighted": (
        DDPMSchedule(num_timesteps=12, beta_schedule="cosine", timestep_weights=(1.0,) * 6 + (3.0,) * 6),
        lambda lo, hi: sum((1.0 if k < 6 else 3.0) for k in range(12) if lo <= k <= hi) / 24,
        3 / 24 + 1e-12,  # whole timesteps: a group's share is within one timestep's weight of 1/B
    ),
    "masking": (MaskingSchedule(), lambda lo, hi: (hi - lo) / (1 - 1e-4), 2e-4),
    "log_uniform": (LogUniformSigma(), lambda lo, hi: math.log(hi / lo) / math.log(4.0), 1e-12),
}
NAMES = list(CASES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_groups", [1, 3, 4])
def test_partition_mass_ranges_and_routing(name: str, num_groups: int) -> None:
    """The equal-probability cut: B+1 ascending boundaries from level_min to level_max exactly, each group holding
    1/B of the mass (per the reference CDF); nominal ranges tile the range from the highest levels (group 0) down,
    group_range(γ=0) is the nominal range, and the middle of each range routes to its group."""
    noise, reference, tol = CASES[name]
    b = noise.boundaries(num_groups)
    assert b.dtype == torch.float64
    assert b.shape == (num_groups + 1,)
    assert (float(b[0]), float(b[-1])) == (noise.level_min, noise.level_max)
    assert (noise.sigma_min, noise.sigma_max) == (noise.level_min, noise.level_max)  # the old names still read
    assert bool((b[1:] > b[:-1]).all())
    ranges = [noise.nominal_range(b, g) for g in range(num_groups)]
    assert ranges[0][1] == noise.level_max
    assert ranges[-1][0] == noise.level_min
    for upper, lower in zip(ranges, ranges[1:]):
        assert upper[0] == lower[1]  # group g+1 sits right below group g
    for g, (lo, hi) in enumerate(ranges):
        assert noise.group_range(b, g) == (lo, hi)
        assert noise.mass(lo, hi) == pytest.approx(reference(lo, hi), rel=1e-9, abs=1e-12)
        assert noise.mass(lo, hi) == pytest.approx(1 / num_groups, abs=tol)
        middle = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
        assert int(noise.group_of(middle, b)[0]) == g
    assert sum(noise.mass(*r) for r in ranges) == pytest.approx(noise.mass(noise.level_min, noise.level_max))


@pytest.mark.parametrize("name", NAMES)
def test_overlap_widens_in_order_and_clamps(name: str) -> None:
    """group_range(γ) grows with γ, always contains the nominal range, stays in [level_min, level_max], and a huge γ
    reaches both ends; a bad group or γ is refused with the same message by every formulation."""
    noise, _, _ = CASES[name]
    b = noise.boundaries(3)
    for g in range(3):
        previous = noise.nominal_range(b, g)
        for gamma in (0.05, 0.2, 0.45):
            lo, hi = noise.group_range(b, g, gamma)
            assert noise.level_min <= lo <= previous[0]
            assert previous[1] <= hi <= noise.level_max
            assert (lo, hi) != previous or (lo, hi) == (noise.level_min, noise.level_max)
            previous = (lo, hi)
        assert noise.group_range(b, g, 100.0) == (noise.level_min, noise.level_max)
    with pytest.raises(ValueError, match=r"group must be in \[0, 3\), got 3"):
        noise.group_range(b, 3)
    with pytest.raises(ValueError, match="Overlap gamma must be >= 0"):
        noise.group_range(b, 0, -0.1)
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        noise.boundaries(0)
    with pytest.raises(ValueError, match="(?i)partition"):
        noise.boundaries(3, "cosine")


@pytest.mark.parametrize("name", NAMES)
def test_samples_stay_inside_the_range_drawn_from(name: str) -> None:
    """sample(n, lo, hi): n float32 levels inside [lo, hi] for every group's widened range and by default inside
    [level_min, level_max]; the same generator seed gives the same levels."""
    noise, _, _ = CASES[name]
    b = noise.boundaries(3)
    for g in range(3):
        lo, hi = noise.group_range(b, g, 0.1)
        levels = noise.sample(512, lo, hi, generator=torch.Generator().manual_seed(g))
        assert levels.dtype == torch.float32
        assert levels.shape == (512,)
        assert float(levels.min()) >= lo * (1 - 1e-6) - 1e-6
        assert float(levels.max()) <= hi * (1 + 1e-6) + 1e-6
        again = noise.sample(512, lo, hi, generator=torch.Generator().manual_seed(g))
        assert torch.equal(levels, again)
    levels = noise.sample(512, generator=torch.Generator().manual_seed(7))
    assert float(levels.min()) >= noise.level_min - 1e-6
    assert float(levels.max()) <= noise.level_max * (1 + 1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("steps", [1, 3, 8])
def test_sampling_grid_has_one_shape(name: str, steps: int) -> None:
    """sampling_grid(steps): float64, steps + 1 points, strictly descending: the levels the network is called at
    (inside the trained range, the first owned by group 0, then groups in order, ending in the lowest group once
    there are enough steps), then level_end below them all."""
    noise, _, _ = CASES[name]
    grid = noise.sampling_grid(steps)
    assert grid.dtype == torch.float64
    assert grid.shape == (steps + 1,)
    assert bool((grid[1:] < grid[:-1]).all())
    assert float(grid[-1]) == noise.level_end < noise.level_min
    calls = grid[:-1]
    assert float(calls.min()) >= noise.level_min
    assert float(calls.max()) <= noise.level_max
    groups = noise.group_of(calls, noise.boundaries(3)).tolist()
    assert groups[0] == 0
    assert groups == sorted(groups)
    if steps >= 8:
        assert groups[-1] == 2
    with pytest.raises(ValueError, match="steps"):
        noise.sampling_grid(0)


def test_equiprobable_grid_against_the_reference_cdf() -> None:
    """The shared equal-probability grid: equal steps of the truncated CDF from level_max to level_min (EDM's
    inference σ and the flow's 'equiprobable' times are this grid), computed here from the log-normal directly."""
    steps, edm, flow = 5, NoiseSchedule(), FlowSchedule()
    q_lo, q_hi = NORMAL.cdf((math.log(0.002) + 1.2) / 1.2), NORMAL.cdf((math.log(80.0) + 1.2) / 1.2)
    expected = [math.exp(-1.2 + 1.2 * NORMAL.inv_cdf(q_hi - k / 4 * (q_hi - q_lo))) for k in range(steps)]
    expected[0], expected[-1] = 80.0, 0.002
    assert edm.inference_sigmas(steps).tolist() == pytest.approx(expected, rel=1e-9)
    assert edm.sampling_grid(steps).tolist() == pytest.approx([*expected, 0.0], rel=1e-9)
    q_lo, q_hi = NORMAL.cdf(logit(1e-3)), NORMAL.cdf(logit(0.999))
    expected = [1 / (1 + math.exp(-NORMAL.inv_cdf(q_hi - k / 4 * (q_hi - q_lo)))) for k in range(steps)]
    expected[0], expected[-1] = 0.999, 1e-3
    assert flow.grid(steps, "equiprobable").tolist() == pytest.approx([*expected, 0.0], abs=1e-12)
    ddpm = DDPMSchedule(num_timesteps=10, timestep_weights=(2.0,) * 5 + (1.0,) * 5)
    assert ddpm.sampling_grid(3).tolist() == [9.0, 4.0, 0.0, -1.0]  # −1: the clean data, ᾱ = 1
    k = torch.arange(10, dtype=torch.float64)
    assert ddpm.cdf(k).tolist() == pytest.approx([2 * (j + 1) / 15 if j < 5 else (j + 6) / 15 for j in range(10)])
    assert torch.equal(ddpm.icdf(ddpm.cdf(k)), k)  # the discrete CDF and its quantile invert at every timestep
    assert (float(ddpm.cdf(ddpm.level_min)), float(ddpm.icdf(0.5))) == (0.0, 3.0)
    assert float(ddpm.cdf(4.5)) == pytest.approx(10 / 15, rel=1e-12)


def test_append_dims_and_tasks_typed_against_the_interface() -> None:
    """append_dims views (N,) as (N, 1, …, 1) for broadcasting over a sample; every task's noise is a NoiseLevels,
    and the EDM denoiser refuses levels that are not EDM's with the fix."""
    x = torch.arange(3.0)
    assert append_dims(x, 4).shape == (3, 1, 1, 1)
    assert append_dims(x, 1).shape == (3,)
    assert torch.equal(append_dims(x, 3) * torch.ones(3, 2, 2), x.view(3, 1, 1).expand(3, 2, 2))
    with pytest.raises(ValueError, match="cannot view a 2-D tensor with 1 dimensions"):
        append_dims(torch.ones(2, 2), 1)
    tasks = [ImageGeneration(), FlowMatching(), DDPM(), Classification(3), AutoregressiveLM(8), MaskedLM(8)]
    assert all(isinstance(task.noise, NoiseLevels) for task in tasks)
    with pytest.raises(TypeError, match="needs an EDM NoiseSchedule, got FlowSchedule.*Use FlowMatching"):
        _ = ImageGeneration(noise=FlowSchedule()).edm


# -------------------------------------------------------------------- argument checks and draws shared by the schedules


def test_schedule_arguments_are_checked() -> None:
    """Schedules refuse σ_min ≤ 0, σ_min ≥ σ_max, P_std ≤ 0, σ_data ≤ 0, t_min ∉ (0, 1) and groups outside [0, B)."""
    for bad in ({"sigma_min": 0.0}, {"sigma_min": 1.0, "sigma_max": 1.0}):
        with pytest.raises(ValueError, match="Need 0 < sigma_min < sigma_max"):
            NoiseSchedule(**bad)
    for bad in ({"p_std": 0.0}, {"sigma_data": 0.0}):
        with pytest.raises(ValueError, match="p_std and sigma_data must be positive"):
            NoiseSchedule(**bad)
    assert NoiseSchedule(p_std=0.8, sigma_data=0.3).p_std == 0.8  # any positive P_std and σ_data are fine
    for t_min in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"t_min must be in \(0, 1\)"):
            MaskingSchedule(t_min=t_min)
    for schedule in (ldb.EDM, MaskingSchedule()):
        bounds = schedule.boundaries(3)
        with pytest.raises(ValueError, match=r"group must be in \[0, 3\), got 3"):
            schedule.group_range(bounds, 3)
        with pytest.raises(ValueError, match="Overlap gamma must be >= 0"):
            schedule.group_range(bounds, 0, -0.1)
    with pytest.raises(ValueError, match="Need lo < hi"):
        MaskingSchedule().sample(4, 0.5, 0.5)


def test_sigma_and_t_draws_without_a_generator() -> None:
    """Both schedules draw from the global generator when none is given: n float32 levels inside the range."""
    torch.manual_seed(0)
    sigma = ldb.EDM.sample(64)
    t = MaskingSchedule().sample(64)
    for levels, lo, hi in ((sigma, SIGMA_MIN, SIGMA_MAX), (t, T_MIN, 1.0)):
        assert levels.shape == (64,)
        assert levels.dtype == torch.float32
        assert bool((levels >= lo * (1 - 1e-6)).all())
        assert bool((levels <= hi * (1 + 1e-6)).all())


def test_each_formulation_gives_the_edm_sigma_of_its_levels() -> None:
    """The common scale edges move on between formulations: EDM's σ, flow's t/(1 − t), DDPM's √((1 − ᾱ_k)/ᾱ_k) with
    linear betas (1e-4 … 0.02 over T), linear in k between timesteps; masking has none and says how to add it."""
    sigma = torch.tensor([0.002, 0.5, 80.0], dtype=torch.float64)
    assert torch.equal(ldb.NoiseSchedule().edm_sigma(sigma), sigma)
    t = torch.tensor([0.25, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(ldb.FlowSchedule().edm_sigma(t), torch.tensor([1 / 3, 1.0, 9.0], dtype=torch.float64))
    steps = 10
    betas = [1e-4 + (0.02 - 1e-4) * i / (steps - 1) for i in range(steps)]
    alpha_bar, expected = 1.0, []
    for b in betas:
        alpha_bar *= 1 - b
        expected.append(math.sqrt((1 - alpha_bar) / alpha_bar))
    ddpm = ldb.DDPMSchedule(num_timesteps=steps)
    got = ddpm.edm_sigma(torch.tensor([0.0, 3.0, 9.0, 3.5], dtype=torch.float64))
    assert torch.allclose(got[:3], torch.tensor([expected[0], expected[3], expected[9]], dtype=torch.float64))
    assert math.isclose(float(got[3]), (expected[3] + expected[4]) / 2, rel_tol=1e-12)
    assert (ldb.NoiseSchedule().pipeline_time, ldb.FlowSchedule().pipeline_time, ddpm.pipeline_time) == (
        None, "flow", "discrete")  # fmt: skip
    with pytest.raises(NotImplementedError, match="edm_sigma"):
        MaskingSchedule().edm_sigma(t)


def test_unknown_partitions_and_missing_edm_sigma_are_refused_by_name() -> None:
    """A partition a formulation does not offer is refused listing the ones it does; a formulation without an EDM
    σ says how to add one; σ conversions are float64 whatever the input's dtype."""
    edm_and_flow = r"^Unknown partition 'bogus'; use 'equiprobable', 'uniform_log' or 'linear'\.$"
    for levels in (NoiseSchedule(), FlowSchedule()):
        with pytest.raises(ValueError, match=edm_and_flow):
            levels.boundaries(3, "bogus")
    with pytest.raises(
        NotImplementedError,
        match=r"^MaskingSchedule defines no EDM sigma for its t; give it an `edm_sigma\(levels\)` method to convert its"
        r" group edges to another formulation's scale \(e\.g\. a diffusers pipeline's\)\.$",
    ):
        MaskingSchedule().edm_sigma(torch.tensor([0.5]))
    assert NoiseSchedule().edm_sigma(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float64


def test_masking_cdf_is_the_clamped_uniform_cdf() -> None:
    """t is uniform on [0, 1]: its CDF is 0 below, t inside, 1 above."""
    got = MaskingSchedule().cdf(torch.tensor([-0.5, 0.0, 0.25, 1.0, 1.5]))
    assert got.tolist() == [0.0, 0.0, 0.25, 1.0, 1.0]


def test_quantiles_boundaries_and_the_grid_end_are_exact_in_float64() -> None:
    """The equal-probability cut, ``quantile`` and the grid's end are computed in float64 throughout: a fraction such
    as 1/3 is not rounded to float32 first (a 3e-8 relative error in every inner boundary), and a ``level_end`` that
    float32 cannot hold (0.1) ends the grid exactly."""
    levels = LogUniformSigma(0.5, 2.0)
    reference = [math.exp(math.log(0.5) + k / 3 * math.log(4.0)) for k in range(4)]
    got = levels.boundaries(3).tolist()
    assert got[0] == 0.5
    assert got[3] == 2.0
    for k in (1, 2):
        assert got[k] == pytest.approx(reference[k], rel=1e-13)
    assert float(levels.quantile(1 / 3)) == pytest.approx(reference[1], rel=1e-13)

    class EndsAtATenth(LogUniformSigma):
        level_end = 0.1

    grid = EndsAtATenth().sampling_grid(3)
    assert grid.dtype == torch.float64
    assert grid[-1].item() == 0.1


def test_a_partition_the_base_class_does_not_know_is_refused_by_name() -> None:
    """A formulation written against the interface, with no partitions of its own, refuses any other than
    ``equiprobable`` and ``linear``, naming the one asked for (DDPM and masking say why in their own words)."""
    with pytest.raises(ValueError, match=r"^Unknown partition 'bogus'; use 'equiprobable' or 'linear'\.$"):
        LogUniformSigma().boundaries(3, "bogus")


def test_masking_inverse_cdf_is_the_identity_in_float64() -> None:
    q = torch.tensor([0.0, 0.25, 1 / 3, 1.0], dtype=torch.float32)
    got = MaskingSchedule().icdf(q)
    assert got.dtype == torch.float64
    assert got.tolist() == q.double().tolist()
    assert MaskingSchedule().icdf(0.1).item() == 0.1  # a Python float: not through float32
    assert got is not q
