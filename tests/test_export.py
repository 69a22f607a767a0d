"""Export to stock diffusers pipelines: every step of DiTPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline and
FluxPipeline runs exactly one group, the one owning its timestep, after a save → fresh ``from_pretrained``; the group
edges on each pipeline's timestep scale are pinned from the formulas; the reverse import reads the folders back."""

from __future__ import annotations

import ast
import contextlib
import copy
import math
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")

import lightning_diffusionblocks as ldb  # noqa: E402
from lightning_diffusionblocks.export import (  # noqa: E402
    TimestepRoutedTransformer,
    from_diffusers,
    load_diffusers,
    module_transformer,
    pipeline_edges,
    routed_transformer,
    to_diffusers,
)

TB, STB = "transformer_blocks", "single_transformer_blocks"
VAE_KW: dict[str, Any] = {
    "in_channels": 1, "out_channels": 1, "down_block_types": ("DownEncoderBlock2D",) * 2,
    "up_block_types": ("UpDecoderBlock2D",) * 2, "block_out_channels": (8, 16), "layers_per_block": 1,
    "latent_channels": 4, "norm_num_groups": 4, "sample_size": 32,
}  # fmt: skip


# ------------------------------------------------------------------------------------------- formulas of the edges
def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _phi_inv(q: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(200):  # bisection: independent of torch's ndtri
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _phi(mid) < q else (lo, mid)
    return (lo + hi) / 2


def edm_median(p_mean: float, p_std: float = 1.2, lo: float = 0.002, hi: float = 80.0) -> float:
    """The B=2 boundary of EDM: the median of the log-normal σ truncated to [lo, hi] (paper eq. of the partition)."""
    a, b = _phi((math.log(lo) - p_mean) / p_std), _phi((math.log(hi) - p_mean) / p_std)
    return math.exp(p_mean + p_std * _phi_inv((a + b) / 2))


def ddpm_sigmas(beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000) -> np.ndarray:
    """σ_k = √((1 − ᾱ_k)/ᾱ_k) of DDPM's linear β schedule (Ho et al. 2020), computed with numpy."""
    alpha_bar = np.cumprod(1 - np.linspace(beta_start, beta_end, steps, dtype=np.float64))
    return np.sqrt((1 - alpha_bar) / alpha_bar)


def sigma_to_discrete_edge(sigma: float) -> float:
    """Timestep k goes to the lower-noise group iff σ_k ≤ σ_b: the edge sits half a step above the last such k."""
    return float((ddpm_sigmas() <= sigma).sum()) - 0.5


def test_edges_on_each_pipeline_scale_follow_the_formulas():
    edm, flow, ddpm = ldb.NoiseSchedule(), ldb.FlowSchedule(), ldb.DDPMSchedule()
    # DDPM → discrete: the timestep boundary itself (uniform timesteps, B=4: 250 per group)
    assert pipeline_edges(ddpm, ddpm.boundaries(4), "discrete") == [249.5, 499.5, 749.5]
    # flow → flow: 1000·t_b; the logit-normal (0, 1) truncated symmetrically has its median at t = 0.5
    assert pipeline_edges(flow, flow.boundaries(2), "flow") == pytest.approx([500.0], abs=1e-9)
    t_edges = flow.boundaries(4)[1:-1].tolist()  # on the flow scale exactly 1000·t_b, no round trip through σ
    assert pipeline_edges(flow, flow.boundaries(4), "flow") == [1000 * t for t in t_edges]
    # EDM → flow: s = σ/(1 + σ) so that x/(1 − s) = x₀ + σε
    sigma = edm_median(-1.2)
    assert pipeline_edges(edm, edm.boundaries(2), "flow") == pytest.approx([1000 * sigma / (1 + sigma)], rel=1e-9)
    # EDM → discrete, through ᾱ of the scheduler's linear β; flow → discrete through σ = t/(1 − t)
    assert pipeline_edges(edm, edm.boundaries(2), "discrete") == [sigma_to_discrete_edge(sigma)]
    a = _phi(math.log(1e-3 / (1 - 1e-3)))  # the logit-normal (0, 1) truncated to [1e-3, 1 − 1e-3]; B=4's top edge
    t_b = 1 / (1 + math.exp(-_phi_inv(a + 0.75 * (1 - 2 * a))))
    assert pipeline_edges(flow, flow.boundaries(4), "discrete")[2] == sigma_to_discrete_edge(t_b / (1 - t_b))
    # another β schedule moves the edge: scaled_linear (√β linear), as a scheduler config gives it
    scaled = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    ab = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)
    expected = float((np.sqrt((1 - ab) / ab) <= sigma).sum()) - 0.5
    assert pipeline_edges(edm, edm.boundaries(2), "discrete", scheduler=scaled) == [expected]
    assert expected != sigma_to_discrete_edge(sigma)
    # a timestep on an edge goes to the lower-noise group, as a level on a boundary does in the package
    flux = routed_transformer(_flux(), [{TB: [0, 2]}, {STB: [0, 2]}], flow.boundaries(2), flow)
    assert flux.config.timestep_mult == 1000.0
    on_edge = [flux.group_of(s) for s in (0.5, 0.5 + 1e-6, 1.0, 0.0)]
    assert on_edge == [1, 0, 0, 1]
    assert int(flow.group_of(torch.tensor([0.5], dtype=torch.float64), flow.boundaries(2))[0]) == 1
    # a formulation that knows its own EDM σ is asked (here: the state x + 2σ·ε)
    doubled = _DoubledSigma()
    assert pipeline_edges(doubled, edm.boundaries(2), "flow") == pytest.approx([1000 * 2 * sigma / (1 + 2 * sigma)])
    # the pipeline's own ᾱ table agrees with the formula the edges use
    scheduler = diffusers.DDPMScheduler()
    assert np.allclose(scheduler.alphas_cumprod.double().numpy(), np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)))


