"""``docs/new_formulation.md`` runs: a formulation added in two user files (noise levels + task) trains block-wise,
samples one group per step, checkpoints and reloads, and keeps the contract every formulation keeps.

The doc's ``python`` blocks are written to the files their first line names (``# file: x.py``) or run in order in
one namespace; the expected values below are computed here from the cosine schedule's closed form
(α = cos(πt/2), σ = sin(πt/2), t ~ U[t_min, t_max], overlap in ln tan(πt/2)), not from the example's code.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import lightning_diffusionblocks as ldb

DOC = Path(__file__).resolve().parents[1] / "docs" / "new_formulation.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
FILE = re.compile(r"# file: (\w+\.py)")


def run_doc(folder: Path) -> dict[str, Any]:
    """Write the doc's file blocks into ``folder`` and run its other blocks there, in order; their namespace."""
    blocks = FENCE.findall(DOC.read_text(encoding="utf-8"))
    assert len(blocks) >= 4, f"{DOC.name} lost its code blocks"
    namespace: dict[str, Any] = {"__name__": "new_formulation_doc"}
    for i, block in enumerate(blocks):
        named = FILE.fullmatch(block.splitlines()[0])
        if named:
            (folder / named[1]).write_text(block, encoding="utf-8")
        else:
            exec(compile(block, f"{DOC.name}, block {i}", "exec"), namespace)  # noqa: S102 - the doc's own code
    return namespace


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("new_formulation")
    here = Path.cwd()
    sys.path.insert(0, str(folder))
    os.chdir(folder)  # the doc saves its checkpoint in the working directory
    try:
        yield run_doc(folder)
    finally:
        os.chdir(here)
        sys.path.remove(str(folder))
        for name in ("vp_cosine", "vp_cosine_task"):
            sys.modules.pop(name, None)


def test_doc_example_trains_block_wise_and_samples_one_group_per_step(doc):
    """Six block-wise steps train the groups the strategy picked; ``sample(steps=B)`` calls group 0, 1, 2 once
    each, in that order (highest t first); the reloaded checkpoint rebuilt the user's task and schedule."""
    module, samples = doc["module"], doc["samples"]
    assert type(module.task).__name__ == "CosineDiffusion"
    assert int(module.step_count) == 6
    assert int(module.group_steps.sum()) == 6
    assert module.blockwise
    assert samples.shape == (4, 1, 8, 8)
    assert torch.isfinite(samples).all()
    assert type(doc["restored"].task.noise).__name__ == "CosineSchedule"

    called: list[int | None] = []
    hook = module.sampling_network.register_forward_pre_hook(
        lambda _mod, _args, kwargs: called.append(kwargs.get("group")), with_kwargs=True
    )
    try:
        again = module.sample(labels=[1, 2, 3, 4], steps=3, guidance=2.0, seed=0)
    finally:
        hook.remove()
    assert called == [0, 1, 2]  # one call per step (guidance batches its two halves), one group each
    assert torch.equal(again, samples)


@pytest.mark.parametrize("num_groups", [1, 3, 5])
def test_doc_formulation_keeps_the_interface_contract(doc, num_groups):
    """Boundaries ascend from t_min to t_max at equal steps of t (uniform t), each group carries 1/B of the
    probability, the overlap widens in ln tan(πt/2) and is clamped, and draws stay inside the range asked for."""
    noise = doc["CosineDiffusion"]().noise
    t_min, t_max, gamma = noise.t_min, noise.t_max, 0.05
    b = noise.boundaries(num_groups)
    expected = [t_min + (t_max - t_min) * i / num_groups for i in range(num_groups + 1)]
    assert b.tolist() == pytest.approx(expected, abs=1e-12)
    assert b[0].item() == t_min
    assert b[-1].item() == t_max
    assert bool((b[1:] > b[:-1]).all())

    def log_ratio(t: float) -> float:
        return math.log(math.sin(math.pi * t / 2) / math.cos(math.pi * t / 2))

    gen = torch.Generator().manual_seed(0)
    for g in range(num_groups):
        lo, hi = expected[num_groups - 1 - g], expected[num_groups - g]  # group 0 owns the highest t
        assert noise.mass(lo, hi) == pytest.approx(1 / num_groups, abs=1e-12)
        pad = gamma * (log_ratio(hi) - log_ratio(lo))
        wide = (
            max(t_min, 2 / math.pi * math.atan(math.exp(log_ratio(lo) - pad))),
            min(t_max, 2 / math.pi * math.atan(math.exp(log_ratio(hi) + pad))),
        )
        got = noise.group_range(b, g, gamma)
        assert got == pytest.approx(wide, abs=1e-12)
        assert (got[0] < lo or lo == t_min)
        assert (got[1] > hi or hi == t_max)
        drawn = noise.sample(2000, *got, generator=gen)
        assert drawn.min().item() >= got[0]
        assert drawn.max().item() <= got[1]
        width = got[1] - got[0]  # uniform there: mean in the middle, within 5 standard errors
        assert abs(drawn.double().mean().item() - (got[0] + got[1]) / 2) < 5 * width / math.sqrt(12 * 2000)
        inner = noise.sample(200, lo, hi, generator=gen)
        assert set(noise.group_of(inner, b).tolist()) <= {g}

    grid = noise.sampling_grid(num_groups)
    assert grid[0].item() == t_max
    assert grid[-1].item() == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    owners = noise.group_of(grid[:-1], b).tolist()
    assert owners == list(range(num_groups))


