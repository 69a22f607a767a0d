"""Masked diffusion (MD4): the masking schedule (``masking.py``) and the MaskedLM task's formulas.

α(t) = 1 − t, ELBO weight 1/t, partition by equal drops of α, stratified masking times, the forward process (each
token masked with probability t), the ELBO integrand, the ancestral sampler and the bound's estimate. Expected
values come from ``tests/reference.py``, never from the package.
"""

from __future__ import annotations

import math

import pytest
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.masking import MaskingSchedule
from lightning_diffusionblocks.tasks import MaskedLM
from tests.fakes import FakeMaskedLM, Recorder
from tests.reference import T_MIN, close, cross_entropy, gen, masking_boundaries, owner


def test_masking_alpha_and_elbo_weight() -> None:
    """MD4 linear schedule α(t) = 1 − t and ELBO weight −α′(t)/(1 − α(t)) = 1/t (paper §5.3, App. D)."""
    t = torch.tensor([1e-4, 0.01, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    schedule = MaskingSchedule()
    close(schedule.alpha(t), 1 - t, rtol=1e-12)
    w = schedule.loss_weight(t)
    assert w.dtype == torch.float32
    close(w, 1 / t, rtol=1e-6)


@pytest.mark.parametrize("num_groups", [1, 2, 3, 4, 6])
def test_masking_boundaries_are_equal_alpha_drops(num_groups: int) -> None:
    """Masked-diffusion partition (§2.5): equal drops of α, t_b = b/B, t_0 = t_min."""
    got = MaskingSchedule().boundaries(num_groups).tolist()
    assert got == pytest.approx(masking_boundaries(num_groups), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("num_groups", [2, 3])
def test_masking_overlap_ranges(num_groups: int, gamma: float) -> None:
    """Masked-diffusion overlap: [t_lo − γ·w, t_hi + γ·w] with w = t_hi − t_lo, clamped to [t_min, 1]."""
    schedule = MaskingSchedule()
    bounds = masking_boundaries(num_groups)
    for g in range(num_groups):
        lo, hi = bounds[num_groups - 1 - g], bounds[num_groups - g]  # group 0 = most masked
        pad = gamma * (hi - lo)
        expected = (max(lo - pad, T_MIN), min(hi + pad, 1.0))
        assert schedule.group_range(schedule.boundaries(num_groups), g, gamma) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_masking_sampler_grid(steps: int) -> None:
    """Ancestral sampler's time grid: 1 = t_0 > t_1 > … > t_steps = 0 in equal steps."""
    got = MaskingSchedule().grid(steps).tolist()
    assert got == pytest.approx([1 - k / steps for k in range(steps + 1)], abs=1e-12)


def test_masking_sample_is_stratified() -> None:
    """Masking times: n draws on [lo, hi], exactly one in each 1/n slice (MD4's low-variance draw)."""
    n, lo, hi = 40, 0.2, 0.7
    t = MaskingSchedule().sample(n, lo, hi, generator=gen(5)).double().sort().values
    edges = torch.tensor([lo + k / n * (hi - lo) for k in range(n + 1)], dtype=torch.float64)
    assert bool((t >= edges[:-1] - 1e-6).all())
    assert bool((t <= edges[1:] + 1e-6).all())


@pytest.mark.parametrize("num_groups", [2, 3, 4])
def test_masking_group_routing(num_groups: int) -> None:
    """Routing of t (§2.5): group 0 owns the most-masked times; a t on a boundary goes to the less-masked group."""
    schedule = MaskingSchedule()
    bounds = masking_boundaries(num_groups)
    levels = [*bounds[1:], *[(lo + hi) / 2 for lo, hi in zip(bounds, bounds[1:])]]
    got = schedule.group_of(torch.tensor(levels, dtype=torch.float64), schedule.boundaries(num_groups)).tolist()
    assert got == [owner(x, bounds) for x in levels]


def test_masking_linear_partition_is_the_equiprobable_one() -> None:
    """For α(t) = 1 − t, equal steps of t are equal drops of α: both partitions give t_b = b/B (§2.5)."""
    schedule = MaskingSchedule()
    for num_groups in (1, 3, 5):
        expected = masking_boundaries(num_groups)
        assert schedule.boundaries(num_groups, "linear").tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    with pytest.raises(ValueError, match="has no meaning here. Use partition="):
        schedule.boundaries(3, "uniform_log")


def test_masking_sample_defaults_to_the_whole_range() -> None:
    """Masking times over [t_min, 1] by default: t = lo + (π_k + u_k)/n·(hi − lo), u ~ U(0,1) in float64, π a
    random permutation (one t per 1/n slice); float32 result."""
    n = 32
    got = MaskingSchedule().sample(n, generator=gen(6))
    assert got.dtype == torch.float32
    g = gen(6)
    u = torch.rand(n, dtype=torch.float64, generator=g)  # the draws the sampler makes, in its order
    order = torch.randperm(n, generator=g).double()
    expected = T_MIN + (order + u) / n * (1.0 - T_MIN)
    close(got, expected, rtol=1e-6, atol=0.0)


def test_masked_lm_loss_is_the_elbo_integrand() -> None:
    """MDM loss (App. D): (1/t)·Σ_masked CE / L per sequence; unmasked tokens stay, masked ones hold the mask id."""
    vocab, n, length = 6, 5, 30
    tokens = torch.randint(0, vocab, (n, length), generator=gen(0))
    t = torch.tensor([0.05, 0.2, 0.5, 0.8, 1.0])
    logits = torch.randn(n, length, vocab, generator=gen(1)) * 2
    run = Recorder(logits)
    task = MaskedLM(vocab)
    loss = task.loss(run, tokens, t, gen(3))
    args, kwargs = run.calls[0]
    noisy = args[0]
    close(kwargs.get("level", args[1] if len(args) > 1 else None), t, rtol=0.0, atol=0.0)
    masked = noisy != tokens
    assert not 0 <= task.mask_id < vocab
    assert bool((noisy[masked] == task.mask_id).all())
    assert bool(masked[-1].all())  # t = 1 masks everything
    expected = (cross_entropy(logits, tokens) * masked).sum(1) / t.double() / length
    close(loss, expected, rtol=1e-5)


def test_masked_lm_masks_each_token_with_probability_t() -> None:
    """MDM forward process: each token is masked independently with probability 1 − α(t) = t."""
    vocab, length = 5, 4000
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    tokens = torch.randint(0, vocab, (4, length), generator=gen(0))
    run = Recorder(torch.zeros(4, length, vocab))
    MaskedLM(vocab).loss(run, tokens, t, gen(1))
    frac = (run.calls[0][0][0] != tokens).double().mean(1)
    sd = (t.double() * (1 - t.double()) / length).sqrt()
    assert bool(((frac - t.double()).abs() < 5 * sd).all()), frac


def test_masked_lm_keeps_a_token_whose_draw_equals_t() -> None:
    """MDM forward process, exactly: a token is masked iff its uniform draw u < t (Bernoulli(t) by inverse CDF,
    P(masked) = t on the float32 grid of draws), so a token whose draw equals t stays visible."""
    vocab, n, length = 5, 3, 64
    tokens = torch.randint(0, vocab, (n, length), generator=gen(0))
    u = torch.rand(n, length, generator=gen(1))  # the masking draws: the generator's first
    rows, hits = torch.arange(n), torch.tensor([5, 17, 40])
    t = u[rows, hits]  # each sequence's t is one of its own draws
    run = Recorder(torch.zeros(n, length, vocab))
    task = MaskedLM(vocab)
    task.loss(run, tokens, t, gen(1))
    masked = run.calls[0][0][0] == task.mask_id
    assert torch.equal(masked, u < t.view(-1, 1))
    assert not bool(masked[rows, hits].any())


def test_masked_generation_reveals_with_probability_t_minus_s_over_t() -> None:
    """MDM ancestral sampler: from t to s every masked token is revealed with probability (t − s)/t."""
    vocab, num_groups, steps, n, length = 7, 2, 4, 150, 60
    net = FakeMaskedLM(vocab, num_groups)
    task = MaskedLM(vocab)
    module = ldb.DiffusionBlocksModule(net, task, num_blocks=num_groups)
    out = module.generate(num_samples=n, length=length, steps=steps, temperature=0.0, seed=2)
    grid, bounds = [1 - k / steps for k in range(steps + 1)], masking_boundaries(num_groups)
    assert len(net.calls) == steps
    states = [c["tokens"] for c in net.calls] + [out]
    assert bool((states[0] == task.mask_id).all())  # all masked at t = 1
    for k, call in enumerate(net.calls):
        t, s = grid[k], grid[k + 1]
        close(call["level"], torch.full((n,), t), rtol=1e-6, atol=0.0)
        assert call["group"] == owner(t, bounds)
        before, after = states[k], states[k + 1]
        was_masked = before == task.mask_id
        assert torch.equal(after[~was_masked], before[~was_masked])  # revealed tokens never change
        revealed = was_masked & (after != task.mask_id)
        proposal = ((torch.arange(length) + call["group"] + 1) % vocab).expand(n, length)
        assert torch.equal(after[revealed], proposal[revealed])
        p, m = (t - s) / t, int(was_masked.sum())
        frac = int(revealed.sum()) / m
        assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / m) + 1e-12, (k, frac, p)
    assert not bool((out == task.mask_id).any())


def test_masked_elbo_estimate() -> None:
    """MDM bound (App. D): nelbo = mean over stratified t of (1/t)·Σ_masked CE/L, each t routed; bits = nelbo/ln 2."""
    vocab, num_groups, samples, n, length = 6, 3, 6, 5, 12
    per_group = torch.randn(num_groups, vocab, generator=gen(0)) * 2
    net = FakeMaskedLM(vocab, num_groups, per_group)
    module = ldb.DiffusionBlocksModule(net, MaskedLM(vocab), num_blocks=num_groups)
    row = torch.randint(0, vocab, (length,), generator=gen(1))
    batch = row.expand(n, length).clone()  # identical sequences: every recorded row's target is known
    metrics = module.evaluate_batch(batch, samples=samples, seed=4)
    bounds, total, levels = masking_boundaries(num_groups), 0.0, []
    ce = cross_entropy(per_group.double()[:, None, :].expand(num_groups, length, vocab), row.expand(num_groups, length))
    for call in net.calls:
        t = call["level"].double()
        levels += t.tolist()
        assert all(owner(x, bounds) == call["group"] for x in t.tolist())
        masked = call["tokens"] != row
        total += float(((ce[call["group"]] * masked).sum(1) / t / length).sum())
    assert len(levels) == n * samples
    width = (1 - T_MIN) / samples
    strata = sorted(int((x - T_MIN) / width) for x in levels)
    assert strata == [k for k in range(samples) for _ in range(n)]  # n masking times per 1/samples slice
    assert float(metrics["nelbo"].mean()) == pytest.approx(total / (n * samples), rel=1e-5)
    close(metrics["bits_per_token"], metrics["nelbo"] / math.log(2), rtol=1e-6)


def test_masking_three_groups_partition_overlap_and_routing() -> None:
    s = MaskingSchedule()
    b = s.boundaries(3)
    assert b[1:].tolist() == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert s.group_range(b, 0) == pytest.approx((2 / 3, 1.0))  # group 0 = most masked
    lo, hi = s.group_range(b, 1, gamma=0.05)
    assert (lo, hi) == pytest.approx((1 / 3 - 0.05 / 3, 2 / 3 + 0.05 / 3))
    assert s.group_of(torch.tensor([0.9, 2 / 3, 0.5, 0.01], dtype=torch.float64), b).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="equal drops of alpha"):
        s.boundaries(3, "uniform_log")


def test_masking_sample_is_stratified_inside_range() -> None:
    s = MaskingSchedule()
    t = s.sample(300, 0.2, 0.5, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.2
    assert float(t.max()) <= 0.5
    counts = torch.histc(t, bins=3, min=0.2, max=0.5)
    assert counts.tolist() == [100, 100, 100]
    assert s.grid(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
