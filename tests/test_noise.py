"""The EDM noise schedule (``noise.py``): the paper's numbers, its equations and the properties they imply."""

import math

import pytest
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.tasks import ImageGeneration
from tests.reference import (
    P_MEAN,
    P_STD,
    Q_MAX,
    Q_MIN,
    SIGMA_MAX,
    SIGMA_MIN,
    cdf,
    close,
    coefficients,
    edm_boundaries,
    edm_grid,
    gen,
    icdf,
    owner,
    weight,
)


@pytest.mark.parametrize(
    ("num_groups", "inner"),
    [
        (2, [0.3012]),
        (3, [0.1796, 0.5050]),
        (4, [0.1341, 0.3012, 0.6766]),
        (6, [0.0943, 0.1796, 0.3012, 0.5050, 0.9617]),
    ],
)
def test_equiprobable_boundaries_match_paper(num_groups, inner):
    b = EDM.boundaries(num_groups)
    assert b[0] == 0.002
    assert b[-1] == 80.0
    assert b[1:-1].tolist() == pytest.approx(inner, abs=1e-4)


def test_uniform_log_and_linear_partitions():
    assert EDM.boundaries(3, "uniform_log")[1:-1].tolist() == pytest.approx([0.0684, 2.339], rel=1e-3)
    lin = EDM.boundaries(4, "linear")
    assert torch.allclose(lin[1:] - lin[:-1], torch.full((4,), (80 - 0.002) / 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="Unknown partition"):
        EDM.boundaries(3, "cosine")


def test_overlap_ranges_match_paper():
    b = EDM.boundaries(3)
    # group 0 = first layers = highest noise
    expected = {0: (0.3920, 80.0), 1: (0.1706, 0.5318), 2: (0.002, 0.2249)}
    for g, (lo, hi) in expected.items():
        assert EDM.group_range(b, g, gamma=0.05) == pytest.approx((lo, hi), abs=1e-4)
    assert EDM.group_range(b, 1, gamma=0.1) == pytest.approx((0.1620, 0.5600), abs=1e-4)
    assert EDM.group_range(b, 0, gamma=0.0) == pytest.approx((float(b[2]), 80.0))


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 6, 12])
def test_each_group_holds_equal_mass(num_groups):
    b = EDM.boundaries(num_groups)
    masses = [EDM.mass(*EDM.group_range(b, g)) for g in range(num_groups)]
    assert masses == pytest.approx([1 / num_groups] * num_groups, abs=1e-9)
    # ranges are ordered from high to low noise and tile [σ_min, σ_max]
    ranges = [EDM.group_range(b, g) for g in range(num_groups)]
    assert ranges[0][1] == 80.0
    assert ranges[-1][0] == 0.002
    for upper, lower in zip(ranges, ranges[1:]):
        assert upper[0] == pytest.approx(lower[1])


def test_samples_land_in_range_and_follow_truncated_lognormal():
    b = EDM.boundaries(3)
    g = torch.Generator().manual_seed(0)
    for group in range(3):
        lo, hi = EDM.group_range(b, group, gamma=0.05)
        s = EDM.sample(20000, lo, hi, generator=g)
        assert s.dtype == torch.float32
        assert float(s.min()) >= lo * (1 - 1e-6)
        assert float(s.max()) <= hi * (1 + 1e-6)
        # the CDF-transformed draws are uniform on [q_lo, q_hi]: their mean is the midpoint
        q = EDM.cdf(s.double())
        mid = float((EDM.cdf(lo) + EDM.cdf(hi)) / 2)
        assert float(q.mean()) == pytest.approx(mid, abs=0.005)
    with pytest.raises(ValueError, match="lo < hi"):
        EDM.sample(4, 1.0, 1.0)


def test_full_range_sampling_matches_lognormal_median():
    s = EDM.sample(50000, generator=torch.Generator().manual_seed(1))
    assert math.log(float(s.median())) == pytest.approx(-1.2, abs=0.03)