def test_doc_formulas_equal_their_closed_forms(doc):
    """α, σ, the noising inside the loss and the DDIM step are the cosine schedule's: a step with the true ε lands
    exactly on the next level's state, a step to t = 0 returns the data, and the loss of a network that outputs the
    true ε is 0 while one that outputs 0 scores mean(ε²)."""
    task = doc["CosineDiffusion"]()
    noise = task.noise
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 1, 8, 8, generator=gen, dtype=torch.float64)
    for t, t_next in [(0.9, 0.6), (0.5, 0.2), (0.3, 0.0)]:
        alpha, sigma = noise.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        assert alpha.item() == pytest.approx(math.cos(math.pi * t / 2), abs=1e-15)
        assert sigma.item() == pytest.approx(math.sin(math.pi * t / 2), abs=1e-15)
        z = math.cos(math.pi * t / 2) * x + math.sin(math.pi * t / 2) * eps
        want = math.cos(math.pi * t_next / 2) * x + math.sin(math.pi * t_next / 2) * eps
        torch.testing.assert_close(noise.step(z, eps, t, t_next), want, rtol=0, atol=1e-12)
        # x_t/α = x + (σ/α)·ε: EDM's σ of level t is tan(πt/2)
        edm_sigma = noise.edm_sigma(torch.tensor([t], dtype=torch.float64)).item()
        assert edm_sigma == pytest.approx(math.tan(math.pi * t / 2), rel=1e-12)

    images, eps32 = x.float(), eps.float()
    t = torch.tensor([0.2, 0.4, 0.6, 0.8])
    scale = t.double().mul(math.pi / 2).view(-1, 1, 1, 1)

    def true_eps(z: torch.Tensor, t_in: torch.Tensor, labels: Any) -> torch.Tensor:
        assert torch.equal(t_in, t)  # the network is given t itself
        return (z.double() - scale.cos() * x) / scale.sin()

    loss = task.per_sample_loss(true_eps, images, None, t, eps32)
    assert loss.abs().max().item() < 1e-5
    zero = task.per_sample_loss(lambda z, t_in, labels: torch.zeros_like(z), images, None, t, eps32)
    torch.testing.assert_close(zero, eps32.pow(2).flatten(1).mean(1))


def test_a_partition_a_formulation_lacks_is_refused_naming_only_those_it_offers(doc):
    """The base class offers ``equiprobable`` and ``linear``; a formulation that adds ``uniform_log`` (EDM, flow)
    says so. A new formulation that adds none must not be told to use ``uniform_log``, which it would refuse too."""
    cosine = doc["CosineDiffusion"]().noise
    with pytest.raises(ValueError, match=r"Unknown partition 'uniform_log'; use 'equiprobable' or 'linear'\.$"):
        cosine.boundaries(3, "uniform_log")
    assert cosine.boundaries(2, "linear").tolist() == pytest.approx([cosine.t_min, 0.5, cosine.t_max], abs=1e-12)
    for offers_log in (ldb.EDM, ldb.FlowSchedule()):
        assert offers_log.boundaries(3, "uniform_log").shape == (4,)
        with pytest.raises(ValueError, match=r"use 'equiprobable', 'uniform_log' or 'linear'\.$"):
            offers_log.boundaries(3, "quantile")
