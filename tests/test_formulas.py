"""Every formula of DiffusionBlocks (arXiv 2506.14202) that a task uses, pinned by a fast test.

Expected values are computed HERE from the paper's equations, with plain ``math``/``torch`` and the standard
library's ``statistics.NormalDist``; the package's helpers are only ever the thing under test. Tasks are
driven through their public ``loss(run, batch, sigma, generator)`` with fake networks that record what they
receive and return known outputs; inference goes through the module's public calls with tiny networks whose
blocks are known scalings, so the group that ran is visible in the output (routing is checked for free).

Constants (paper App. E): log σ ~ N(P_mean, P_std²) truncated to [σ_min, σ_max], σ_data = 0.5, and EDM's
c_skip = σd²/(σ²+σd²), c_out = σσd/√(σ²+σd²), c_in = 1/√(σ²+σd²), c_noise = ¼ ln σ, λ(σ) = (σ²+σd²)/(σσd)².
"""

from __future__ import annotations

import inspect
import math
import re
from statistics import NormalDist
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.masking import MaskingSchedule
from lightning_diffusionblocks.noise import NoiseSchedule
from lightning_diffusionblocks.sampling import classifier_free_guidance, ddim_step, euler_sample, flow_euler_step
from lightning_diffusionblocks.tasks import AutoregressiveLM, Classification, FlowMatching, ImageGeneration, MaskedLM
from lightning_diffusionblocks.tasks.base import Task
from lightning_diffusionblocks.tasks.flow_matching import EXPECTED_CALL as FLOW_CALL
from lightning_diffusionblocks.tasks.image_generation import EXPECTED_CALL, CallConvention

P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = -1.2, 1.2, 0.002, 80.0, 0.5
T_MIN = 1e-4  # MaskingSchedule's default lower end of t (keeps the 1/t weight finite)
NORMAL = NormalDist()

# ============================================================================ the paper's equations, here


def cdf(sigma: float) -> float:
    """Φ((ln σ − P_mean)/P_std)."""
    return NORMAL.cdf((math.log(sigma) - P_MEAN) / P_STD)


def icdf(q: float) -> float:
    """σ = exp(P_mean + P_std·Φ⁻¹(q))."""
    return math.exp(P_MEAN + P_STD * NORMAL.inv_cdf(q))


Q_MIN, Q_MAX = cdf(SIGMA_MIN), cdf(SIGMA_MAX)


def edm_boundaries(num_groups: int) -> list[float]:
    """Ascending σ_min = b_0 < … < b_B = σ_max at equal steps of the truncated CDF (paper §3.3)."""
    inner = [icdf(Q_MIN + b / num_groups * (Q_MAX - Q_MIN)) for b in range(1, num_groups)]
    return [SIGMA_MIN, *inner, SIGMA_MAX]


def edm_grid(steps: int) -> list[float]:
    """Descending inference σ grid, equally spaced in the truncated CDF, both ends included (App. H)."""
    if steps == 1:
        return [SIGMA_MAX]
    inner = [icdf(Q_MAX - k / (steps - 1) * (Q_MAX - Q_MIN)) for k in range(1, steps - 1)]
    return [SIGMA_MAX, *inner, SIGMA_MIN]


def coefficients(sigma: float) -> tuple[float, float, float, float]:
    """EDM (c_skip, c_out, c_in, c_noise)."""
    sd2 = SIGMA_DATA**2
    root = math.sqrt(sigma**2 + sd2)
    return sd2 / (sigma**2 + sd2), sigma * SIGMA_DATA / root, 1 / root, math.log(sigma) / 4


