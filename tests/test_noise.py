"""Noise math against the paper's numbers and the properties they imply."""

import math

import pytest
import torch

from lightning_diffusionblocks.noise import EDM, NoiseSchedule


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