def test_preconditioning_and_weight():
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = EDM.precondition(sigma)
    assert c_skip[0] == pytest.approx(1.0, abs=1e-4)
    assert c_skip[1] == pytest.approx(0.5)
    assert c_out[1] == pytest.approx(0.25 / math.sqrt(0.5))
    assert c_in[2] == pytest.approx(1 / math.sqrt(6400.25))
    assert torch.allclose(c_noise, sigma.log() / 4)
    w = EDM.loss_weight(sigma.to(torch.bfloat16))
    assert w.dtype == torch.float32
    assert float(EDM.loss_weight(torch.tensor([0.002]))) == pytest.approx(250004, rel=1e-4)
    assert float(EDM.loss_weight(torch.tensor([80.0]))) == pytest.approx(4.0, rel=1e-4)
    # EDM's weight makes the effective loss on the raw network output unit-weighted: w·c_out² = 1
    s = torch.logspace(-2.7, 1.9, 50)
    assert torch.allclose(EDM.loss_weight(s) * EDM.precondition(s)[1] ** 2, torch.ones(50), atol=1e-5)


def test_inference_grid_is_equiprobable_and_descending():
    assert EDM.inference_sigmas(3).tolist() == pytest.approx([80.0, 0.3012, 0.002], abs=1e-4)
    grid = EDM.inference_sigmas(50)
    assert (grid[1:] < grid[:-1]).all()
    counts = EDM.group_of(grid, EDM.boundaries(3)).bincount(minlength=3).tolist()
    assert sorted(counts) == [16, 17, 17]
    with pytest.raises(ValueError, match="at least 1 step"):
        EDM.inference_sigmas(0)


def test_group_of_orders_highest_noise_first():
    b = EDM.boundaries(3)
    groups = EDM.group_of(torch.tensor([80.0, 1.0, 0.3, 0.01, 0.002]), b).tolist()
    assert groups == [0, 0, 1, 2, 2]


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        NoiseSchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="num_groups"):
        EDM.boundaries(0)
    with pytest.raises(ValueError, match="gamma"):
        EDM.group_range(EDM.boundaries(3), 0, gamma=-0.1)


# -------------------------------------------------- the EDM schedule against the paper's equations (tests/reference.py)


def test_edm_preconditioning_coefficients() -> None:
    """EDM preconditioning (paper App. C / §1.7): c_skip, c_out, c_in, c_noise."""
    sigma = torch.tensor([0.002, 0.01, 0.1796, 0.5, 1.0, 3.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = ldb.EDM.precondition(sigma)
    for i, s in enumerate(sigma.tolist()):
        exp = coefficients(s)
        got = (float(c_skip[i]), float(c_out[i]), float(c_in[i]), float(c_noise[i]))
        assert got == pytest.approx(exp, rel=1e-12, abs=1e-15), f"σ={s}"


def test_edm_loss_weight() -> None:
    """Loss weight λ(σ) = (σ²+σd²)/(σσd)² (paper App. C), per sample, float32; λ(0.002) ≈ 2.5e5."""
    sigma = torch.tensor([0.002, 0.05, 0.5, 2.0, 80.0])
    w = ldb.EDM.loss_weight(sigma)
    assert w.dtype == torch.float32
    assert w.shape == sigma.shape
    close(w, weight(sigma), rtol=1e-6)
    assert float(w[0]) == pytest.approx(250_004.0, rel=1e-6)
    assert float(w[-1]) == pytest.approx(4.00015625, rel=1e-6)


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 5, 6, 8])
def test_edm_boundaries_are_equiprobable(num_groups: int) -> None:
    """Equi-probability partitioning σ_b = exp(P_mean + P_std·Φ⁻¹(q_b)), q_b equally spaced (§3.3)."""
    got = ldb.EDM.boundaries(num_groups).tolist()
    expected = edm_boundaries(num_groups)
    assert got == pytest.approx(expected, rel=1e-9)
    masses = [(cdf(hi) - cdf(lo)) / (Q_MAX - Q_MIN) for lo, hi in zip(got, got[1:])]
    assert masses == pytest.approx([1 / num_groups] * num_groups, abs=1e-9)
    if num_groups == 3:
        assert got[1:3] == pytest.approx([0.1796, 0.5050], abs=5e-5)