def coefficient_tensors(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same four, per sample, float64."""
    s = sigma.double()
    sd2 = SIGMA_DATA**2
    return sd2 / (s**2 + sd2), s * SIGMA_DATA / (s**2 + sd2).sqrt(), 1 / (s**2 + sd2).sqrt(), s.log() / 4


def weight(sigma: Tensor) -> Tensor:
    """λ(σ) = (σ² + σd²)/(σ·σd)², float64."""
    s = sigma.double()
    return (s**2 + SIGMA_DATA**2) / (s * SIGMA_DATA) ** 2


def owner(level: float, ascending: list[float]) -> int:
    """Group owning ``level`` (0 = highest noise); a level on a boundary goes to the lower-noise group."""
    below = sum(1 for b in ascending[1:-1] if b < level)
    return len(ascending) - 2 - below


def masking_boundaries(num_groups: int) -> list[float]:
    """Equal drops of α(t) = 1 − t: t_b = b/B (paper §2.5), with t_0 = t_min."""
    return [T_MIN, *[b / num_groups for b in range(1, num_groups + 1)]]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """−log softmax(logits)[target], float64, over the last axis."""
    logits = logits.double()
    return logits.logsumexp(-1) - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)


def layer_norm(h: Tensor, eps: float = 1e-6) -> Tensor:
    """Non-affine LayerNorm over the last axis."""
    h = h.double()
    mean = h.mean(-1, keepdim=True)
    var = h.var(-1, unbiased=False, keepdim=True)
    return (h - mean) / (var + eps).sqrt()


def close(actual: Tensor, expected: Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ============================================================================ EDM noise schedule


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
def test_equiprobable_boundaries(num_groups: int) -> None:
    """Equi-probability partitioning σ_b = exp(P_mean + P_std·Φ⁻¹(q_b)), q_b equally spaced (§3.3)."""
    got = ldb.EDM.boundaries(num_groups).tolist()
    expected = edm_boundaries(num_groups)
    assert got == pytest.approx(expected, rel=1e-9)
    masses = [(cdf(hi) - cdf(lo)) / (Q_MAX - Q_MIN) for lo, hi in zip(got, got[1:])]
    assert masses == pytest.approx([1 / num_groups] * num_groups, abs=1e-9)
    if num_groups == 3:
        assert got[1:3] == pytest.approx([0.1796, 0.5050], abs=5e-5)


@pytest.mark.parametrize("num_groups", [2, 3, 5])
def test_uniform_log_and_linear_boundaries(num_groups: int) -> None:
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
def test_overlap_ranges(num_groups: int, gamma: float) -> None:
    """Overlap (App. C): block [lo, hi] trains on [lo/α, hi·α], α = (hi/lo)^γ, clamped to [σ_min, σ_max]."""
    bounds = edm_boundaries(num_groups)
    package_bounds = ldb.EDM.boundaries(num_groups)
    for g in range(num_groups):
        lo, hi = bounds[num_groups - 1 - g], bounds[num_groups - g]  # group 0 = highest noise
        alpha = (hi / lo) ** gamma
        expected = (max(lo / alpha, SIGMA_MIN), min(hi * alpha, SIGMA_MAX))
        assert ldb.EDM.group_range(package_bounds, g, gamma) == pytest.approx(expected, rel=1e-9)


def test_overlap_ranges_match_the_papers_numbers() -> None:
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
def test_inference_grid_is_equiprobable(steps: int) -> None:
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


# ============================================================================ masking schedule (MD4)


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


# ============================================================================ task losses (public loss())


class Recorder:
    """A fake network: records every call and returns a fixed output (the embedding table when asked)."""

    def __init__(self, output: Tensor, table: Tensor | None = None) -> None:
        self.output, self.table = output, table
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if kwargs.get("mode") == "embeddings":
            assert self.table is not None
            return self.table.clone()
        self.calls.append((args, kwargs))
        return self.output.clone()


def labels_in_call(args: tuple, kwargs: dict) -> Tensor | None:
    """The class labels a call passed (third positional argument, or an integer-tensor keyword)."""
    if len(args) > 2:
        return args[2]
    ints = [v for v in kwargs.values() if isinstance(v, Tensor) and not v.is_floating_point()]
    return ints[0] if ints else None


def test_image_generation_loss() -> None:
    """EDM denoiser loss (Eq. 6, L2): F(c_in·z, c_noise), D = c_skip·z + c_out·F, λ(σ)·mean((D − y)²) per sample."""
    n, shape = 7, (1, 2, 3)
    images = torch.rand(n, *shape, generator=gen(0)) * 2 - 1
    sigma = torch.tensor([0.002, 0.02, 0.15, 0.5, 1.3, 9.0, 80.0])
    net_out = torch.randn(n, *shape, generator=gen(1))
    run = Recorder(net_out)
    loss = ImageGeneration(label_dropout=0.0).loss(run, images, sigma, gen(42))
    eps = torch.randn(images.shape, generator=gen(42)).double()  # no labels: the only draw is ε
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in coefficient_tensors(sigma))
    z = images.double() + sigma.double().view(-1, 1, 1, 1) * eps
    assert len(run.calls) == 1
    args, _ = run.calls[0]
    close(args[0], c_in * z, rtol=1e-5, atol=1e-7)  # the network sees c_in·z
    close(args[1].view(-1), c_noise.view(-1), rtol=1e-6)  # and c_noise = ¼ ln σ
    denoised = c_skip * z + c_out * net_out.double()
    expected = weight(sigma) * (denoised - images.double()).pow(2).flatten(1).mean(1)
    assert loss.shape == (n,)
    close(loss, expected, rtol=1e-3, atol=0.0)


def test_image_generation_label_dropout_uses_the_null_label() -> None:
    """CFG training (App. E.2): a share p of labels is replaced by the null label, the rest left unchanged."""
    n, p, num_classes = 4000, 0.3, 10
    labels = torch.arange(n) % num_classes
    task = ImageGeneration(label_dropout=p)
    run = Recorder(torch.zeros(n, 1, 1, 1))
    task.loss(run, (torch.zeros(n, 1, 1, 1), labels), torch.ones(n), gen(0))
    seen = labels_in_call(*run.calls[0])
    assert seen is not None
    dropped = seen != labels
    frac = float(dropped.float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    nulls = seen[dropped].unique().tolist()
    assert len(nulls) == 1  # one null label
    documented = getattr(task, "null_label", None)
    assert nulls[0] == documented if documented is not None else not 0 <= nulls[0] < num_classes


@pytest.mark.parametrize("weighting", ["per_sample", "batch_mean", "none"])
def test_classification_loss(weighting: str) -> None:
    """Classification (App. C): y = Ê[label] (normalised rows), z = y + σε, CE weighted by λ(σ) / mean λ / 1."""
    n, dim, num_classes = 6, 5, 4
    table = F.normalize(torch.randn(num_classes, dim, generator=gen(0)), dim=-1)
    labels = torch.tensor([0, 3, 1, 2, 2, 0])
    inputs = torch.randn(n, 3, generator=gen(1))
    sigma = torch.tensor([0.002, 0.05, 0.3, 1.0, 7.0, 80.0])
    logits = torch.randn(n, num_classes, generator=gen(2)) * 3
    run = Recorder(logits, table)
    loss = Classification(num_classes, weighting=weighting).loss(run, (inputs, labels), sigma, gen(9))
    eps = torch.randn(n, dim, generator=gen(9)).double()
    assert len(run.calls) == 1
    args, kwargs = run.calls[0]
    assert torch.equal(args[0], inputs)
    close(args[1], table[labels].double() + sigma.double().view(-1, 1) * eps, rtol=1e-5, atol=1e-6)
    close(args[2], sigma, rtol=0.0, atol=0.0)
    ce = cross_entropy(logits, labels)
    scale = {"per_sample": weight(sigma), "batch_mean": weight(sigma).mean(), "none": torch.tensor(1.0)}[weighting]
    close(loss, scale * ce, rtol=1e-5)


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


def test_autoregressive_lm_loss() -> None:
    """AR (§5.4, App. B): targets Ê[x_i] (normalised rows), z = Ê[x] + σε, λ(σ)·mean_i CE_i per sequence."""
    vocab, dim, n, length = 7, 4, 5, 6
    table = F.normalize(torch.randn(vocab, dim, generator=gen(0)), dim=-1)
    tokens = torch.randint(0, vocab, (n, length), generator=gen(1))
    sigma = torch.tensor([0.002, 0.1, 0.6, 4.0, 80.0])
    logits = torch.randn(n, length, vocab, generator=gen(2)) * 2
    run = Recorder(logits, table)
    loss = AutoregressiveLM(vocab).loss(run, tokens, sigma, gen(11))
    eps = torch.randn(n, length, dim, generator=gen(11)).double()
    args, kwargs = run.calls[0]
    assert torch.equal(args[0], tokens)
    close(args[1], table[tokens].double() + sigma.double().view(-1, 1, 1) * eps, rtol=1e-5, atol=1e-6)
    close(kwargs["level"], sigma, rtol=0.0, atol=0.0)
    expected = weight(sigma) * cross_entropy(logits, tokens).mean(1)
    close(loss, expected, rtol=1e-5)


# ============================================================================ preconditioning inside the models


class TokenBackbone(nn.Module):
    """A plain backbone: tokens in, identity blocks, tokens out (so the stack output is known)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Identity() for _ in range(depth))

    def forward_features(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def randomise(*layers: nn.Linear, seed: int = 0) -> None:
    g = gen(seed)
    for layer in layers:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.5)
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=g) * 0.5)