def test_export_refuses_bad_input_naming_the_fix():
    ddpm, edm = ldb.DDPMSchedule(), ldb.NoiseSchedule()
    with pytest.raises(ValueError, match="strictly ascending"):
        pipeline_edges(edm, [0.002, 1.0, 0.5, 80.0], "flow")
    with pytest.raises(ValueError, match="pipeline_time='discrete'"):
        pipeline_edges(ddpm, ddpm.boundaries(2), "flow")
    with pytest.raises(ValueError, match="num_train_timesteps=1000"):
        pipeline_edges(ddpm, ddpm.boundaries(2), "discrete", scheduler={"num_train_timesteps": 500})
    with pytest.raises(TypeError, match="diffusers transformers"):
        routed_transformer(nn.Linear(2, 2), [{TB: [0, 1]}], [0.002, 80.0], edm)
    dit = _dit()
    with pytest.raises(ValueError, match="in no group"):
        routed_transformer(dit, [{TB: [0, 1]}, {TB: [1, 3]}], edm.boundaries(2), edm, pipeline_time="flow")
    with pytest.raises(ValueError, match="groups must not overlap"):
        routed_transformer(dit, [{TB: [0, 3]}, {TB: [2, 4]}], edm.boundaries(2), edm, pipeline_time="flow")
    with pytest.raises(ValueError, match="pipeline_time='discrete'"):
        routed_transformer(_Unknown(), [{}], [0.0, 1.0], edm)
    with pytest.raises(TypeError, match="holds no diffusers model"):
        to_diffusers(ldb.DiffusionBlocksModule(_plain_net(), ldb.tasks.ImageGeneration(), num_blocks=2), "unused")
    with pytest.raises(FileNotFoundError, match="snapshot_download"):
        load_diffusers("no/such/folder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 1000 classes: DiTPipeline's null class 1000 is the extra row, no warning
        routed = routed_transformer(dit, [{TB: [0, 2]}, {TB: [2, 4]}], ddpm.boundaries(2), ddpm)
    ten_classes = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2, sample_size=8, num_embeds_ada_norm=10
    )
    with pytest.warns(UserWarning, match="guidance_scale=1"):  # DiTPipeline's null class 1000 would not exist
        routed_transformer(ten_classes, [{TB: [0, 1]}, {TB: [1, 2]}], ddpm.boundaries(2), ddpm)
    with pytest.raises(ValueError, match="one group per call"):
        routed.group_of(torch.tensor([900, 100]))
    # a stock call with the timestep by position routes as the keyword call does (DiT: forward(x, timestep, labels))
    x, y = _text(2, 4, 8, 8, seed=0), torch.tensor([1, 2])
    with torch.no_grad():
        outs = {t: routed(x, timestep=torch.tensor([t, t]), class_labels=y).sample for t in (900, 100)}
        same = [torch.equal(routed(x, torch.tensor([t, t]), y).sample, outs[t]) for t in (900, 100)]
    assert same == [True, True]
    assert not torch.equal(outs[900], outs[100])


class _DoubledSigma(ldb.NoiseSchedule):
    """A formulation whose level σ means the EDM state x + 2σ·ε."""

    def edm_sigma(self, level: Tensor) -> Tensor:
        return 2 * level


class _Unknown(diffusers.ModelMixin):
    """A diffusers model whose pipeline timestep scale the export cannot know."""


def _plain_net() -> nn.Module:
    torch.manual_seed(0)
    return ldb.models.DiT(image_size=8, channels=1, patch=4, dim=16, depth=2, heads=2, num_classes=10)


# ------------------------------------------------------------------------------------------- the four families
def _dit() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, sample_size=8,
        patch_size=2, num_embeds_ada_norm=1000,
    )  # fmt: skip


def _pixart() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4,
        cross_attention_dim=16, caption_channels=32, sample_size=8, patch_size=2,
    )  # fmt: skip


def _sd3() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
        pos_embed_max_size=16,
    )  # fmt: skip