@pytest.mark.parametrize("num_groups", [2, 3, 5])
def test_edm_uniform_log_and_linear_boundaries(num_groups: int) -> None:
    """Ablation partitions: equal steps of ln σ (App. E.6.2) and of σ (§3.3 "naive uniform")."""
    frac = [b / num_groups for b in range(num_groups + 1)]
    log_span = math.log(SIGMA_MAX) - math.log(SIGMA_MIN)
    uniform_log = [math.exp(math.log(SIGMA_MIN) + f * log_span) for f in frac]
    linear = [SIGMA_MIN + f * (SIGMA_MAX - SIGMA_MIN) for f in frac]
    assert ldb.EDM.boundaries(num_groups, "uniform_log").tolist() == pytest.approx(uniform_log, rel=1e-9)
    assert ldb.EDM.boundaries(num_groups, "linear").tolist() == pytest.approx(linear, rel=1e-9)
    if num_groups == 3:
        assert uniform_log[1:3] == pytest.approx([0.0684, 2.339], rel=1e-3)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.1, 0.4])
@pytest.mark.parametrize("num_groups", [2, 3, 4])
def test_edm_overlap_ranges_widen_by_alpha(num_groups: int, gamma: float) -> None:
    """Overlap (App. C): block [lo, hi] trains on [lo/α, hi·α], α = (hi/lo)^γ, clamped to [σ_min, σ_max]."""
    bounds = edm_boundaries(num_groups)
    package_bounds = ldb.EDM.boundaries(num_groups)
    for g in range(num_groups):
        lo, hi = bounds[num_groups - 1 - g], bounds[num_groups - g]  # group 0 = highest noise
        alpha = (hi / lo) ** gamma
        expected = (max(lo / alpha, SIGMA_MIN), min(hi * alpha, SIGMA_MAX))
        assert ldb.EDM.group_range(package_bounds, g, gamma) == pytest.approx(expected, rel=1e-9)


def test_edm_overlap_ranges_match_the_papers_numbers() -> None:
    """Overlap (App. C), B=3: γ=0.05 → [0.3920, 80], [0.1706, 0.5318], [0.002, 0.2249]; γ=0.1 → [0.1620, 0.5600]."""
    b = ldb.EDM.boundaries(3)
    assert ldb.EDM.group_range(b, 0, 0.05) == pytest.approx((0.3920, 80.0), abs=1e-4)
    assert ldb.EDM.group_range(b, 1, 0.05) == pytest.approx((0.1706, 0.5318), abs=1e-4)
    assert ldb.EDM.group_range(b, 2, 0.05) == pytest.approx((0.002, 0.2249), abs=1e-4)
    assert ldb.EDM.group_range(b, 1, 0.1) == pytest.approx((0.1620, 0.5600), abs=1e-4)