def test_label_and_token_embeddings_are_l2_normalised() -> None:
    """Discrete targets (App. C, Dieleman et al.): the embeddings diffused and bridged are Ê = E/‖E‖ per row."""
    adapter = ldb.models.ConditioningAdapter(TokenBackbone(2), num_classes=5, dim=8)
    raw = adapter.label_embed.weight.detach().double()
    close(adapter(mode="embeddings"), raw / raw.norm(dim=-1, keepdim=True), rtol=1e-6)
    lm = ldb.models.TransformerLM(9, "autoregressive", dim=8, depth=2, heads=2, context_length=8)
    table = lm.target_table.detach().double()
    assert float((table.norm(dim=-1) - 1).abs().max()) > 0.5  # the raw table is far from unit norm: normalising matters
    close(lm(mode="embeddings"), table / table.norm(dim=-1, keepdim=True), rtol=1e-6)


ADAPTER_LAYOUTS = inspect.signature(ldb.models.ConditioningAdapter).parameters.get("layout")


@pytest.mark.parametrize("layout", ["token", "additive"])
def test_conditioning_adapter_readout(layout: str) -> None:
    """Classifier readout (official ViT code): stack gets c_in·z, c_noise = ¼ ln σ, D = c_out·norm(h) + c_skip·z."""
    if ADAPTER_LAYOUTS is None and layout != "token":
        pytest.skip("this ConditioningAdapter has only the token layout")
    dim, n, tokens, num_classes = 8, 5, 3, 4
    kwargs = {} if ADAPTER_LAYOUTS is None else {"layout": layout}
    adapter = ldb.models.ConditioningAdapter(TokenBackbone(2), num_classes=num_classes, dim=dim, **kwargs)
    randomise(adapter.final_ada, adapter.head)
    with torch.no_grad():
        if layout == "token":
            adapter.target_pos.copy_(torch.randn(1, 1, dim, generator=gen(1)))
        else:
            adapter.target_proj.weight.copy_(torch.randn(dim, dim, generator=gen(1)))
    seen: dict[str, Tensor] = {}
    adapter.noise_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("c_noise", a[0].detach().clone()))
    adapter.backbone.blocks[0].register_forward_pre_hook(
        lambda m, a: seen.setdefault("stack_in", a[0].detach().clone())
    )
    inputs = torch.randn(n, tokens, dim, generator=gen(2))
    z = torch.randn(n, dim, generator=gen(3)) * 2
    sigma = torch.tensor([0.002, 0.2, 0.5, 3.0, 80.0])
    logits = adapter(inputs, z, sigma)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1) for c in coefficient_tensors(sigma))
    close(seen["c_noise"], c_noise.view(-1), rtol=1e-6)
    target = c_in * z.double()  # the preconditioned noisy target
    if layout == "token":  # prepended as token 0 (+ its position); blocks are identities, so h = that token
        h = target + adapter.target_pos.detach().double()[0]
        close(seen["stack_in"][:, 0], h, rtol=1e-5, atol=1e-6)
        close(seen["stack_in"][:, 1:], inputs, rtol=0.0, atol=0.0)
    else:  # projected and added to every token; the readout is the mean token
        added = inputs.double() + (target @ adapter.target_proj.weight.double().T)[:, None, :]
        close(seen["stack_in"], added, rtol=1e-5, atol=1e-5)
        h = added.mean(1)
    denoised = c_out * layer_norm(h) + c_skip * z.double()
    with torch.no_grad():
        c = adapter.noise_embed(c_noise.view(-1).float()).double()
    shift, scale = (F.silu(c) @ adapter.final_ada.weight.double().T + adapter.final_ada.bias.double()).chunk(2, -1)
    expected = (denoised * (1 + scale) + shift) @ adapter.head.weight.double().T + adapter.head.bias.double()
    close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "next"])
def test_transformer_lm_autoregressive_preconditioning(mode: str) -> None:
    """AR LM (§1.7, App. B): token c_in·z, c_noise = ¼ ln σ to the noise embedding, D = c_out·norm(h) + c_skip·z."""
    vocab, dim, n, length = 9, 8, 4, 5
    net = ldb.models.TransformerLM(vocab, "autoregressive", dim=dim, depth=2, heads=2, context_length=8)
    randomise(net.final_ada, net.head)
    tokens = torch.randint(0, vocab, (n, length), generator=gen(1))
    width = length if mode == "train" else 1
    z = torch.randn(n, width, dim, generator=gen(2))
    sigma = torch.tensor([0.002, 0.3, 2.0, 80.0])
    stack_out = torch.randn(n, length + width, dim, generator=gen(3)) * 2
    seen: dict[str, Tensor] = {}

    def fake_stack(h: Tensor, allowed: Tensor | None, positions: Tensor, c: Tensor) -> Tensor:
        seen["h"] = h.detach().clone()
        return stack_out.clone()

    net.run_stack = fake_stack  # type: ignore[method-assign]
    net.noise_embed.register_forward_pre_hook(lambda m, a: seen.setdefault("c_noise", a[0].detach().clone()))
    logits = net(tokens, z, level=sigma, sigma_data=SIGMA_DATA, mode=mode)
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1) for c in coefficient_tensors(sigma))
    close(seen["c_noise"], c_noise.view(-1), rtol=1e-6)
    close(seen["h"][:, length:], c_in * z.double() + net.noisy_type.detach().double(), rtol=1e-5, atol=1e-6)
    denoised = c_out * layer_norm(stack_out[:, length:]) + c_skip * z.double()
    with torch.no_grad():
        c = net.noise_embed(c_noise.view(-1).float()).double()
    shift, scale = (F.silu(c) @ net.final_ada.weight.double().T + net.final_ada.bias.double()).chunk(2, -1)
    expected = (denoised * (1 + scale[:, None]) + shift[:, None]) @ net.head.weight.double().T + net.head.bias.double()
    close(logits, expected, rtol=1e-4, atol=1e-5)


# ============================================================================ inference through the module

FACTORS = (0.5, -0.25, 1.5)  # group g's single block multiplies by FACTORS[g]: the output shows who ran


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: Tensor) -> Tensor:
        return x * self.factor


