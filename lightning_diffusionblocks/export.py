"""Export a block-wise trained diffusers transformer to a stock diffusers pipeline, and import one back.

A model trained with DiffusionBlocks is B groups of blocks, each owning a slice of noise levels. Stock pipelines
(``DiTPipeline``, ``PixArtAlphaPipeline``, ``StableDiffusion3Pipeline``, ``FluxPipeline``, …) call their transformer
once per step with the step's timestep; :class:`TimestepRoutedTransformer` is a diffusers model that, at each call,
finds the group owning that timestep and runs only that group's blocks (with its own stem and head when stems are
per group). The pipelines, their schedulers and their call code stay unchanged: no new inference code.

**Group edges on the pipeline's timestep scale.** The package cuts noise levels in its own formulation (EDM σ,
rectified-flow t, DDPM timestep k; ascending boundaries, group 0 = the highest levels). Every formulation is a
scaled EDM state ``x + σ·ε``, so each level has an EDM σ (EDM: σ; flow: σ = t/(1 − t); DDPM: σ_k = √((1 − ᾱ_k)/ᾱ_k)),
and σ is increasing in each of them, so the order of groups is kept by any of these maps. A pipeline's timestep τ
lives on one of two scales:

* ``"discrete"`` (DiT, PixArt-α: DDPM-family schedulers): τ = k ∈ {0, …, T − 1} with the scheduler's own ᾱ_k. A
  DDPM-trained model keeps its half-step boundaries (same T). From σ_b (EDM or flow): the edge is ``n_b − 0.5``,
  n_b = #{k : σ_k ≤ σ_b}, so timestep k goes to the lower-noise group exactly when σ_k ≤ σ_b (the package puts a
  level on a boundary in the lower-noise group). ᾱ comes from the scheduler's β schedule because that is the
  schedule the pipeline noises and denoises with.
* ``"flow"`` (SD3, Flux, Sana: ``FlowMatchEulerDiscreteScheduler``): τ = 1000·s with x = (1 − s)·x₀ + s·ε, which is
  the package's flow time, so the edge is 1000·t_b; from EDM σ_b: s = σ_b/(1 + σ_b) (x/(1 − s) = x₀ + σε with
  σ = s/(1 − s)). Flux's pipeline passes s itself (its transformer multiplies by 1000): ``timestep_mult=1000``.

Routing follows the partition exactly; whether the *outputs* mean what the pipeline's scheduler expects depends on
how the network was trained: a DDPM ε-prediction model fits a DDPM-family scheduler, a flow velocity model fits
``FlowMatchEulerDiscreteScheduler``. An EDM-trained network predicts under EDM's preconditioning, which no stock
scheduler applies (:func:`routed_transformer` warns).

:func:`to_diffusers` writes the model's ``save_pretrained`` folder (or a whole pipeline folder) plus a two-line module
named by the config's ``auto_map``, so ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` loads
it in a process that has not imported this package; ``Pipeline.from_pretrained(folder)`` loads it once this module
is imported. The reverse, :func:`load_diffusers`, reads a local diffusers folder (``save_pretrained`` output, a
pipeline folder or its ``transformer`` folder; never a download) and reports its stacks; :func:`from_diffusers`
builds the :class:`~lightning_diffusionblocks.module.DiffusionBlocksModule` that trains it (the model wrapped in
:class:`~lightning_diffusionblocks.models.DiffusersNetwork` unless told otherwise), or, for a folder written here,
the module it was exported from (groups, per-group stems).

Groups run as the network ran them in training: ``DiffusersNetwork`` runs each group as the stock model trimmed to
its blocks (DiT's head reads the group's first block's embedder), so its export is routed the same way
(``trimmed_stack``). A module trained with per-group LoRA is exported with its adapters folded into the weights, on
a copy (the module keeps them).
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from lightning_diffusionblocks.ddpm import cosine_betas, linear_betas
from lightning_diffusionblocks.levels import NoiseLevels
from lightning_diffusionblocks.lora import has_adapters, merged_network
from lightning_diffusionblocks.partition import BlockStack

try:
    import diffusers
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
    from diffusers.models.cache_utils import CacheMixin
except ImportError as _err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "lightning_diffusionblocks.export needs diffusers: `pip install 'lightning-diffusionblocks[diffusers]'`."
    ) from _err

from lightning_diffusionblocks.models.diffusers_net import DiffusersNetwork
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.tasks.base import Task

PipelineTime = Literal["discrete", "flow"]

#: the timestep scale each stock transformer's pipeline calls it on, and the factor to the 0–1000 scale
KNOWN_TIME: dict[str, tuple[PipelineTime, float]] = {
    "DiTTransformer2DModel": ("discrete", 1.0),
    "PixArtTransformer2DModel": ("discrete", 1.0),
    "SD3Transformer2DModel": ("flow", 1.0),
    "FluxTransformer2DModel": ("flow", 1000.0),  # FluxPipeline passes σ = t/1000; the model multiplies by 1000
    "SanaTransformer2DModel": ("flow", 1.0),  # SanaPipeline passes t·timestep_scale (divided out below)
}

#: where stock diffusers transformers keep their block stacks, in the order their forward runs them
STACK_NAMES = ("transformer_blocks", "single_transformer_blocks", "layers", "blocks")

#: the label DiTPipeline passes for "no class" under classifier-free guidance (hard-coded there)
DIT_NULL_LABEL = 1000

#: the DDPMScheduler defaults (what DiTPipeline's and PixArt-α's published schedulers use)
DEFAULT_DISCRETE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------- edge conversion
def scheduler_alpha_bar(config: Mapping[str, Any] | Any) -> Tensor:
    """ᾱ_k, k = 0 … T − 1, of a diffusers discrete scheduler (its config or the scheduler), float64.

    ``linear``: β evenly spaced; ``scaled_linear``: √β evenly spaced; ``squaredcos_cap_v2``: the cosine schedule;
    ``trained_betas``: as given.
    """
    cfg = dict(getattr(config, "config", config))
    steps = int(cfg.get("num_train_timesteps", 1000))
    trained = cfg.get("trained_betas")
    schedule = cfg.get("beta_schedule", "linear")
    start, end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = linear_betas(steps, start, end)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = cosine_betas(steps)
    else:
        raise ValueError(
            f"beta_schedule {schedule!r} of the pipeline's scheduler is not one the export converts edges for; use a"
            " scheduler with beta_schedule='linear', 'scaled_linear' or 'squaredcos_cap_v2' (or trained_betas)."
        )
    return torch.cumprod(1 - betas, dim=0)


def _sigma_of(alpha_bar: Tensor) -> Tensor:
    """σ_k = √((1 − ᾱ_k)/ᾱ_k) of a discrete scheduler's ᾱ."""
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def _edm_sigma(noise: NoiseLevels, levels: Tensor) -> Tensor:
    """The EDM σ of the levels, as the formulation defines it (``NoiseLevels.edm_sigma``)."""
    try:
        return torch.as_tensor(noise.edm_sigma(levels), dtype=torch.float64)
    except NotImplementedError as err:
        raise ValueError(f"The export cannot place group edges on a pipeline's timesteps: {err}") from None