@pytest.mark.parametrize(("lo", "hi"), [(SIGMA_MIN, SIGMA_MAX), (0.1706, 0.5318), (0.3920, SIGMA_MAX), (0.002, 0.01)])
def test_sigma_sampling_is_the_truncated_inverse_cdf(lo: float, hi: float) -> None:
    """Truncated log-normal by inverse CDF (App. C): u ~ U(0,1), σ = exp(P_mean + P_std·Φ⁻¹(q_lo + u(q_hi − q_lo)))."""
    n = 64
    got = ldb.EDM.sample(n, lo, hi, generator=gen(7))
    assert got.dtype == torch.float32
    u = torch.rand(n, dtype=torch.float64, generator=gen(7)).tolist()  # the one draw the sampler makes
    q_lo, q_hi = cdf(lo), cdf(hi)
    expected = torch.tensor([min(max(icdf(q_lo + x * (q_hi - q_lo)), lo), hi) for x in u], dtype=torch.float64)
    close(got, expected, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize(("lo", "hi"), [(SIGMA_MIN, SIGMA_MAX), (0.1796, 0.5050), (0.3920, SIGMA_MAX)])
def test_sigma_samples_follow_the_truncated_lognormal(lo: float, hi: float) -> None:
    """Truncated log-normal p(σ) on [lo, hi] (App. C): every draw inside, empirical CDF within KS distance."""
    n = 20_000
    s = ldb.EDM.sample(n, lo, hi, generator=gen(3)).double().sort().values
    assert float(s[0]) >= lo * (1 - 1e-6)
    assert float(s[-1]) <= hi * (1 + 1e-6)
    z = (s.log() - P_MEAN) / P_STD
    phi = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    truncated = (phi - cdf(lo)) / (cdf(hi) - cdf(lo))
    empirical = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = float(torch.maximum((empirical - truncated).abs(), (empirical - 1 / n - truncated).abs()).max())
    assert ks < 1.95 / math.sqrt(n) * 1.2  # the 0.1% critical value, with margin


@pytest.mark.parametrize("steps", [1, 2, 3, 6, 50])
def test_edm_inference_grid_is_equiprobable_in_the_truncated_cdf(steps: int) -> None:
    """Inference σ grid (App. H): descending, equally spaced in the truncated CDF, σ_max … σ_min."""
    got = ldb.EDM.inference_sigmas(steps).tolist()
    assert got == pytest.approx(edm_grid(steps), rel=1e-9)
    if steps == 3:
        assert got == pytest.approx([80.0, 0.301, 0.002], abs=5e-4)  # classification default, B=3
    if steps == 50:
        counts = [0, 0, 0]
        for s in got:
            counts[owner(s, edm_boundaries(3))] += 1
        assert counts == [17, 16, 17]  # ≈ 1/B each (the digest's "17/16/16" sums to 49)


@pytest.mark.parametrize("num_groups", [2, 3, 4])
def test_edm_group_routing(num_groups: int) -> None:
    """Routing (§3.1, Fig. 6): group 0 owns the highest σ; a σ on a boundary goes to the lower-noise group."""
    bounds = edm_boundaries(num_groups)
    package_bounds = ldb.EDM.boundaries(num_groups)
    levels = list(bounds)  # every boundary, ends included
    levels += [math.sqrt(lo * hi) for lo, hi in zip(bounds, bounds[1:])]  # interior points
    levels += [lo * 1.0001 for lo in bounds[:-1]] + [hi * 0.9999 for hi in bounds[1:]]
    got = ldb.EDM.group_of(torch.tensor(levels, dtype=torch.float64), package_bounds).tolist()
    assert got == [owner(x, bounds) for x in levels]
    # spelled out: the inner boundary b_1 belongs to the lowest-noise group B−1
    assert got[1] == num_groups - 1


def test_icdf_of_a_python_float_is_float64() -> None:
    """σ = exp(P_mean + P_std·Φ⁻¹(q)) of a plain float is computed in float64 (float32 would be off by ~1e-7)."""
    for q in (1e-6, 0.05, 0.3, 0.5, 0.77, 0.999999):
        got = ldb.EDM.icdf(q)
        assert got.dtype == torch.float64
        assert float(got) == pytest.approx(icdf(q), rel=1e-12)


def test_one_step_grid_is_sigma_max_in_float64() -> None:
    """A one-step inference grid is [σ_max], in float64 like every longer grid."""
    grid = ldb.EDM.inference_sigmas(1)
    assert grid.dtype == ldb.EDM.inference_sigmas(4).dtype == torch.float64
    assert grid.tolist() == [SIGMA_MAX]


def test_noise_schedule_is_the_papers() -> None:
    """Paper constants (App. E): P_mean −1.2, P_std 1.2, σ ∈ [0.002, 80], σ_data 0.5, label dropout 10%."""
    s = NoiseSchedule()
    assert (s.p_mean, s.p_std, s.sigma_min, s.sigma_max, s.sigma_data) == (P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, 0.5)
    e = ldb.EDM
    assert (e.p_mean, e.p_std, e.sigma_min, e.sigma_max, e.sigma_data) == (P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, 0.5)
    assert ImageGeneration().label_dropout == pytest.approx(0.1)  # 10% label dropout for CFG (App. E.2)