class Tag(nn.Module):
    """Adds index+1: with one block per group, the stack output names the group that ran."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        return x + (self.index + 1)


def label_term(labels: Tensor | None, num_classes: int) -> Tensor:
    """label + 1 for a real class, 0 for anything else (whatever the null convention)."""
    if labels is None:
        return torch.zeros(1)
    return torch.where((labels >= 0) & (labels < num_classes), labels + 1, 0).double()


COND = 0.7


class FakeDenoiser(nn.Module):
    """F(x, c_noise, labels) = s_g·x + COND·(label + 1): s_g from the group's block, 0 for the null label."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.num_classes = num_classes
        self.calls: list[dict[str, Any]] = []

    def forward(self, x: Tensor, c_noise: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        labels = labels_in_call((x, c_noise, *args), kwargs)
        self.calls.append({"x": x.clone(), "c_noise": c_noise.clone(), "labels": labels})
        h = x
        for block in self.blocks:
            h = block(h)
        extra = label_term(labels, self.num_classes).float().view(-1, *([1] * (x.ndim - 1)))
        return h + COND * extra


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


class FakeClassifier(nn.Module):
    """logits = s_g·z·W + x·P; ``mode="embeddings"`` gives the normalised table Ê."""

    def __init__(self, num_classes: int = 5, dim: int = 6, in_dim: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.table = F.normalize(torch.randn(num_classes, dim, generator=gen(0)), dim=-1)
        self.w = torch.randn(dim, num_classes, generator=gen(1)) * 2
        self.p = torch.randn(in_dim, num_classes, generator=gen(2))
        self.calls: list[dict[str, Tensor]] = []

    def forward(
        self, inputs: Tensor | None = None, z: Tensor | None = None, sigma: Tensor | None = None,
        sigma_data: float = 0.5, mode: str = "logits",
    ) -> Tensor:  # fmt: skip
        if mode == "embeddings":
            return self.table.clone()
        assert inputs is not None
        assert z is not None
        assert sigma is not None
        self.calls.append({"z": z.clone(), "sigma": sigma.clone()})
        h = z
        for block in self.blocks:
            h = block(h)
        return h @ self.w + inputs @ self.p


@pytest.mark.parametrize("steps", [None, 6])
def test_classification_bridge(steps: int | None) -> None:
    """Classification inference (App. C/H): D̂ = softmax(logits)·Ê (the same Ê), Euler step; last softmax returned."""
    net = FakeClassifier()
    module = ldb.DiffusionBlocksModule(net, Classification(5), num_blocks=3)
    inputs = torch.randn(16, 3, generator=gen(4))
    probs = module.predict_proba(inputs, steps=steps, seed=1)
    sigmas = edm_grid(steps or 3)  # default: B steps
    assert len(net.calls) == len(sigmas)
    z = net.calls[0]["z"].double()
    assert 0.75 * SIGMA_MAX < float(z.std()) < 1.25 * SIGMA_MAX  # z_0 ~ N(0, σ_max²)
    table, bounds, p = net.table.double(), edm_boundaries(3), None
    for i, (call, s) in enumerate(zip(net.calls, sigmas)):
        close(call["z"], z, rtol=1e-4, atol=1e-5)
        close(call["sigma"], torch.full((16,), s), rtol=1e-6, atol=0.0)
        logits = FACTORS[owner(s, bounds)] * z @ net.w.double() + inputs.double() @ net.p.double()
        p = logits.softmax(-1)
        if i + 1 < len(sigmas):
            z = z + (sigmas[i + 1] - s) * (z - p @ table) / s
    assert p is not None
    close(probs, p, rtol=1e-4, atol=1e-6)


class FakeMaskedLM(nn.Module):
    """Proposes token (position + g + 1) mod V with certainty, g = the group whose block ran."""

    def __init__(self, vocab: int, num_groups: int, per_group: Tensor | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Tag(g) for g in range(num_groups))
        self.vocab = vocab
        self.per_group = per_group  # optional (B, V) logits added per group
        self.calls: list[dict[str, Any]] = []

    def forward(self, tokens: Tensor, level: Tensor | None = None, **kwargs: Any) -> Tensor:
        n, length = tokens.shape
        h = torch.zeros(n, length, 1)
        for block in self.blocks:
            h = block(h)
        group = int(h[0, 0, 0]) - 1
        self.calls.append({"tokens": tokens.clone(), "level": level.clone(), "group": group})
        if self.per_group is not None:
            return self.per_group[group].expand(n, length, self.vocab).clone()
        proposal = (torch.arange(length) + group + 1) % self.vocab
        return F.one_hot(proposal, self.vocab).float().expand(n, length, self.vocab) * 30


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


KAPPA = 4.0


class FakeARLM(nn.Module):
    """logits = κ·s_g·z·Êᵀ (+ bias[last context token] when generating); ``mode="embeddings"`` gives Ê."""

    def __init__(self, vocab: int = 7, dim: int = 5, context_length: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.context_length = context_length
        self.table = F.normalize(torch.randn(vocab, dim, generator=gen(0)), dim=-1)
        self.bias = torch.randn(vocab, vocab, generator=gen(1)) * 2
        self.calls: list[dict[str, Any]] = []

    def forward(
        self, tokens: Tensor | None = None, z: Tensor | None = None, level: Tensor | None = None,
        sigma_data: float = 0.5, mode: str = "train",
    ) -> Tensor:  # fmt: skip
        if mode == "embeddings":
            return self.table.clone()
        assert tokens is not None
        assert z is not None
        assert level is not None
        self.calls.append({"tokens": tokens.clone(), "z": z.clone(), "level": level.clone(), "mode": mode})
        h = z
        for block in self.blocks:
            h = block(h)
        logits = KAPPA * h @ self.table.T
        return logits + self.bias[tokens[:, -1]][:, None, :] if mode == "next" else logits


def ar_logits(net: FakeARLM, z: Tensor, sigma: float, last: Tensor | None) -> Tensor:
    logits = KAPPA * FACTORS[owner(sigma, edm_boundaries(3))] * z @ net.table.double().T
    return logits if last is None else logits + net.bias.double()[last][:, None, :]


@pytest.mark.parametrize("steps", [None, 5])
def test_autoregressive_generation_chain(steps: int | None) -> None:
    """AR generation (§5.4): per token z_0 ~ N(0, σ_max²), routed Euler toward softmax(logits)·Ê, greedy last logits."""
    net = FakeARLM()
    module = ldb.DiffusionBlocksModule(net, AutoregressiveLM(7), num_blocks=3)
    prompt = torch.tensor([[1, 4], [2, 2], [6, 0]])
    new = 4
    out = module.generate(prompt, steps=steps, max_new_tokens=new, seed=5)
    sigmas = edm_grid(steps or 3)  # default: B steps
    assert len(net.calls) == new * len(sigmas)
    x, table, starts = prompt.clone(), net.table.double(), []
    for i in range(new):
        chain = net.calls[i * len(sigmas) : (i + 1) * len(sigmas)]
        z = chain[0]["z"].double()
        starts.append(z)
        logits = None
        for k, (call, s) in enumerate(zip(chain, sigmas)):
            assert call["mode"] == "next"
            assert torch.equal(call["tokens"], x)
            close(call["z"], z, rtol=1e-4, atol=1e-5)
            close(call["level"], torch.full((3,), s), rtol=1e-6, atol=0.0)
            logits = ar_logits(net, z, s, x[:, -1])
            if k + 1 < len(sigmas):
                z = z + (sigmas[k + 1] - s) * (z - logits.softmax(-1) @ table) / s
        assert logits is not None
        x = torch.cat([x, logits[:, 0].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, x)
    spread = float(torch.cat(starts).std())
    assert 0.7 * SIGMA_MAX < spread < 1.3 * SIGMA_MAX


def test_autoregressive_evaluation_chain() -> None:
    """AR evaluation: teacher-forced CE of the σ_max logits and of the chain's last logits (routed Euler), and the
    greedy accuracy after every step of the chain."""
    net = FakeARLM()
    module = ldb.DiffusionBlocksModule(net, AutoregressiveLM(7), num_blocks=3)
    tokens = torch.randint(0, 7, (4, 6), generator=gen(2))
    metrics = module.evaluate_batch(tokens, steps=3, seed=0)
    sigmas, table = edm_grid(3), net.table.double()
    assert len(net.calls) == 3
    assert sorted(k for k in metrics if k.startswith("accuracy_step_")) == [f"accuracy_step_{k}" for k in range(3)]
    z = net.calls[0]["z"].double()
    first = last = None
    for k, (call, s) in enumerate(zip(net.calls, sigmas)):
        close(call["z"], z, rtol=1e-4, atol=1e-5)
        last = ar_logits(net, z, s, None)
        first = last if first is None else first
        close(metrics[f"accuracy_step_{k}"], (last.argmax(-1) == tokens).double().mean(1), rtol=0.0, atol=1e-6)
        if k + 1 < len(sigmas):
            z = z + (sigmas[k + 1] - s) * (z - last.softmax(-1) @ table) / s
    assert first is not None
    assert last is not None
    close(metrics["ce_sigma_max"], cross_entropy(first, tokens).mean(1), rtol=1e-4)
    close(metrics["ce_chain"], cross_entropy(last, tokens).mean(1), rtol=1e-4)
    close(metrics["accuracy_chain"], (last.argmax(-1) == tokens).double().mean(1), rtol=0.0, atol=1e-6)


def test_noise_schedule_is_the_papers() -> None:
    """Paper constants (App. E): P_mean −1.2, P_std 1.2, σ ∈ [0.002, 80], σ_data 0.5, label dropout 10%."""
    s = NoiseSchedule()
    assert (s.p_mean, s.p_std, s.sigma_min, s.sigma_max, s.sigma_data) == (P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, 0.5)
    e = ldb.EDM
    assert (e.p_mean, e.p_std, e.sigma_min, e.sigma_max, e.sigma_data) == (P_MEAN, P_STD, SIGMA_MIN, SIGMA_MAX, 0.5)
    assert ImageGeneration().label_dropout == pytest.approx(0.1)  # 10% label dropout for CFG (App. E.2)


# ============================================================================ pinned by mutation testing (mutmut)
# Each test below kills mutants that survived `mutmut run` over noise.py, sampling.py, masking.py and tasks/
# (BENCHMARKS.md, "Mutation testing — mutmut"): formulas the tests above reach only in one configuration.


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


def test_flow_euler_step() -> None:
    """Euler step of the flow ODE dz/dt = v from t to t_next: z + (t_next − t)·v."""
    z = torch.randn(4, 3, generator=gen(0))
    v = torch.randn(4, 3, generator=gen(1))
    for t, t_next in ((1.0, 0.75), (0.6, 0.2), (0.3, 0.0)):
        close(flow_euler_step(z, v, t, t_next), z.double() + (t_next - t) * v.double(), rtol=1e-6, atol=1e-7)


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


def test_image_generation_keeps_the_data_dtype() -> None:
    """The network sees c_in·z in the data's dtype (bf16 data stays bf16: z = y + σε is formed in it)."""
    n = 3
    images = (torch.rand(n, 1, 2, 2, generator=gen(0)) * 2 - 1).to(torch.bfloat16)
    run = Recorder(torch.zeros(n, 1, 2, 2))
    ImageGeneration(label_dropout=0.0).loss(run, images, torch.tensor([0.1, 1.0, 10.0]), gen(1))
    assert run.calls[0][0][0].dtype == torch.bfloat16


def test_image_generation_without_label_dropout_keeps_labels_and_draws_only_eps() -> None:
    """label_dropout = 0: labels reach the network unchanged and ε is the generator's first draw."""
    n, shape = 5, (1, 2, 2)
    images = torch.rand(n, *shape, generator=gen(0)) * 2 - 1
    labels = torch.tensor([3, 0, 1, 2, 1])
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 40.0])
    run = Recorder(torch.zeros(n, *shape))
    ImageGeneration(label_dropout=0.0).loss(run, (images, labels), sigma, gen(42))
    args, kwargs = run.calls[0]
    seen = labels_in_call(args, kwargs)
    assert seen is not None
    assert torch.equal(seen, labels)
    eps = torch.randn(images.shape, generator=gen(42)).double()
    c_in = coefficient_tensors(sigma)[2].view(-1, 1, 1, 1)
    close(args[0], c_in * (images.double() + sigma.double().view(-1, 1, 1, 1) * eps), rtol=1e-5, atol=1e-7)


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


@pytest.mark.parametrize("weighting", ["per_sample", "batch_mean", "none"])
def test_bridges_use_the_schedules_sigma_data(weighting: str) -> None:
    """Classification and AR pass the schedule's σ_d to the network and weight by λ(σ) = (σ² + σ_d²)/(σσ_d)²."""
    sigma_data = 0.8
    schedule = NoiseSchedule(sigma_data=sigma_data)
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0])
    lam = (sigma.double() ** 2 + sigma_data**2) / (sigma.double() * sigma_data) ** 2
    scale = {"per_sample": lam, "batch_mean": lam.mean(), "none": torch.tensor(1.0, dtype=torch.float64)}[weighting]
    n, num_classes, dim = 4, 3, 5
    table = F.normalize(torch.randn(num_classes, dim, generator=gen(0)), dim=-1)
    labels = torch.tensor([2, 0, 1, 1])
    logits = torch.randn(n, num_classes, generator=gen(1)) * 2
    run = Recorder(logits, table)
    task = Classification(num_classes, noise=schedule, weighting=weighting)  # type: ignore[arg-type]
    loss = task.loss(run, (torch.randn(n, 2, generator=gen(2)), labels), sigma, gen(3))
    assert run.calls[0][1]["sigma_data"] == sigma_data
    close(loss, scale * cross_entropy(logits, labels), rtol=1e-5)
    tokens = torch.randint(0, num_classes, (n, 6), generator=gen(4))
    ar_out = torch.randn(n, 6, num_classes, generator=gen(5)) * 2
    run = Recorder(ar_out, table)
    loss = AutoregressiveLM(num_classes, noise=schedule, weighting=weighting).loss(run, tokens, sigma, gen(6))  # type: ignore[arg-type]
    assert run.calls[0][1]["sigma_data"] == sigma_data
    close(loss, scale * cross_entropy(ar_out, tokens).mean(1), rtol=1e-5)