def pipeline_edges(
    noise: NoiseLevels,
    boundaries: Sequence[float] | Tensor,
    time: PipelineTime,
    scheduler: Mapping[str, Any] | Any | None = None,
) -> list[float]:
    """The B − 1 inner group edges, ascending, on the pipeline's 0–1000 timestep scale (see the module docstring).

    Args:
        noise: the formulation the model was trained in (the task's ``noise``).
        boundaries: its B + 1 ascending boundaries (the module's ``boundaries``).
        time: ``"discrete"`` (DDPM-family scheduler, τ = k) or ``"flow"`` (flow matching, τ = 1000·s).
        scheduler: for ``"discrete"``, the pipeline's scheduler or its config (its β schedule gives ᾱ); default the
            DDPM model's own schedule, else :data:`DEFAULT_DISCRETE_SCHEDULER`.
    """
    bounds = torch.as_tensor(boundaries, dtype=torch.float64).reshape(-1)
    if len(bounds) < 2 or not bool((bounds[1:] > bounds[:-1]).all()):
        raise ValueError(
            f"Group boundaries must be B + 1 strictly ascending noise levels, got {bounds.tolist()}; pass the module's"
            " own `module.boundaries` (task.noise.boundaries(num_blocks, partition))."
        )
    inner = bounds[1:-1]
    if time not in ("discrete", "flow"):
        raise ValueError(f"Unknown pipeline time {time!r}; use 'discrete' (DiT, PixArt) or 'flow' (SD3, Flux, Sana).")
    if noise.pipeline_time == "discrete":  # levels are the scheduler's own timesteps
        steps_trained = int(getattr(noise, "num_timesteps", 0))
        if time != "discrete":
            raise ValueError(
                "A DDPM-trained model's levels are discrete timesteps: export it to a pipeline with a DDPM-family"
                " scheduler (pipeline_time='discrete', e.g. DiTPipeline or PixArtAlphaPipeline)."
            )
        cfg = dict(getattr(scheduler, "config", scheduler)) if scheduler is not None else None
        steps = int(cfg.get("num_train_timesteps", 1000)) if cfg is not None else steps_trained
        if steps != steps_trained:
            raise ValueError(
                f"The model was trained on {steps_trained} timesteps but the pipeline's scheduler has"
                f" num_train_timesteps={steps}; give it a scheduler with num_train_timesteps={steps_trained}."
            )
        trained_sigma = _edm_sigma(noise, torch.arange(steps_trained, dtype=torch.float64))
        if cfg is not None and not torch.allclose(_sigma_of(scheduler_alpha_bar(cfg)), trained_sigma, rtol=1e-6):
            rank_zero_warn(
                "The pipeline's scheduler has another beta schedule than the DDPM model was trained with: routing"
                " follows timesteps, but the noise levels the pipeline means by them differ. Give the pipeline a"
                " scheduler with the training schedule's betas."
            )
        return [float(b) for b in inner]
    if time == "flow" and noise.pipeline_time == "flow":
        return [float(1000.0 * t) for t in inner]  # the pipeline's s is the package's t: no round trip through σ
    sigma = _edm_sigma(noise, inner)
    if time == "flow":
        return [float(1000.0 * s / (1 + s)) for s in sigma]
    sigma_k = _sigma_of(scheduler_alpha_bar(DEFAULT_DISCRETE_SCHEDULER if scheduler is None else scheduler))
    return [float((sigma_k <= s).sum()) - 0.5 for s in sigma]