def _flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def _text(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Family:
    """A diffusers family: its tiny model, how it was trained, its stock pipeline and that pipeline's unchanged call."""

    name: str
    build: Callable[[], nn.Module]
    noise: Any
    edge: float  # the expected edge on the pipeline's 0–1000 scale, from the formulas above
    pipeline: Callable[[], type]
    components: Callable[[], dict[str, Any]]
    call: Callable[[], dict[str, Any]]
    forward_kwargs: Callable[[], dict[str, Any]]
    hidden: tuple[int, ...]
    timestep_mult: float = 1.0
    groups: tuple[dict[str, list[int]], ...] = ({TB: [0, 2]}, {TB: [2, 4]})
    #: what from_pretrained must be given again (parts the pipeline folder does not hold)
    missing: tuple[str, ...] = ()


def _vae(shift: float | None = None, scale: float = 0.18215) -> nn.Module:
    torch.manual_seed(1)
    return diffusers.AutoencoderKL(**VAE_KW, shift_factor=shift, scaling_factor=scale)


SD3_MISSING = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
FAMILIES = [
    Family(
        "dit", _dit, ldb.DDPMSchedule(), 499.5, lambda: diffusers.DiTPipeline,
        lambda: {"vae": _vae(), "scheduler": diffusers.DDPMScheduler()},
        lambda: {"class_labels": [3, 7], "num_inference_steps": 3, "output_type": "np"},
        lambda: {"class_labels": torch.tensor([3, 7])}, (2, 4, 8, 8),
    ),
    Family(
        "pixart", _pixart, ldb.NoiseSchedule(p_mean=0.5), sigma_to_discrete_edge(edm_median(0.5)),
        lambda: diffusers.PixArtAlphaPipeline,
        lambda: {"vae": _vae(), "scheduler": diffusers.DPMSolverMultistepScheduler(), "tokenizer": None,
                 "text_encoder": None},
        lambda: {"prompt_embeds": _text(1, 6, 32, seed=1), "prompt_attention_mask": torch.ones(1, 6),
                 "negative_prompt": None, "negative_prompt_embeds": _text(1, 6, 32, seed=2),
                 "negative_prompt_attention_mask": torch.ones(1, 6), "use_resolution_binning": False,
                 "num_inference_steps": 3, "output_type": "np", "height": 16, "width": 16},
        lambda: {"encoder_hidden_states": _text(2, 6, 32, seed=3), "encoder_attention_mask": torch.ones(2, 6),
                 "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}, (2, 4, 8, 8),
    ),  # fmt: skip
    Family(
        "sd3", _sd3, ldb.NoiseSchedule(), 1000 * edm_median(-1.2) / (1 + edm_median(-1.2)),
        lambda: diffusers.StableDiffusion3Pipeline,
        lambda: {"vae": _vae(0.0609, 1.5305), "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                 **dict.fromkeys(SD3_MISSING)},
        lambda: {"prompt_embeds": _text(1, 6, 32, seed=1), "pooled_prompt_embeds": _text(1, 24, seed=2),
                 "negative_prompt_embeds": _text(1, 6, 32, seed=3),
                 "negative_pooled_prompt_embeds": _text(1, 24, seed=4), "height": 16, "width": 16,
                 "num_inference_steps": 3, "output_type": "np"},
        lambda: {"encoder_hidden_states": _text(2, 6, 32, seed=5), "pooled_projections": _text(2, 24, seed=6)},
        (2, 4, 8, 8), missing=SD3_MISSING,
    ),  # fmt: skip
    Family(
        "flux", _flux, ldb.FlowSchedule(), 500.0, lambda: diffusers.FluxPipeline,
        lambda: {"vae": _vae(0.1159, 0.3611),
                 "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                 **dict.fromkeys(SD3_MISSING[:4])},
        lambda: {"prompt_embeds": _text(1, 6, 32, seed=1), "pooled_prompt_embeds": _text(1, 24, seed=2),
                 "height": 16, "width": 16, "num_inference_steps": 3, "output_type": "np"},
        lambda: {"encoder_hidden_states": _text(2, 6, 32, seed=5), "pooled_projections": _text(2, 24, seed=6),
                 "img_ids": torch.zeros(16, 3), "txt_ids": torch.zeros(6, 3)},
        (2, 16, 16), timestep_mult=1000.0, groups=({TB: [0, 2], STB: [0, 1]}, {STB: [1, 2]}),
        missing=SD3_MISSING[:4],
    ),  # fmt: skip
]


def _perturbed(model: nn.Module, seed: int) -> nn.Module:
    """A copy with every weight moved: stands for the stem and head another group trained."""
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return out


def _module(family: Family) -> ldb.DiffusionBlocksModule:
    """A block-wise module over the family's diffusers model with per-group stems that differ (as after training)."""
    ddpm = isinstance(family.noise, ldb.DDPMSchedule)
    task = ldb.tasks.DDPM() if ddpm else ldb.tasks.ImageGeneration(noise=family.noise)
    module = ldb.DiffusionBlocksModule(family.build(), task, num_blocks=2, block_path=TB)
    stem = module.network.stems[0]
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in stem.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for p in module.network.net.parameters():  # the blocks and group 0's stem: away from their initialisation
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return module


def _spy(model: TimestepRoutedTransformer) -> list[tuple[float, set[tuple[str, int]]]]:
    """(timestep × mult, blocks run) of every call of ``model``, from hooks on the model and on every block."""
    calls: list[tuple[float, set[tuple[str, int]]]] = []

    def on_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = kwargs["timestep"].reshape(-1)
        assert bool((t == t[0]).all()), "a stock pipeline passes one timestep per call"
        calls.append((float(t[0]) * model.config.timestep_mult, set()))

    model.register_forward_pre_hook(on_call, with_kwargs=True)
    for stack in TimestepRoutedTransformer.stack_names(model.transformer):
        for i, block in enumerate(getattr(model.transformer, stack)._modules.values()):
            block.register_forward_hook(lambda m, a, o, key=(stack, i): calls[-1][1].add(key))
    return calls


def _blocks(groups: tuple[dict[str, list[int]], ...], g: int) -> set[tuple[str, int]]:
    return {(s, i) for s, (a, b) in groups[g].items() for i in range(a, b)}


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_stock_pipeline_runs_one_group_per_step_after_a_fresh_load(family: Family, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    pipeline_cls = family.pipeline()
    if family.name == "flux":  # a group spanning the seam: the lower-level export, given groups and stems
        stock = family.build()
        stem = _perturbed(stock, seed=3)
        model = routed_transformer(
            stock, family.groups, family.noise.boundaries(2), family.noise, stems=[stem], scheduler=None
        )
        pipe = pipeline_cls(transformer=model, **family.components())
        pipe.save_pretrained(tmp_path / "pipe")

        def reference(g: int) -> nn.Module:  # trimming: the blocks of g in a stock model with g's stem
            ref = copy.deepcopy(stock if g == 0 else stem)
            for s in (TB, STB):
                blocks = list(getattr(stock, s))
                a, b = family.groups[g].get(s, [0, 0])
                setattr(ref, s, nn.ModuleList(blocks[a:b]))
            return ref.eval()

    else:
        module = _module(family)
        edm = isinstance(family.noise, ldb.NoiseSchedule)
        with pytest.warns(UserWarning, match="EDM's preconditioning") if edm else contextlib.nullcontext():
            model = to_diffusers(module, tmp_path / "pipe", pipeline=pipeline_cls, components=family.components())
        pipe = pipeline_cls(transformer=model, **family.components())
        network = module.network.eval()

        def reference(g: int) -> nn.Module:  # the package's own network running group g
            return lambda *a, **k: network(*a, group=g, **k)  # type: ignore[return-value]

    assert model.config.edges == pytest.approx([family.edge], abs=1e-9)
    assert not model.training
    # the routed model computes what the trained group computes (its blocks, its stem and head)
    x = _text(*family.hidden, seed=11)
    for g, tau in ((0, 999.0), (1, 1.0)):
        t = torch.full((2,), tau / family.timestep_mult)
        with torch.no_grad():
            got = model(x, timestep=t, **family.forward_kwargs()).sample
            want = reference(g)(x, timestep=t, **family.forward_kwargs()).sample
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    # a fresh from_pretrained of the folder, the pipeline's own scheduler and call: one group per step, the right one
    loaded = pipeline_cls.from_pretrained(tmp_path / "pipe", **dict.fromkeys(family.missing))
    assert isinstance(loaded.transformer, TimestepRoutedTransformer)
    assert not loaded.transformer.training
    calls = _spy(loaded.transformer)
    torch.manual_seed(0)
    images = loaded(generator=torch.Generator().manual_seed(0), **family.call()).images
    assert len(calls) == 3
    seen = set()
    for tau, ran in calls:
        expected = 0 if tau > family.edge else 1
        assert ran == _blocks(family.groups, expected), f"timestep {tau} ran {sorted(ran)}"
        seen.add(expected)
    assert seen == {0, 1}, "the 3-step grid should reach both groups"
    # the reloaded model equals the in-memory one, through the whole pipeline
    torch.manual_seed(0)
    expected_images = pipe(generator=torch.Generator().manual_seed(0), **family.call()).images
    np.testing.assert_allclose(images, expected_images, rtol=0, atol=1e-5)
    with torch.no_grad():
        for tau in (999.0, 1.0):
            t = torch.full((2,), tau / family.timestep_mult)
            a = model(x, timestep=t, **family.forward_kwargs()).sample
            b = loaded.transformer(x, timestep=t, **family.forward_kwargs()).sample
            assert torch.equal(a, b)

    if family.name == "sd3":  # a fresh process that never imports the package itself: the folder's remote code
        _fresh_process_run(tmp_path, images)

    # the reverse import reads the folder back: its stacks, groups and edges, and the stock transformer's weights
    imported = load_diffusers(tmp_path / "pipe")
    stock_keys = set(model.transformer.state_dict())
    assert imported.group_blocks == [dict(g) for g in family.groups]
    assert imported.edges == pytest.approx([family.edge])
    assert set(imported.stacks) == ({TB, STB} if family.name == "flux" else {TB})
    assert set(imported.transformer.state_dict()) == stock_keys


FRESH = """
import sys, numpy as np, torch, diffusers
folder = sys.argv[1]
model = diffusers.AutoModel.from_pretrained(folder + "/transformer", trust_remote_code=True)
assert "lightning_diffusionblocks.export" in sys.modules and type(model).__name__ == "TimestepRoutedTransformer"
pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(folder, transformer=model, **dict.fromkeys(%(missing)r))
runs = []
for stack in (model.transformer.transformer_blocks,):
    for i, block in enumerate(stack._modules.values()):
        block.register_forward_hook(lambda m, a, o, i=i: runs[-1][1].append(i))
model.register_forward_pre_hook(lambda m, a, k: runs.append((float(k["timestep"][0]), [])), with_kwargs=True)
g = lambda s: torch.Generator().manual_seed(s)
text = dict(prompt_embeds=torch.randn(1, 6, 32, generator=g(1)),
    pooled_prompt_embeds=torch.randn(1, 24, generator=g(2)),
    negative_prompt_embeds=torch.randn(1, 6, 32, generator=g(3)), negative_pooled_prompt_embeds=torch.randn(1, 24,
    generator=g(4)))
torch.manual_seed(0)
images = pipe(generator=g(0), height=16, width=16, num_inference_steps=3, output_type="np", **text).images
np.save(folder + "/images.npy", images)
print(runs)
"""


def _fresh_process_run(tmp_path: Path, images: np.ndarray) -> None:
    """Load the SD3 folder with ``AutoModel(trust_remote_code=True)`` + the stock pipeline in a new interpreter."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HOME": str(tmp_path / "hf2")}
    script = FRESH % {"missing": SD3_MISSING}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "pipe")], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    runs = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    edge = FAMILIES[2].edge
    assert [blocks for _, blocks in runs] == [[0, 1] if t > edge else [2, 3] for t, _ in runs]
    assert len(runs) == 3
    np.testing.assert_allclose(np.load(tmp_path / "pipe" / "images.npy"), images, rtol=0, atol=1e-5)


def _level(noise: Any, tau: float, alpha_bar: np.ndarray) -> float:
    """The package's level of a pipeline timestep τ (0–1000 scale), inverting the pipeline's own noising:
    DDPM k itself; EDM σ_k = √((1 − ᾱ_k)/ᾱ_k) (discrete) or s/(1 − s), s = τ/1000 (flow); flow t = τ/1000."""
    if isinstance(noise, ldb.DDPMSchedule):
        return tau
    if isinstance(noise, ldb.FlowSchedule):
        return tau / 1000
    if alpha_bar is not None:
        k = int(round(tau))
        return float(np.sqrt((1 - alpha_bar[k]) / alpha_bar[k]))
    return (tau / 1000) / (1 - tau / 1000) if tau < 1000 else math.inf


@pytest.mark.filterwarnings("ignore:An EDM-trained network")
@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_routing_on_each_pipeline_grid_matches_the_partition(family: Family):
    """B=3, 50 steps of the pipeline's own scheduler: every timestep goes to the group the package's router gives
    its noise level (the partition the module trained with)."""
    groups = (
        [{TB: [0, 2]}, {STB: [0, 1]}, {STB: [1, 2]}] if family.name == "flux"
        else [{TB: [0, 2]}, {TB: [2, 3]}, {TB: [3, 4]}]
    )  # fmt: skip
    boundaries = family.noise.boundaries(3)
    model = routed_transformer(family.build(), groups, boundaries, family.noise)
    scheduler = family.components()["scheduler"]
    scheduler.set_timesteps(50, **({"mu": 0.5} if family.name == "flux" else {}))
    discrete = family.name in ("dit", "pixart")
    alpha_bar = scheduler.alphas_cumprod.double().numpy() if discrete else None
    router = ldb.routing.Router(lambda g: g, family.noise, boundaries)
    seen = set()
    for t in scheduler.timesteps.tolist():
        passed = t / family.timestep_mult  # what the pipeline hands the transformer (Flux: σ = t/1000)
        want = router.group_at(_level(family.noise, float(t), alpha_bar))
        got = model.group_of(torch.tensor([passed]))
        assert got == want, f"timestep {t} went to group {got}, its level to group {want}"
        seen.add(want)
    assert seen == {0, 1, 2}


@pytest.mark.filterwarnings("ignore:DiTPipeline feeds class")
@pytest.mark.parametrize("build", [_dit, _pixart, _sd3, _flux], ids=["dit", "pixart", "sd3", "flux"])
def test_export_keeps_the_trained_dtype(build: Callable[[], nn.Module]):
    """A bfloat16 model exports in bfloat16, positional buffers included, and runs as the trained one does."""
    family = next(f for f in FAMILIES if f.build is build)
    stock = build().to(torch.bfloat16).eval()
    flow = ldb.FlowSchedule()
    groups = [{TB: [0, 2]}, {STB: [0, 2]}] if build is _flux else [{TB: [0, 2]}, {TB: [2, 4]}]
    model = routed_transformer(stock, groups, flow.boundaries(2), flow, pipeline_time="flow")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} <= {torch.bfloat16}
    x = _text(*family.hidden, seed=2).to(torch.bfloat16)
    kwargs = {k: v.to(torch.bfloat16) if isinstance(v, Tensor) and v.is_floating_point() else v
              for k, v in family.forward_kwargs().items()}  # fmt: skip
    t = torch.full((2,), 0.9 if build is _flux else 900.0)  # group 0: the stock model's own blocks and stem
    reference = copy.deepcopy(stock)  # group 0 alone, by trimming: its blocks, the stock stem and head
    for stack in (TB, STB) if build is _flux else (TB,):
        a, b = groups[0].get(stack, [0, 0])
        setattr(reference, stack, nn.ModuleList(list(getattr(stock, stack))[a:b]))
    with torch.no_grad():
        got = model(x, timestep=t, **kwargs).sample
        want = reference(x, timestep=t, **kwargs).sample
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _flux_inputs(seed: int = 11) -> tuple[Tensor, dict[str, Any]]:
    return _text(2, 16, 16, seed=seed), FAMILIES[3].forward_kwargs()


def test_module_export_reads_the_ema_network_and_gives_each_group_its_own_copy_of_an_unsplit_stack():
    """Flux trained with only its double-stream stack split: every group ran the single-stream stack from its own
    stem, so the export runs it whole in every group, from that group's copy; the EMA weights are the ones written."""
    module = ldb.DiffusionBlocksModule(_flux(), ldb.tasks.FlowMatching(), num_blocks=2, block_path=TB, ema_decay=0.9)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in module.ema_network.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model = module_transformer(module)
    assert model.config.group_blocks == [{TB: [0, 1], STB: [0, 2]}, {TB: [1, 2], STB: [0, 2]}]
    assert model.partitioned == [TB]
    ours = {p.data_ptr() for p in model.parameters()}
    assert not ours & {p.data_ptr() for p in module.parameters()}, "the export copies the weights, never aliases them"
    assert not any(p.is_meta for p in model.parameters())
    x, kwargs = _flux_inputs()
    ema, plain = module.ema_network.eval(), module.network.eval()
    for group, sigma in ((0, 0.9), (1, 0.1)):
        t = torch.full((2,), sigma)
        with torch.no_grad():
            got = model(x, timestep=t, **kwargs).sample
            torch.testing.assert_close(got, ema(x, timestep=t, group=group, **kwargs).sample, rtol=0, atol=1e-6)
            assert not torch.allclose(got, plain(x, timestep=t, group=group, **kwargs).sample, atol=1e-3)
    # an end-to-end module exports the stock model itself, with the sampling weights
    module.trained_blockwise.fill_(False)
    stock = module_transformer(module)
    assert type(stock) is diffusers.FluxTransformer2DModel
    with torch.no_grad():
        torch.testing.assert_close(
            stock(x, timestep=torch.full((2,), 0.5), **kwargs).sample,
            ema(x, timestep=torch.full((2,), 0.5), group=None, **kwargs).sample, rtol=0, atol=1e-6,
        )


def test_reverse_import_rebuilds_the_trained_module_and_starts_a_stock_model_block_wise(tmp_path: Path):
    module = _module(FAMILIES[0])  # DiT, DDPM, per-group stems that differ
    to_diffusers(module, tmp_path / "dit")
    with pytest.raises(ValueError, match=r"wrap=lambda model: model"):  # trained over the stock model, not trimmed
        from_diffusers(tmp_path / "dit", ldb.tasks.DDPM())
    back = from_diffusers(tmp_path / "dit", ldb.tasks.DDPM(), wrap=lambda model: model)
    assert back.network.groups == module.network.groups
    assert back.network.stem_mode == "per_group"
    x, t, y = _text(2, 4, 8, 8, seed=1), torch.tensor([900, 900]), torch.tensor([3, 7])
    a, b = module.network.eval(), back.network.eval()
    with torch.no_grad():
        for group in (0, 1):
            assert torch.equal(a(x, timestep=t, class_labels=y, group=group).sample,
                               b(x, timestep=t, class_labels=y, group=group).sample)  # fmt: skip
    with pytest.raises(ValueError, match="drop"):
        from_diffusers(tmp_path / "dit", ldb.tasks.DDPM(), num_blocks=4, wrap=lambda model: model)
    with pytest.raises(ValueError, match="noise formulation"):
        from_diffusers(tmp_path / "dit", ldb.tasks.ImageGeneration(), wrap=lambda model: model)
    # a stock save_pretrained folder: every group starts from its weights
    sd3 = _sd3()
    sd3.save_pretrained(tmp_path / "sd3")
    imported = load_diffusers(tmp_path / "sd3")
    assert imported.stacks == {TB: 4}
    assert imported.group_blocks == []
    fresh = from_diffusers(imported, ldb.tasks.FlowMatching(), num_blocks=2)
    assert isinstance(fresh.network.net, ldb.models.DiffusersNetwork)  # trainable as it comes
    chosen = from_diffusers(imported, ldb.tasks.FlowMatching(), num_blocks=2, block_path=TB)  # the stock stack name
    assert chosen.network.net.diffusionblocks_stack_path == f"model.{TB}"
    assert fresh.network.groups == [[0, 1], [2, 3]]
    state = sd3.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in fresh.network.net.model.state_dict().items())


# ------------------------------------------------------------------ the real path: DiffusersNetwork trained, exported
@dataclass
class Real:
    """A tiny diffusers family trained the way users train it here: wrapped in DiffusersNetwork, block-wise."""

    name: str
    task: Callable[[], ldb.tasks.Task]
    module_kwargs: dict[str, Any]
    pipeline: Callable[[], Any]
    components: Callable[[], dict[str, Any]]
    call: Callable[[], dict[str, Any]]
    missing: tuple[str, ...] = ()


def _prompt(seed: int) -> dict[str, Tensor]:
    from tests.test_diffusers_models import POOLED, TEXT, TOKENS

    return {"prompt_embeds": _text(1, TOKENS, TEXT, seed=seed), "pooled_prompt_embeds": _text(1, POOLED, seed=seed + 1)}


REAL = {
    "sd3": Real(  # 3 layers in 2 groups; shift 1 so that the 3-step grid (1000, 667, 333) reaches both groups
        "sd3", ldb.tasks.FlowMatching, {"num_blocks": 2}, lambda: diffusers.StableDiffusion3Pipeline,
        lambda: {"vae": _vae(0.0609, 1.5305), "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0),
                 **dict.fromkeys(SD3_MISSING)},
        lambda: {**_prompt(1), **{f"negative_{k}": v for k, v in _prompt(3).items()}, "height": 16, "width": 16,
                 "num_inference_steps": 3, "output_type": "np"},
        SD3_MISSING,
    ),  # fmt: skip
    "dit": Real(  # 3 layers in 3 groups, DDPM edges 332.5 and 665.5: DiTPipeline's 3 steps run one group each
        "dit", ldb.tasks.DDPM, {"num_blocks": 3}, lambda: diffusers.DiTPipeline,
        lambda: {"vae": _vae(), "scheduler": diffusers.DDPMScheduler()},
        lambda: {"class_labels": [3, 7], "num_inference_steps": 3, "output_type": "np"},
    ),
    "flux": Real(  # 1 double- + 3 single-stream blocks; group 0 = double 0 + single 0: it spans the seam
        "flux", ldb.tasks.FlowMatching, {"num_blocks": 2, "group_sizes": [2, 2]}, lambda: diffusers.FluxPipeline,
        lambda: {"vae": _vae(0.1159, 0.3611),
                 "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                 **dict.fromkeys(SD3_MISSING[:4])},
        lambda: {**_prompt(1), "height": 16, "width": 16, "num_inference_steps": 3, "output_type": "np"},
        SD3_MISSING[:4],
    ),  # fmt: skip
}


def _train_real(real: Real, root: Path) -> ldb.DiffusionBlocksModule:
    """``DiffusersNetwork`` over the tiny model, trained block-wise for 3 steps with the strategy's defaults."""
    import lightning as L

    from tests.conftest import trainer_kwargs
    from tests.test_diffusers_models import latent_loader, tiny

    model = tiny("dit", num_embeds_ada_norm=1000) if real.name == "dit" else tiny(real.name)  # DiTPipeline's null 1000
    net = ldb.models.DiffusersNetwork(model, sample_size=8 if real.name == "flux" else None)
    module = ldb.DiffusionBlocksModule(net, real.task(), lr=1e-2, **real.module_kwargs)
    L.Trainer(strategy="diffusionblocks", max_steps=3, **trainer_kwargs(root)).fit(
        module, latent_loader(real.name, n=6, batch_size=2)
    )
    return module


@pytest.fixture(scope="module")
def real_exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[ldb.DiffusionBlocksModule, Path]]:
    """Per family, built once for the file: the trained module and its exported pipeline folder."""
    done: dict[str, tuple[ldb.DiffusionBlocksModule, Path]] = {}

    def get(name: str) -> tuple[ldb.DiffusionBlocksModule, Path]:
        if name not in done:
            real, root = REAL[name], tmp_path_factory.mktemp(f"real_{name}")
            module = _train_real(real, root)
            to_diffusers(module, root / "pipe", pipeline=real.pipeline(), components=real.components())
            done[name] = (module, root / "pipe")
        return done[name]

    return get


def _latents_and_conditioning(name: str) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    from tests.test_diffusers_models import text_conditioning

    x = _text(2, 4, 8, 8, seed=21)
    if name == "dit":
        return x, torch.tensor([3, 7]), {}
    return x, None, text_conditioning(2, seed=4, family=name)


def _stock_call(name: str, model: nn.Module, x: Tensor, tau: Tensor, labels: Tensor | None, cond: dict) -> Tensor:
    """The exported transformer called as its pipeline calls it, its output read as the pipeline reads it: DiT's
    learned σ split off (DiTPipeline keeps the first half); Flux's latents packed 2×2 into tokens with FluxPipeline's
    position ids, and unpacked after."""
    if name == "dit":
        return model(x, timestep=tau, class_labels=labels).sample[:, : x.shape[1]]
    if name == "sd3":
        return model(x, timestep=tau, **cond).sample
    n, c, h, w = x.shape
    tokens = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
    rows, cols = torch.arange(h // 2).repeat_interleave(w // 2), torch.arange(w // 2).repeat(h // 2)
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).float()
    txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3)
    out = model(tokens, timestep=tau, img_ids=img_ids, txt_ids=txt_ids, **cond).sample
    return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def _pipeline_timestep(name: str, level: float) -> Tensor:
    """The timestep a stock pipeline passes at the package's level, from each pipeline's convention: DiTPipeline the
    DDPM timestep k itself; SD3's pipeline 1000·s with s the flow time; FluxPipeline s itself."""
    value = {"dit": level, "sd3": 1000.0 * level, "flux": level}[name]
    return torch.full((2,), value, dtype=torch.long if name == "dit" else torch.float32)


def _group_levels(module: ldb.DiffusionBlocksModule) -> list[float]:
    """A level inside each group's slice (group 0 = noisiest): the middle of its boundaries (DDPM: a whole k)."""
    bounds = [float(b) for b in module.boundaries]
    count = len(bounds) - 1
    mids = [(bounds[count - 1 - g] + bounds[count - g]) / 2 for g in range(count)]
    return [float(round(m)) for m in mids] if isinstance(module.task.noise, ldb.DDPMSchedule) else mids


def _stock_blocks(module: ldb.DiffusionBlocksModule, group: int) -> set[tuple[str, int]]:
    """The stock (stack, index) of a group's global layers: double-stream blocks first, then single-stream."""
    doubles = len(module.network.net.model.transformer_blocks._modules)
    return {(TB, i) if i < doubles else (STB, i - doubles) for i in module.network.groups[group]}


@pytest.mark.parametrize("name", list(REAL))
def test_a_trained_diffusers_network_runs_in_its_stock_pipeline_group_by_group(name: str, real_exports, monkeypatch):
    """DiffusersNetwork trained block-wise → to_diffusers → the stock pipeline's from_pretrained → its own scheduler
    and call: each step runs exactly the blocks of the group owning its level, and the exported transformer
    computes, at each group's timestep on the pipeline's scale, what the module's own network computes for that
    group (DiffusersNetwork's time convention agrees with the export's edges; DiT's head reads its group's first
    block, as in training)."""
    module, folder = real_exports(name)
    real = REAL[name]
    monkeypatch.setenv("HF_HOME", str(folder.parent / "hf"))
    loaded = real.pipeline().from_pretrained(folder, **dict.fromkeys(real.missing))
    transformer = loaded.transformer
    assert isinstance(transformer, TimestepRoutedTransformer)
    assert transformer.config.trimmed_stack is True
    network = module.sampling_network.eval()
    x, labels, cond = _latents_and_conditioning(name)
    for group, level in enumerate(_group_levels(module)):
        tau = _pipeline_timestep(name, level)
        routed_group = transformer.group_of(tau)
        assert routed_group == group, f"level {level} (timestep {tau[0]}) routed to {routed_group}"
        with torch.no_grad():
            want = network(x, torch.full((2,), level, dtype=tau.dtype), labels, group=group, **cond)
            got = _stock_call(name, transformer, x, tau, labels, cond)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if module.network.num_groups > 1:  # the groups' stems were trained apart: a wrong stem would show above
        stems = module.network.stems[0].model.state_dict()
        assert any(not torch.equal(v, stems[k]) for k, v in module.network.net.model.state_dict().items() if k in stems)

    calls = _spy(transformer)
    loaded(generator=torch.Generator().manual_seed(0), **real.call())
    assert len(calls) == 3
    seen = []
    for tau_1000, ran in calls:  # the timestep on the 0–1000 scale → the package's level → the module's group
        level = tau_1000 if name == "dit" else tau_1000 / 1000
        owner = int(module.task.noise.group_of(torch.tensor([level], dtype=torch.float64), module.boundaries)[0])
        expected = _stock_blocks(module, owner)
        assert ran == expected, f"timestep {tau_1000} ran {sorted(ran)}, group {owner} is {sorted(expected)}"
        seen.append(owner)
    want_seen = [0, 1, 2] if name == "dit" else [0, 0, 1]
    assert seen == want_seen, f"the 3-step grid reached groups {seen}"


@pytest.mark.parametrize("name", list(REAL))
def test_an_exported_folder_imports_back_as_a_trainable_diffusers_network(name: str, real_exports, tmp_path: Path):
    """from_diffusers without wrap gives DiffusersNetwork: the folder to_diffusers wrote comes back as the module it
    was (groups, per-group stems, trimmed routing), computing the same per group, and trains on."""
    module, folder = real_exports(name)
    back = from_diffusers(folder, REAL[name].task())
    assert isinstance(back.network.net, ldb.models.DiffusersNetwork)
    assert back.network.block_path == module.network.block_path
    assert back.network.groups == module.network.groups
    assert back.network.stem_mode == "per_group"
    if name == "dit":  # the stock model as the network indexes its blocks by their own number: refused, with the fix
        with pytest.raises(ValueError, match=r"default wrap \(DiffusersNetwork\)"):
            from_diffusers(folder, REAL[name].task(), wrap=lambda model: model)
    x, labels, cond = _latents_and_conditioning(name)
    ours, theirs = module.sampling_network.eval(), back.network.eval()
    dtype = torch.long if name == "dit" else torch.float32
    for group, level in enumerate(_group_levels(module)):
        t = torch.full((2,), level, dtype=dtype)
        with torch.no_grad():
            same = torch.equal(ours(x, t, labels, group=group, **cond), theirs(x, t, labels, group=group, **cond))
        assert same, f"group {group} differs after the round trip"
    if name == "dit":  # straight into training: one block-wise step on the imported module
        import lightning as L

        from tests.conftest import trainer_kwargs
        from tests.test_diffusers_models import latent_loader

        before = [p.detach().clone() for p in back.train().parameters()]
        L.Trainer(strategy="diffusionblocks", max_steps=1, **trainer_kwargs(tmp_path)).fit(
            back, latent_loader(name, n=2, batch_size=2)
        )
        assert any(not torch.equal(a, b) for a, b in zip(before, back.parameters()))