def bridge_probs(net: FakeClassifier, inputs: Tensor, z0: Tensor, sigmas: list[float]) -> Tensor:
    """The classification bridge (App. C/H) from z_0: routed logits, D̂ = softmax·Ê, Euler; the last softmax."""
    z, table, bounds, p = z0.double(), net.table.double(), edm_boundaries(3), None
    for i, s in enumerate(sigmas):
        p = (FACTORS[owner(s, bounds)] * z @ net.w.double() + inputs.double() @ net.p.double()).softmax(-1)
        if i + 1 < len(sigmas):
            z = z + (sigmas[i + 1] - s) * (z - p @ table) / s
    assert p is not None
    return p


def test_classification_accuracy_and_prediction_use_the_batch_index_as_seed() -> None:
    """Validation accuracy = mean(argmax of the bridge's last softmax == label), its noise seeded by the batch
    index; predict_step returns the same probabilities for `inputs`, `(inputs,)` and `(inputs, labels)` batches."""
    net = FakeClassifier()
    module = ldb.DiffusionBlocksModule(net, Classification(5), num_blocks=3)
    task, router = module.task, module.router()
    n = 8
    inputs = torch.randn(n, 3, generator=gen(4))
    task.predict_proba(router, inputs, seed=3)
    reference_z0 = net.calls[0]["z"].clone()
    predicted = bridge_probs(net, inputs, reference_z0, edm_grid(3)).argmax(-1)
    labels = predicted.clone()
    labels[:2] = (labels[:2] + 1) % 5  # 6 of 8 right
    net.calls.clear()
    acc = task.validation_metrics(router, (inputs, labels), 3)["acc"]
    close(net.calls[0]["z"], reference_z0, rtol=0.0, atol=0.0)  # the noise of seed = batch index
    assert float(acc) == pytest.approx(0.75)
    for batch in (inputs, (inputs,), (inputs, labels)):
        net.calls.clear()
        probs = task.predict_step(router, batch, 3)
        close(net.calls[0]["z"], reference_z0, rtol=0.0, atol=0.0)
        close(probs, bridge_probs(net, inputs, reference_z0, edm_grid(3)), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="takes batches of `inputs` or `\\(inputs, labels\\)`"):
        task.predict_step(router, (inputs, labels, labels), 0)