# ---------------------------------------------------------------------------------------------- the routed model
class RoutedStack(BlockStack):
    """A stock block stack that runs one group's blocks: the package's own :class:`BlockStack` (what trained the
    groups), given each group's ``[start, stop)`` in this stack. Iteration yields the active group's blocks (all of
    them when none is active); the state-dict keys stay ``<stack>.<i>.…``. Integer indexing is the training's too:
    ``trimmed`` (a network that ran each group as the model trimmed to its blocks, as
    :class:`~lightning_diffusionblocks.models.DiffusersNetwork` does) makes ``stack[0]`` and ``len(stack)`` the
    active group's, so DiT's head reads the group's first block's embedder; otherwise ``transformer_blocks[0]`` is
    block 0 whatever group runs.
    """

    def __init__(self, blocks: Sequence[nn.Module], ranges: Sequence[Sequence[int]], trimmed: bool = False) -> None:
        spans = [(int(r[0]), int(r[1])) for r in ranges]
        super().__init__(nn.ModuleList(blocks), [list(range(a, b)) for a, b in spans], trimmed=trimmed)
        self.ranges = spans


def _stock_class(name: str) -> type[ModelMixin]:
    """A diffusers model class by name; nothing outside diffusers is ever resolved (the config is data)."""
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(f"{name!r} is not a diffusers model class; the routed model wraps a stock diffusers model.")
    return cls


def _check_groups(stacks: Mapping[str, int], group_blocks: Sequence[Mapping[str, Sequence[int]]]) -> set[str]:
    """Every block of every stack in exactly one group, each group non-empty; clear errors otherwise. A stack that
    every group runs whole (one the training left outside its block stack, so part of each group's stem) is
    allowed and owned by no group; these shared stacks are returned."""
    example = "[{'transformer_blocks': [0, 2]}, {'transformer_blocks': [2, 4]}]"
    shared = {s for s, n in stacks.items() if all(list(g.get(s, [0, 0])) == [0, n] for g in group_blocks)}
    if len(group_blocks) == 1:
        shared = set()
    owner: dict[tuple[str, int], int] = {}
    for g, ranges in enumerate(group_blocks):
        count = 0
        for stack, span in ranges.items():
            if stack in shared:
                continue
            if stack not in stacks:
                raise ValueError(f"Group {g} names stack {stack!r}; the model's stacks are {sorted(stacks)}.")
            if len(span) != 2 or not 0 <= span[0] <= span[1] <= stacks[stack]:
                raise ValueError(
                    f"Group {g}'s range {list(span)} of {stack!r} is not [start, stop) inside its {stacks[stack]}"
                    f" blocks; give half-open ranges per stack, e.g. {example}."
                )
            for i in range(*span):
                if (stack, i) in owner:
                    raise ValueError(
                        f"Block {stack}.{i} is in groups {owner[(stack, i)]} and {g}; groups must not overlap."
                    )
                owner[(stack, i)] = g
                count += 1
        if count == 0:
            raise ValueError(f"Group {g} holds no block; every group needs at least one.")
    missing = [f"{s}.{i}" for s, n in stacks.items() if s not in shared for i in range(n) if (s, i) not in owner]
    if missing:
        raise ValueError(f"Blocks {missing} are in no group; the groups must cover every block, e.g. {example}.")
    return shared