def test_language_validation_and_prediction_use_the_batch_index_as_seed() -> None:
    """MaskedLM and AutoregressiveLM: validation metrics are the batch means of evaluate_batch(seed=batch index),
    predict_step its per-sequence values; a 1-tuple or (tokens, extra) batch reads the tokens."""
    vocab, num_groups = 6, 3
    tokens = torch.randint(0, vocab, (4, 12), generator=gen(1))
    masked = ldb.DiffusionBlocksModule(
        FakeMaskedLM(vocab, num_groups, torch.randn(num_groups, vocab, generator=gen(0)) * 2),
        MaskedLM(vocab),
        num_blocks=num_groups,
    )
    ar = ldb.DiffusionBlocksModule(FakeARLM(vocab), AutoregressiveLM(vocab), num_blocks=3)
    for module in (masked, ar):
        task, router = module.task, module.router()
        reference = task.evaluate_batch(router, tokens, seed=5)
        assert any(not torch.equal(v, task.evaluate_batch(router, tokens, seed=0)[k]) for k, v in reference.items())
        for batch in (tokens, (tokens,), (tokens, torch.zeros(4))):
            metrics = task.validation_metrics(router, batch, 5)
            assert set(metrics) == set(reference)
            for name, value in metrics.items():
                close(value, reference[name].mean(), rtol=1e-6, atol=1e-7)
            for name, value in task.predict_step(router, batch, 5).items():
                close(value, reference[name], rtol=1e-6, atol=1e-7)


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


def test_bridges_keep_the_embedding_dtype() -> None:
    """Classification and AR form z = Ê[y] + σε in the embeddings' dtype (bf16 tables give bf16 targets)."""
    table = F.normalize(torch.randn(3, 4, generator=gen(0)), dim=-1).to(torch.bfloat16)
    sigma = torch.tensor([0.1, 1.0])
    run = Recorder(torch.zeros(2, 3), table)
    Classification(3).loss(run, (torch.zeros(2, 2), torch.tensor([0, 2])), sigma, gen(1))
    assert run.calls[0][0][1].dtype == torch.bfloat16
    run = Recorder(torch.zeros(2, 5, 3), table)
    AutoregressiveLM(3).loss(run, torch.randint(0, 3, (2, 5), generator=gen(2)), sigma, gen(3))
    assert run.calls[0][0][1].dtype == torch.bfloat16


def test_unlabelled_sampling_of_a_conditional_network_feeds_the_null_label() -> None:
    """sample(num_samples=n) on a class-conditional network conditions every call on the null label."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    module.sample(num_samples=3, steps=2, seed=0, shape=(1, 2, 2))
    assert len(net.calls) == 2
    for call in net.calls:
        assert call["labels"] is not None
        assert call["labels"].tolist() == [module.task.null_label] * 3
        assert not 0 <= module.task.null_label < net.num_classes


# ---------------------------------------------------------------------------- second mutmut pass: exact draws


def test_masking_keeps_a_token_whose_draw_equals_t() -> None:
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


def test_label_dropout_keeps_a_label_whose_draw_equals_p() -> None:
    """CFG training, exactly: a label becomes the null label iff its uniform draw u < p (Bernoulli(p) by inverse
    CDF, P(dropped) = p), so a label whose draw equals p is kept."""
    n = 64
    labels = torch.arange(n) % 4
    u = torch.rand(n, generator=gen(2))  # the dropout draws: the generator's first
    p = float(u[10])
    task = ImageGeneration(label_dropout=p)
    run = Recorder(torch.zeros(n, 1, 1, 1))
    task.loss(run, (torch.zeros(n, 1, 1, 1), labels), torch.ones(n), gen(2))
    seen = labels_in_call(*run.calls[0])
    assert seen is not None
    assert torch.equal(seen, torch.where(u < p, torch.full_like(labels, task.null_label), labels))
    assert int(seen[10]) == int(labels[10])
    assert 0 < int((seen != labels).sum()) < n


# ---------------------------------------------------------------------------- second mutmut pass: arguments


class Declares(nn.Module):
    """A network that only declares attributes (objective, vocab_size, context_length, num_classes, ...)."""

    def __init__(self, **declared: Any) -> None:
        super().__init__()
        for name, value in declared.items():
            setattr(self, name, value)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        return x


class Table(nn.Module):
    """``net(mode="embeddings")`` returns ``table``, or fails when there is none."""

    def __init__(self, table: Tensor | None) -> None:
        super().__init__()
        self.table = table

    def forward(self, mode: str = "logits") -> Tensor:
        if self.table is None:
            raise RuntimeError("no table")
        return self.table


def test_task_arguments_and_defaults_are_checked() -> None:
    """Tasks refuse < 2 classes or tokens, label dropout outside [0, 1), a non-integer null label and an unknown
    weighting; the smallest legal values pass. The null label is the given one, else the network's, else −1."""
    assert Classification(2).num_classes == MaskedLM(2).vocab_size == AutoregressiveLM(2).vocab_size == 2
    with pytest.raises(ValueError, match=r"^num_classes must be >= 2, got 1\.$"):
        Classification(1)
    for language_task in (MaskedLM, AutoregressiveLM):
        with pytest.raises(ValueError, match=r"^vocab_size must be >= 2, got 1\.$"):
            language_task(1)
        assert language_task(3).context_length is None
    with pytest.raises(ValueError, match=r"^weighting must be 'per_sample', 'batch_mean' or 'none', got 'mean'\.$"):
        AutoregressiveLM(4, weighting="mean")  # type: ignore[arg-type]
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^label_dropout must be in \[0, 1\), got {p}\.$"):
            ImageGeneration(label_dropout=p)
    with pytest.raises(ValueError, match=r"^null_label must be an integer label id, got 2\.5\.$"):
        ImageGeneration(null_label=2.5)  # type: ignore[arg-type]
    fresh = ImageGeneration()
    assert (fresh.null_label, fresh.sample_shape) == (-1, None)
    explicit = ImageGeneration(null_label=7)
    assert explicit.null_label == 7
    explicit.bind(Declares(num_classes=4))
    assert explicit.null_label == 7  # given: kept
    fresh.bind(Declares(num_classes=4))
    assert fresh.null_label == 4  # declared by the network: the extra row of num_classes + 1
    undeclared = ImageGeneration()
    undeclared.bind(Declares())
    assert undeclared.null_label == -1