class TimestepRoutedTransformer(ModelMixin, ConfigMixin, CacheMixin):
    """A stock diffusers transformer whose every call runs only the group owning the call's timestep.

    ``transformer`` is the stock model (state-dict keys ``transformer.<stock key>``: the trained weights, group 0's
    stem and head); ``stems[g − 1]`` holds group g's own stem and head when stems were per group. Pipelines read the
    stock model's config keys (``in_channels``, ``sample_size``, ``patch_size``, …) from this model's config.

    Args:
        base_class: the diffusers class of the stock model (e.g. ``"SD3Transformer2DModel"``).
        base_config: its constructor config.
        group_blocks: per group (0 = noisiest), ``{stack: [start, stop)}`` of the blocks it runs; a Flux group may
            hold the end of ``transformer_blocks`` and the start of ``single_transformer_blocks``.
        edges: the B − 1 ascending group edges on the 0–1000 timestep scale (:func:`pipeline_edges`).
        timestep_mult: the factor from the timestep the pipeline passes to that scale (1000 for Flux).
        group_stems: True when every group has its own stem and head (``stems``; a stack every group runs whole is
            part of each group's stem, as in training).
        pipeline_time: the pipeline's timestep scale, ``"discrete"`` or ``"flow"`` (a record of what the edges mean).
        trimmed_stack: each group runs as the stock model trimmed to its blocks (integer indices and ``len`` of a
            stack are the group's; :class:`RoutedStack`), as the network trained it; False for exports that predate
            it and for networks that index blocks by their own number.
    """

    _supports_gradient_checkpointing = False

    @classmethod
    def extract_init_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """The stock config keys this model re-registers for pipelines are not arguments of its own: leave them out
        on reload (they come back from ``base_config``) instead of warning that they are ignored."""
        drop = {*(config_dict.get("base_config") or {}), "auto_map"}
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k not in drop}, **kwargs)

    @register_to_config
    def __init__(
        self,
        base_class: str = "DiTTransformer2DModel",
        base_config: dict[str, Any] | None = None,
        group_blocks: list[dict[str, list[int]]] | None = None,
        edges: list[float] | None = None,
        timestep_mult: float = 1.0,
        group_stems: bool = False,
        pipeline_time: str = "discrete",
        trimmed_stack: bool = False,
    ) -> None:
        super().__init__()
        base_config = dict(base_config or {})
        stock = _stock_class(base_class)
        self.transformer = stock.from_config(base_config)
        stacks = {name: len(getattr(self.transformer, name)) for name in self.stack_names(self.transformer)}
        groups = [dict(g) for g in group_blocks] if group_blocks else [{s: [0, n] for s, n in stacks.items()}]
        shared = _check_groups(stacks, groups)
        edges = [float(e) for e in edges or []]
        if len(edges) != len(groups) - 1 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(
                f"{len(groups)} groups need {len(groups) - 1} strictly ascending edges, got {edges}; compute them with"
                " pipeline_edges(noise, boundaries, time)."
            )
        if pipeline_time not in ("discrete", "flow"):
            raise ValueError(f"pipeline_time must be 'discrete' or 'flow', got {pipeline_time!r}.")
        if not timestep_mult > 0:
            raise ValueError(f"timestep_mult must be positive (1000 for Flux, else 1), got {timestep_mult}.")
        self._stacks = list(stacks)
        #: the stacks split among the groups (the others are run whole by every group, from its own stem)
        self.partitioned = [name for name in self._stacks if name not in shared]
        for name in self._stacks:
            ranges = [g.get(name, [0, 0]) for g in groups]
            setattr(self.transformer, name, RoutedStack(list(getattr(self.transformer, name)), ranges, trimmed_stack))
        self.stems = nn.ModuleList()
        if group_stems:
            for _ in range(1, len(groups)):
                holder = stock.from_config(base_config)
                for name in self.partitioned:
                    setattr(holder, name, nn.ModuleList())
                self.stems.append(holder)
        # the stock config keys pipelines read (in_channels, sample_size, patch_size, guidance_embeds, …)
        self.register_to_config(**{k: v for k, v in base_config.items() if not k.startswith("_")})

    @staticmethod
    def stack_names(model: nn.Module) -> list[str]:
        """The block stacks of a stock diffusers model, in the order its forward runs them."""
        return [n for n in STACK_NAMES if isinstance(getattr(model, n, None), nn.ModuleList) and len(getattr(model, n))]

    @property
    def num_groups(self) -> int:
        return len(self.config["edges"]) + 1

    def group_of(self, timestep: Tensor | float) -> int:
        """The group owning a timestep as the pipeline passes it (a timestep on an edge: the lower-noise group)."""
        t = torch.as_tensor(timestep, dtype=torch.float64).reshape(-1)
        if t.numel() == 0:
            raise ValueError("The routed model needs a timestep: call it as the pipeline does, model(x, timestep=t).")
        edges, mult = self.config["edges"], self.config["timestep_mult"]
        groups = {len(edges) - bisect.bisect_left(edges, float(v) * mult) for v in t.tolist()}
        if len(groups) > 1:
            raise ValueError(
                f"The timesteps of one call belong to groups {sorted(groups)}; a block-wise model runs one group per"
                " call. Call it once per timestep (stock pipelines pass one timestep per step)."
            )
        return groups.pop()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The stock model's forward, called as the stock model is, with only the group owning its ``timestep``
        active (that group's stem and head too)."""
        timestep = kwargs.get("timestep")
        if timestep is None and args:  # passed by position: where the stock signature puts it
            bound = inspect.signature(self.transformer.forward).bind_partial(*args, **kwargs)
            timestep = bound.arguments.get("timestep")
        if timestep is None:
            raise ValueError("The routed model needs a timestep: call it as the pipeline does, model(x, timestep=t).")
        group = self.group_of(timestep.detach().cpu() if isinstance(timestep, Tensor) else timestep)
        stacks = [getattr(self.transformer, name) for name in self._stacks]
        for stack in stacks:
            stack.active = group
        try:
            if group == 0 or not len(self.stems):
                return self.transformer(*args, **kwargs)
            holder = self.stems[group - 1]
            swap = dict(holder.named_parameters())
            swap.update(holder.named_buffers())
            return functional_call(self.transformer, swap, args, kwargs, strict=False, tie_weights=False)
        finally:
            for stack in stacks:
                stack.active = None


# ---------------------------------------------------------------------------------------------- export
def _time_of(model: nn.Module, time: PipelineTime | None, timestep_mult: float | None) -> tuple[PipelineTime, float]:
    name = type(model).__name__
    known = KNOWN_TIME.get(name)
    if time is None:
        if known is None:
            raise ValueError(
                f"The pipeline timestep scale of {name} is not known; pass pipeline_time='discrete' (DDPM-family"
                " scheduler, timesteps 0–999) or 'flow' (flow matching, 1000·σ), and timestep_mult if the pipeline"
                " passes σ itself (Flux: 1000)."
            )
        time = known[0]
    if timestep_mult is None:
        timestep_mult = known[1] if known is not None and known[0] == time else 1.0
        if name == "SanaTransformer2DModel":
            timestep_mult /= float(getattr(model.config, "timestep_scale", 1.0))
    return time, float(timestep_mult)


def routed_transformer(
    transformer: nn.Module,
    group_blocks: Sequence[Mapping[str, Sequence[int]]],
    boundaries: Sequence[float] | Tensor,
    noise: NoiseLevels,
    *,
    stems: Sequence[nn.Module | Mapping[str, Tensor]] | None = None,
    pipeline_time: PipelineTime | None = None,
    timestep_mult: float | None = None,
    scheduler: Mapping[str, Any] | Any | None = None,
    trimmed_stack: bool = False,
) -> TimestepRoutedTransformer:
    """The routed model of a trained stock transformer, described explicitly (the lower level of :func:`to_diffusers`).

    Args:
        transformer: the trained stock diffusers model (its stacks hold every group's blocks; its stem and head are
            group 0's, or every group's when stems are shared).
        group_blocks: per group (0 = noisiest), ``{stack: (start, stop)}`` of its blocks.
        boundaries: the B + 1 ascending boundaries in the package's levels (``module.boundaries``).
        noise: the formulation they are levels of (``module.task.noise``).
        stems: groups 1 … B − 1's own stem and head (per-group stems): each a model or state dict with the stock
            model's keys (entries of the stacks split among groups are ignored; a stack every group runs whole is
            part of the stem); None when the stem is shared.
        pipeline_time, timestep_mult: the pipeline's timestep scale; default known per diffusers class.
        scheduler: the pipeline's scheduler (or its config), for the ᾱ of a discrete pipeline.
        trimmed_stack: the groups were trained as the stock model trimmed to their blocks (see
            :class:`TimestepRoutedTransformer`; what :class:`~lightning_diffusionblocks.models.DiffusersNetwork`
            trains); default False: a stack's integer indices are the blocks' own.
    """
    if not isinstance(transformer, ModelMixin):
        raise TypeError(
            f"to_diffusers exports diffusers transformers; got {type(transformer).__name__}. Train a diffusers model"
            " (e.g. SD3Transformer2DModel) to export it to a stock pipeline."
        )
    stock: Any = transformer  # a diffusers model: its config, weights and dtype are read below
    time, mult = _time_of(stock, pipeline_time, timestep_mult)
    if noise.pipeline_time is None:
        rank_zero_warn(
            f"A network trained in {type(noise).__name__}'s {noise.level_name} predicts under a parameterisation"
            " (EDM's preconditioning) that stock diffusers schedulers do not"
            " apply: the export routes every timestep to its group, but the pipeline's samples are only right for"
            " models trained with the scheduler's own parameterisation (DDPM ε/v for discrete pipelines, flow"
            " velocity for flow pipelines)."
        )
    rows = dict(stock.config).get("num_embeds_ada_norm")
    if type(stock).__name__ == "DiTTransformer2DModel" and isinstance(rows, int) and rows < DIT_NULL_LABEL:
        rank_zero_warn(
            f"DiTPipeline feeds class {DIT_NULL_LABEL} as 'no class' for classifier-free guidance, but this DiT has"
            f" {rows} classes (num_embeds_ada_norm={rows}): call the pipeline with guidance_scale=1, or train a DiT"
            f" with num_embeds_ada_norm={DIT_NULL_LABEL} (its classes first, row {DIT_NULL_LABEL} the null class)."
        )
    edges = pipeline_edges(noise, boundaries, time, scheduler)
    groups = [{s: [int(span[0]), int(span[1])] for s, span in g.items()} for g in group_blocks]
    if len(groups) != len(edges) + 1:
        raise ValueError(f"{len(groups)} groups but {len(edges) + 2} boundaries; give B groups and B + 1 boundaries.")
    if stems is not None and len(stems) != len(groups) - 1:
        raise ValueError(f"stems holds {len(stems)} entries; give one per group after the first ({len(groups) - 1}).")
    base_config = {k: v for k, v in dict(stock.config).items() if not k.startswith("_")}
    with _empty_weights():
        routed = TimestepRoutedTransformer(
            base_class=type(stock).__name__, base_config=base_config, group_blocks=groups, edges=edges,
            timestep_mult=mult, group_stems=stems is not None and len(groups) > 1, pipeline_time=time,
            trimmed_stack=bool(trimmed_stack),
        )  # fmt: skip
    _load_copy(routed.transformer, stock.state_dict())
    stack_prefixes = tuple(f"{s}." for s in routed.partitioned)
    for holder, stem in zip(routed.stems, stems or []):
        state = stem.state_dict() if isinstance(stem, nn.Module) else stem
        _load_copy(holder, {k: v for k, v in state.items() if not k.startswith(stack_prefixes)})
    return routed.eval()


def _empty_weights() -> contextlib.AbstractContextManager[Any]:
    """Parameters on the meta device while an export is built, since its weights are copied in right after: no
    second float32 allocation of the whole model (accelerate's ``init_empty_weights``; buffers are built for real,
    so those outside the state dict keep their values). Without accelerate the model is built normally."""
    try:
        from accelerate import init_empty_weights
    except ImportError:  # pragma: no cover - accelerate comes with the diffusers extra
        return contextlib.nullcontext()
    return init_empty_weights(include_buffers=False)


def _load_copy(target: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copies of ``state``'s tensors become ``target``'s weights (their dtype and device, not aliases of the trained
    ones); every parameter must be given. Buffers outside the state dict (positional tables) follow the weights'
    device and floating dtype, as ``model.to(device, dtype)`` would have moved them in the trained model."""
    target.load_state_dict({k: v.detach().clone() for k, v in state.items()}, assign=True)
    empty = [name for name, p in target.named_parameters() if p.is_meta]
    if empty:
        raise ValueError(f"The trained weights lack {empty[:5]}; the export's stock model does not match the network.")
    weight = next((v for v in state.values() if v.is_floating_point()), None)
    if weight is None:
        return
    for sub in target.modules():
        for name, buf in sub._buffers.items():
            if buf is not None:
                dtype = weight.dtype if buf.is_floating_point() else buf.dtype
                sub._buffers[name] = buf.to(device=weight.device, dtype=dtype)


def _inner_model(net: nn.Module) -> tuple[str, Any]:
    """The outermost diffusers model in ``net`` (``net`` itself or the one a wrapper holds), with its path."""
    for name, sub in net.named_modules():
        if isinstance(sub, ModelMixin):
            return name, sub
    raise TypeError(
        f"The module's network ({type(net).__name__}) holds no diffusers model; to_diffusers exports diffusers"
        " transformers (DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel,"
        " FluxTransformer2DModel, …)."
    )


def _group_blocks(network: Any, inner: nn.Module) -> list[dict[str, list[int]]]:
    """Per group, the [start, stop) of its blocks in each stock stack, found by the identity of the blocks (so a
    wrapper presenting several stock stacks as one stack maps back to them)."""
    where: dict[int, tuple[str, int]] = {}
    for stack in TimestepRoutedTransformer.stack_names(inner):
        for i, block in enumerate(getattr(inner, stack)._modules.values()):
            where[id(block)] = (stack, i)
    modules = list(network.stack._modules.values())
    out: list[dict[str, list[int]]] = []
    for g, layers in enumerate(network.groups):
        spans: dict[str, list[int]] = {}
        for layer in layers:
            if id(modules[layer]) not in where:
                raise ValueError(
                    f"Layer {layer} of group {g} is not a block of the diffusers model's stacks"
                    f" {TimestepRoutedTransformer.stack_names(inner)}; train with block_path naming one of them."
                )
            stack, i = where[id(modules[layer])]
            span = spans.setdefault(stack, [i, i])
            if i != span[1]:
                raise ValueError(
                    f"Group {g}'s blocks of {stack!r} are not contiguous; the export needs contiguous groups."
                )
            span[1] = i + 1
        out.append(spans)
    for stack in TimestepRoutedTransformer.stack_names(inner):  # a stack left outside the package's: run by all
        if not any(stack in spans for spans in out):
            for spans in out:
                spans[stack] = [0, len(getattr(inner, stack))]
    return out


def module_transformer(
    module: DiffusionBlocksModule,
    *,
    pipeline_time: PipelineTime | None = None,
    timestep_mult: float | None = None,
    scheduler: Mapping[str, Any] | Any | None = None,
) -> nn.Module:
    """The model :func:`to_diffusers` writes for ``module``: a :class:`TimestepRoutedTransformer` of its sampling
    network (EMA weights when kept), or, for an end-to-end trained module, a copy of the stock transformer.

    A module trained with per-group LoRA (``lora=GroupLoRA(...)``) is exported with every group's adapter folded
    into its weights (:func:`~lightning_diffusionblocks.lora.merged_network`, on a copy: the module keeps its
    adapters), since a stock pipeline runs plain layers. The groups are routed as the network ran them (a network
    that trims its stack to the running group, like ``DiffusersNetwork``, is exported trimmed).
    """
    network = module.sampling_network
    if has_adapters(network):
        network = merged_network(network)
    path, inner = _inner_model(network.net)
    if not module.blockwise:
        return _copy_stock(inner)
    stems = None
    if network.stem_mode == "per_group" and network.num_groups > 1:
        stems = [holder.get_submodule(path) if path else holder for holder in network.stems]
    return routed_transformer(
        inner, _group_blocks(network, inner), module.boundaries, module.task.noise, stems=stems,
        pipeline_time=pipeline_time, timestep_mult=timestep_mult, scheduler=scheduler,
        trimmed_stack=bool(getattr(network.stack, "trimmed", False)),
    )  # fmt: skip


def _copy_stock(inner: Any) -> nn.Module:
    """A plain stock copy of ``inner`` (its stacks back to ``nn.ModuleList``), with the same weights."""
    config = {k: v for k, v in dict(inner.config).items() if not k.startswith("_")}
    with _empty_weights():
        copy = type(inner).from_config(config)
    _load_copy(copy, inner.state_dict())
    return copy.eval()


def to_diffusers(
    module: DiffusionBlocksModule,
    directory: str | Path,
    *,
    pipeline: type | None = None,
    components: Mapping[str, Any] | None = None,
    pipeline_time: PipelineTime | None = None,
    timestep_mult: float | None = None,
    safe_serialization: bool = True,
) -> nn.Module:
    """Write ``module``'s trained diffusers transformer where stock pipelines load it, routed by timestep.

    Without ``pipeline`` the model's own ``save_pretrained`` folder is written (load it with
    ``TimestepRoutedTransformer.from_pretrained(directory)`` and hand it to a pipeline); with ``pipeline`` (e.g.
    ``StableDiffusion3Pipeline``) and its other ``components`` (scheduler, vae, text encoders…) the whole pipeline
    folder, loadable with ``pipeline.from_pretrained(directory, …)`` once ``lightning_diffusionblocks.export`` is
    imported. The pipeline's ``scheduler`` (if given) sets the ᾱ of a discrete pipeline's edges. Returns the model
    written.
    """
    components = dict(components or {})
    model = module_transformer(
        module, pipeline_time=pipeline_time, timestep_mult=timestep_mult, scheduler=components.get("scheduler")
    )
    if pipeline is None:
        if components:
            raise ValueError("components are the other parts of a pipeline; pass pipeline=<its class> with them.")
        model.save_pretrained(str(directory), safe_serialization=safe_serialization)
        folder = Path(directory)
    else:
        pipe = pipeline(transformer=model, **components)
        pipe.save_pretrained(str(directory), safe_serialization=safe_serialization)
        folder = Path(directory) / "transformer"
    if isinstance(model, TimestepRoutedTransformer):
        add_remote_code(folder)
    return model


#: the module file :func:`add_remote_code` writes next to a routed model's weights
REMOTE_CODE_FILE = "diffusionblocks_routed.py"


def add_remote_code(folder: str | Path) -> None:
    """Let ``diffusers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` load a routed model in a process
    that has not imported this package: a two-line module importing :class:`TimestepRoutedTransformer` from the
    installed package, named by the config's ``auto_map``. (A pipeline folder's ``model_index.json`` keeps the
    class's own module path, so ``Pipeline.from_pretrained`` works once ``lightning_diffusionblocks.export`` is
    imported, which loading the model this way does.)"""
    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != TimestepRoutedTransformer.__name__:
        raise ValueError(f"{folder} does not hold a {TimestepRoutedTransformer.__name__}; write it with to_diffusers.")
    (folder / REMOTE_CODE_FILE).write_text(
        '"""Loads the block-wise model this folder holds from the installed lightning_diffusionblocks."""\n\n'
        "from lightning_diffusionblocks.export import TimestepRoutedTransformer\n\n"
        "__all__ = ['TimestepRoutedTransformer']\n"
    )
    config["auto_map"] = {"AutoModel": f"{Path(REMOTE_CODE_FILE).stem}.{TimestepRoutedTransformer.__name__}"}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------- import
@dataclass
class DiffusersImport:
    """A diffusers transformer read from a local directory.

    Attributes:
        model: the loaded model (a stock transformer, or a :class:`TimestepRoutedTransformer` this package wrote).
        stacks: its block stacks and their lengths, in the order its forward runs them.
        group_blocks, edges: the routed model's groups and edges (empty for a stock model).
    """

    model: nn.Module
    stacks: dict[str, int]
    group_blocks: list[dict[str, list[int]]] = field(default_factory=list)
    edges: list[float] = field(default_factory=list)

    @property
    def transformer(self) -> nn.Module:
        """The stock transformer (for a routed export: its inner model, with group 0's stem and every block)."""
        return self.model.transformer if isinstance(self.model, TimestepRoutedTransformer) else self.model


def load_diffusers(source: str | Path | nn.Module, subfolder: str | None = None, **kwargs: Any) -> DiffusersImport:
    """Read a diffusers transformer from a local directory (never downloads) and report its stacks.

    ``source`` is a ``save_pretrained`` folder of a transformer, a pipeline folder (its ``transformer`` subfolder is
    read unless ``subfolder`` says otherwise), or an already built diffusers model. ``kwargs`` go to
    ``from_pretrained`` (e.g. ``torch_dtype``).
    """
    if isinstance(source, nn.Module):
        model = source
    else:
        root = Path(source)
        if not root.is_dir():
            raise FileNotFoundError(
                f"{source} is not a local directory. load_diffusers reads local folders only; download a Hub model"
                " first (huggingface_hub.snapshot_download(repo_id)) and pass its folder."
            )
        if subfolder is None and (root / "model_index.json").is_file():
            subfolder = "transformer"
        folder = root / subfolder if subfolder else root
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{folder} holds no config.json; pass a save_pretrained folder of a transformer.")
        class_name = json.loads(config_file.read_text()).get("_class_name", "")
        routed = class_name == TimestepRoutedTransformer.__name__
        cls = TimestepRoutedTransformer if routed else _stock_class(class_name)
        model = cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    if not isinstance(model, ModelMixin):
        raise TypeError(f"load_diffusers reads diffusers models; got {type(model).__name__}.")
    inner = model.transformer if isinstance(model, TimestepRoutedTransformer) else model
    stacks = {name: len(getattr(inner, name)) for name in TimestepRoutedTransformer.stack_names(inner)}
    if not stacks:
        raise ValueError(
            f"{type(inner).__name__} has none of the block stacks {STACK_NAMES}; it cannot be trained block-wise."
        )
    if isinstance(model, TimestepRoutedTransformer):
        return DiffusersImport(model, stacks, [dict(g) for g in model.config.group_blocks], list(model.config.edges))
    return DiffusersImport(model, stacks)


def from_diffusers(
    source: str | Path | nn.Module | DiffusersImport,
    task: Task,
    *,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
    subfolder: str | None = None,
    scheduler: Mapping[str, Any] | Any | None = None,
    **module_kwargs: Any,
) -> DiffusionBlocksModule:
    """A :class:`DiffusionBlocksModule` over a diffusers transformer read from a local folder (:func:`load_diffusers`).

    A stock transformer starts every group from its weights (fine-tuning block-wise): ``module_kwargs`` set
    ``num_blocks``, ``group_sizes``, ``stem`` …; ``block_path`` names the stock model's stacks to cut
    (``"transformer_blocks"``, ``"transformer_blocks+single_transformer_blocks"``), default every stack it has. A
    folder this package wrote (:func:`to_diffusers`) comes back as the module it was: its groups (``group_sizes``),
    per-group stems (``stem="per_group"``, each group's stem copied back) and, checked, the task's boundaries on the
    export's timestep scale.

    ``wrap(model)`` builds the network the task runs; default
    :class:`~lightning_diffusionblocks.models.DiffusersNetwork` (``DiffusersNetwork(model, block_path=...)``), so a
    diffusers folder imports straight into a trainable module. Give it for the wrapper's options, e.g.
    ``wrap=functools.partial(DiffusersNetwork, sample_size=64)``; ``wrap=lambda model: model`` keeps the stock
    model itself as the network (then ``block_path`` is the module's, default the first stack).
    """
    imported = source if isinstance(source, DiffusersImport) else load_diffusers(source, subfolder)
    routed = imported.model if isinstance(imported.model, TimestepRoutedTransformer) else None
    stock = imported.transformer if routed is None else _copy_stock(imported.transformer)  # plain stacks again
    kwargs = dict(module_kwargs)
    stacks = routed.partitioned if routed is not None else list(imported.stacks)
    if wrap is None:
        block_path = kwargs.pop("block_path", None) or "+".join(stacks)
        net = DiffusersNetwork(stock, block_path=block_path)
    else:
        net = wrap(stock)
    if routed is not None:
        partitioned = routed.partitioned
        if isinstance(net, ModelMixin) and len(partitioned) > 1:
            raise ValueError(
                f"The export splits the stacks {partitioned} among its groups; import it with the default wrap"
                " (DiffusersNetwork, which presents them as one block stack) or a wrap that does the same."
            )
        sizes = [sum(b - a for s, (a, b) in g.items() if s in partitioned) for g in imported.group_blocks]
        stem = "per_group" if len(routed.stems) else "shared"
        given = {"num_blocks": len(sizes), "group_sizes": sizes, "stem": stem}
        clash = {k: kwargs[k] for k in given if k in kwargs and kwargs[k] != given[k]}
        if clash:
            raise ValueError(f"The export was trained with {given}; drop {clash} to import it as it was trained.")
        kwargs.update(given)
    if isinstance(net, ModelMixin):  # the stock model itself is the network: the module cuts its stack
        kwargs.setdefault("block_path", stacks[0])
    module = DiffusionBlocksModule(net, task, **kwargs)
    if routed is None:
        return module
    cfg = routed.config
    trimmed, exported_trimmed = bool(module.network.stack.trimmed), bool(cfg.get("trimmed_stack", False))
    if trimmed != exported_trimmed:
        how = {True: "as the model trimmed to its blocks (stack[0] is the group's first block)",
               False: "with its blocks indexed by their own number (stack[0] is block 0)"}  # fmt: skip
        fix = (
            "import it with the default wrap (DiffusersNetwork) or a network declaring diffusionblocks_trimmed_stack"
            if exported_trimmed
            else "import it as it was trained: from_diffusers(folder, task, wrap=lambda model: model)"
        )
        raise ValueError(
            f"The export ran each group {how[exported_trimmed]}, but {type(net).__name__} runs it {how[trimmed]},"
            f" which changes what a group computes (DiT's head reads transformer_blocks[0]); {fix}."
        )
    edges = pipeline_edges(task.noise, module.boundaries, cfg["pipeline_time"], scheduler)
    if not torch.allclose(torch.tensor(edges, dtype=torch.float64), torch.tensor(cfg["edges"], dtype=torch.float64)):
        raise ValueError(
            f"The task's noise levels cut at {edges} on the pipeline's timestep scale, but the export's groups own"
            f" {cfg['edges']}: give the task the noise formulation and the module the partition it was trained with."
        )
    path, _ = _inner_model(module.network.net)
    drop = tuple(f"{s}." for s in routed.partitioned)
    for holder, saved in zip(module.network.stems, routed.stems):
        inner = holder.get_submodule(path) if path else holder
        state = {k: v for k, v in saved.state_dict().items() if not k.startswith(drop)}
        missing, unexpected = inner.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith(drop)]:
            raise ValueError(f"The export's stems do not fit the network: missing {missing}, unexpected {unexpected}.")
    if module.ema_network is not None:
        module.ema_network.load_state_dict(module.network.state_dict())
    return module


__all__ = [
    "DEFAULT_DISCRETE_SCHEDULER", "DIT_NULL_LABEL", "KNOWN_TIME", "REMOTE_CODE_FILE", "STACK_NAMES", "DiffusersImport",
    "PipelineTime", "RoutedStack", "TimestepRoutedTransformer", "add_remote_code", "from_diffusers", "load_diffusers",
    "module_transformer", "pipeline_edges", "routed_transformer", "scheduler_alpha_bar", "to_diffusers",
]  # fmt: skip