def test_language_tasks_check_the_network_they_bind() -> None:
    """MaskedLM and AutoregressiveLM refuse a network of the other objective or another vocabulary, and read its
    context length (None when it declares none)."""
    cases = ((MaskedLM(5), "masked", "autoregressive"), (AutoregressiveLM(5), "autoregressive", "masked"))
    for task, objective, other in cases:
        wrong = rf"^The network was built with objective='{other}' but the task trains objective='{objective}';"
        with pytest.raises(ValueError, match=wrong + rf" build it with objective='{objective}'\.$"):
            task.bind(Declares(objective=other))
        with pytest.raises(
            ValueError, match=r"^The network reads out 6 tokens but the task has vocab_size=5; use one\.$"
        ):
            task.bind(Declares(vocab_size=6))
        task.bind(Declares(objective=objective, vocab_size=5, context_length=9))
        assert task.context_length == 9
        task.bind(Declares())
        assert task.context_length is None


def test_token_batches_are_checked() -> None:
    """Language-model batches are (N, L) int64/int32 ids in [0, vocab_size); anything else is refused, by shape."""
    task = MaskedLM(5)
    assert task.batch_size(torch.zeros(3, 4, dtype=torch.int32)) == 3
    cases = ((torch.zeros(3, 4), r"\(3, 4\)"), (torch.zeros(4, dtype=torch.long), r"\(4,\)"), ([[1, 2]], "list"))
    for bad, shown in cases:
        with pytest.raises(
            ValueError, match=rf"^Language-model batches must be \(N, L\) integer token ids, got {shown}\.$"
        ):
            task.batch_size(bad)
    with pytest.raises(
        ValueError,
        match=r"^Token ids must be in \[0, 5\); the batch has ids in \[0, 5\]\. Build the task and the model with"
        r" the tokenizer's vocab_size\.$",
    ):
        task.batch_size(torch.tensor([[0, 5]]))


def test_classification_checks_its_batches_and_network() -> None:
    """Classification batches are (inputs, 1-D integer labels in [0, C)); its network must give a (C, dim) table;
    predict batches hold inputs, not labels."""
    task = Classification(3)
    inputs = torch.zeros(4, 2)
    assert task.batch_size((inputs, torch.tensor([0, 1, 2, 0]))) == 4
    with pytest.raises(ValueError, match=r"^Classification expects batches of `\(inputs, labels\)`\.$"):
        task.batch_size((inputs, torch.zeros(4, dtype=torch.long), inputs))
    with pytest.raises(
        ValueError, match=r"^Labels must be a 1-D integer tensor, got torch\.float32 of shape \(4,\)\.$"
    ):
        task.batch_size((inputs, torch.zeros(4)))
    with pytest.raises(
        ValueError,
        match=r"^Labels must be in \[0, 3\); got \[3, 3, 3, 3, 3\]\. Check num_classes or the data set's label"
        r" mapping\.$",
    ):
        task.batch_size((torch.zeros(6, 2), torch.full((6,), 3)))
    with pytest.raises(
        ValueError,
        match=r"^Classification needs a network .*; Table does not \(RuntimeError: no table\)\. Wrap a plain"
        r" backbone: ConditioningAdapter\(backbone, num_classes=3\)\. An image denoiser \(e\.g\. DiT\) belongs"
        r" to ImageGeneration\.$",
    ):
        task.bind(Table(None))
    with pytest.raises(ValueError, match=r"^Table\(mode='embeddings'\) must return a \(classes, dim\) tensor\.$"):
        task.bind(Table(torch.zeros(3)))
    with pytest.raises(
        ValueError,
        match=r"^The network embeds 4 classes but Classification\(num_classes=3\)\. Build both with the data set's"
        r" number of classes\.$",
    ):
        task.bind(Table(torch.zeros(4, 2)))
    task.bind(Table(torch.zeros(3, 2)))
    router: Any = None  # refused before any network call
    with pytest.raises(
        ValueError, match=r"^Classification's predict_step takes batches of `inputs` or `\(inputs, labels\)`\.$"
    ):
        task.predict_step(router, [1, 2], 0)
    with pytest.raises(
        ValueError,
        match=r"^Classification's predict_step got an integer tensor of shape \(4,\): a predict batch holds the"
        r" inputs to classify \(e\.g\. images\), not labels\.$",
    ):
        task.predict_step(router, torch.zeros(4, dtype=torch.long), 0)


def test_tasks_name_what_they_do_not_offer() -> None:
    """A task without a prediction refuses trainer.predict; a public call a task does not answer names what it
    offers."""

    class Bare(Task):
        def batch_size(self, batch: Any) -> int:
            return 0

        def loss(self, run: Any, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
            return sigma

    router: Any = None
    with pytest.raises(TypeError, match=r"^Bare has no prediction; trainer\.predict cannot run it\.$"):
        Bare().predict_step(router, None, 0)
    assert str(Bare().unsupported("sample")) == "sample() is not offered by the Bare task (it offers: none)."
    offers = "(it offers: evaluate_batch(), generate())."
    assert str(MaskedLM(3).unsupported("sample")) == f"sample() is not offered by the MaskedLM task {offers}"


def test_image_prediction_samples_one_image_per_label_seeded_by_the_batch_index() -> None:
    """ImageGeneration's predict_step is sample(labels=batch, seed=batch index) for a 1-D label tensor (or a
    1-tuple of one); anything else is refused and described."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    task, router = module.task, module.router()
    task.sample_shape = [1, 2, 2]
    labels = torch.tensor([0, 3, 1])
    expected = task.sample(router, labels=labels, steps=50, seed=4)
    assert not torch.equal(expected, task.sample(router, labels=labels, steps=50, seed=0))
    for batch in (labels, (labels,), [labels]):
        close(task.predict_step(router, batch, 4), expected, rtol=0.0, atol=0.0)
    described = (
        (torch.zeros(3, 1, 2, 2), r"a torch\.float32 tensor of shape \(3, 1, 2, 2\)"),
        (labels.float(), r"a torch\.float32 tensor of shape \(3,\)"),
        ((labels, labels), "a tuple of 2 items"),
        ("abc", "str"),
    )
    for batch, description in described:
        with pytest.raises(
            ValueError,
            match=r"^ImageGeneration's predict_step draws one sample per label, so a predict batch must be a 1-D"
            r" tensor of class ids \(e\.g\. DataLoader\(TensorDataset\(labels\)\)\)\. This batch holds something"
            rf" else \({description}\); images in a predict batch would be ignored, so they are refused\.$",
        ):
            task.predict_step(router, batch, 0)


class NoNoiseLevel(nn.Module):
    """forward(x) only: no slot for the noise level."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Unconditional(nn.Module):
    """forward(x, c_noise): no labels."""

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return x


class NoPositional(nn.Module):
    """forward(*, x): no positional slot for the noisy input."""

    def forward(self, *, x: Tensor) -> Tensor:
        return x


class NeedsMore(nn.Module):
    """forward(x, c_noise, labels, scale): a fourth argument without a default."""

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor, scale: float) -> Tensor:
        return x


def test_image_generation_refuses_what_it_cannot_train_or_sample() -> None:
    """ImageGeneration's batches are `images` or `(images, labels)`; sample() needs labels or a count, labels only for
    a conditional network, labels for guidance, a known shape and, for clip=True, a seen data range; a network
    without a noise-level slot is refused quoting the task's own call (FlowMatching's for FlowMatching)."""
    task = ImageGeneration()
    images = torch.zeros(5, 1, 2, 2)
    assert task.batch_size(images) == task.batch_size((images, torch.zeros(5, dtype=torch.long))) == 5
    for batch, shown in (((images, images, images), "tuple of length 3"), (3.5, r"float of length \?")):
        with pytest.raises(
            ValueError, match=rf"^ImageGeneration expects batches of `images` or `\(images, labels\)`, got {shown}\.$"
        ):
            task.split(batch)
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), task, num_blocks=3)
    router = module.router()
    labels, count, shape = task.sampling_inputs(router, [1, 2], None, 1.0, (1, 2, 2))
    assert labels is not None
    assert (labels.dtype, labels.tolist(), count, list(shape)) == (torch.long, [1, 2], 2, [1, 2, 2])
    int32 = task.sampling_inputs(router, torch.tensor([3, 0], dtype=torch.int32), None, 1.0, (1, 2, 2))[0]
    assert int32 is not None
    assert int32.dtype == torch.long
    refusals = (
        (([1, 2], None, 1.0, None), r"The sample shape is unknown: the network has no `channels`/`image_size`-style"
         r" attributes and no training batch was seen\. Pass shape=\(C, H, W\)\."),
        ((None, None, 1.0, (1, 2, 2)), r"Pass `labels` or `num_samples` to sample\(\)\."),
        ((None, 3, 2.0, (1, 2, 2)), r"Classifier-free guidance needs `labels`; pass labels or guidance=1\.0\."),
    )  # fmt: skip
    for arguments, message in refusals:
        with pytest.raises(ValueError, match=rf"^{message}$"):
            task.sampling_inputs(router, *arguments)
    unconditional = ImageGeneration()
    unconditional.bind(Unconditional())
    with pytest.raises(
        ValueError, match=r"^The network takes no labels; call sample\(num_samples=\.\.\.\) without labels\.$"
    ):
        unconditional.sampling_inputs(router, [1], None, 1.0, (1, 2, 2))
    x = torch.linspace(-2.0, 2.0, 9)
    assert task._clip(x, False) is x
    with pytest.raises(
        ValueError,
        match=r"^clip=True clamps to the training data's range, but none was seen; pass clip=\(lo, hi\)$",
    ):
        task._clip(x, True)
    task.data_range = [-0.5, 1.0]
    close(task._clip(x, True), x.clamp(-0.5, 1.0), rtol=0.0, atol=0.0)
    close(task._clip(x, (-1.0, 0.25)), x.clamp(-1.0, 0.25), rtol=0.0, atol=0.0)
    for refusing, call in ((ImageGeneration(), EXPECTED_CALL), (FlowMatching(), FLOW_CALL)):
        with pytest.raises(ValueError, match=rf"takes no noise level\. {re.escape(call)}; the noise level and the"):
            refusing.bind(NoNoiseLevel())
    refused = (
        (NoPositional, r"takes no positional input for the noisy image"),
        (NeedsMore, r"requires further arguments \['scale'\]"),
    )
    for network, why in refused:
        with pytest.raises(
            ValueError,
            match=rf"^{network.__name__}\.forward\(.* {why}\. {re.escape(EXPECTED_CALL)}; the noise level and the"
            r" labels may also be keyword-only arguments\.$",
        ):
            ImageGeneration().bind(network())


def test_call_convention_passes_the_noise_level_and_labels() -> None:
    """CallConvention.call passes the network input, then c_noise and the labels positionally or by the keywords the
    network's forward names; a network without labels gets none, and labelled batches are refused for it."""
    x, c_noise, labels = torch.zeros(2, 1), torch.ones(2), torch.tensor([1, 0])
    run = Recorder(torch.zeros(2, 1))
    CallConvention(takes_labels=False).call(run, x, c_noise, None)
    CallConvention("sigma", "y").call(run, x, c_noise, labels)
    (plain, plain_kw), (keyed, keyed_kw) = run.calls
    assert (len(plain), plain_kw, len(keyed), sorted(keyed_kw)) == (2, {}, 1, ["sigma", "y"])
    assert keyed_kw["sigma"] is c_noise
    assert keyed_kw["y"] is labels
    with pytest.raises(
        ValueError,
        match=r"^The batches carry labels but the network's forward takes none; use an unconditional data set or give"
        r" the network a labels argument \(forward\(x, c_noise, labels=None\)\)\.$",
    ):
        CallConvention(takes_labels=False).call(run, x, c_noise, labels)
