"""diffusers transformers as they are: one wrapper that gives them the call the image tasks make.

``DiffusersNetwork(model)`` takes a diffusers transformer (``DiTTransformer2DModel``, ``PixArtTransformer2DModel``,
``SD3Transformer2DModel``, ``FluxTransformer2DModel``, ``SanaTransformer2DModel``, …) and presents
``forward(x, noise_level, labels=None, **conditioning)`` returning the prediction as an image-shaped tensor, so
EDM (:class:`~lightning_diffusionblocks.tasks.ImageGeneration`), rectified flow
(:class:`~lightning_diffusionblocks.tasks.FlowMatching`) and :class:`~lightning_diffusionblocks.tasks.DDPM` train it
unchanged. What it does, and why:

- **Stacks.** It declares its block stack (``diffusionblocks_stack_path``): ``model.transformer_blocks``, and for
  models with a second stack after it (Flux: ``transformer_blocks`` then ``single_transformer_blocks``) both, as one
  global layer index, so a group may span the seam. The model keeps its own modules, so its state-dict keys stay
  diffusers' (``wrapper.model.state_dict()`` is a stock state dict; in a module's checkpoint they sit under
  ``network.net.model.``). Everything else of the model (patch embedding, time/text embedders, final norm and
  projection) is the stem/head.
- **A group runs as the model trimmed to its blocks** (``diffusionblocks_trimmed_stack``): while group g runs,
  ``model.transformer_blocks[0]`` is g's first block. DiT's head reads its timestep+label embedding from
  ``transformer_blocks[0].norm1.emb``; so each group's head uses its own first block's embedder, which the group
  owns: only the running group's parameters change, and every group is exactly a stock DiT of its own blocks (what
  an export writes). Trained end to end (or with one group) this is block 0, as in diffusers.
- **Time.** The task tells the network what its noise level is (``diffusionblocks_noise_input``); the wrapper maps
  it to u ∈ [0, 1], the share of the way to pure noise, and passes ``timestep = timestep_scale · u``: a DDPM
  timestep k of T gives u = k/T; flow time t gives u = t; EDM's σ gives u = σ/(1 + σ), the flow time with the same
  signal-to-noise ratio (x + σε and (1 − u)x + uε differ only by the factor 1 + σ). ``timestep_scale`` is what the
  model embeds at pure noise: 1000 (DiT, PixArt, SD3; Sana: 1000 × its ``timestep_scale`` config), 1 for Flux,
  which multiplies by 1000 itself. DDPM's integer k reaches a 1000-step model unchanged (as an integer). Called
  directly, without a task, the noise level is passed unchanged.
- **Output.** The output object or tuple is unwrapped; Flux's packed 2×2 tokens are packed and unpacked here (the
  task sees (N, C, H, W) images, C = in_channels / 4); a learned-σ output (``out_channels = 2 × in_channels``, DiT
  and PixArt) is cut to its first half, the prediction (the variance half is not trained by these losses).
- **Labels.** Only a model with a label embedding (DiT) takes class labels; its own per-block label dropout
  (p = 0.1 in ``train()``, drawn independently in every block) is turned off, so labels are dropped once, by the
  task (``label_dropout``). Its null label is row ``num_embeds_ada_norm``. Other models ignore class labels in a dict
  batch (they stay data, e.g. for metrics).
- **Conditioning.** Keyword conditioning from a dict batch (``encoder_hidden_states``, ``pooled_projections``,
  ``encoder_attention_mask``, ``added_cond_kwargs``, Flux's ``guidance``) is passed through; Flux's ``img_ids`` and
  ``txt_ids`` are made here from the shapes when absent. A text mask reaches Flux as its joint attention mask
  (padding then changes nothing); SD3 takes no mask and attends to padding, as in its pipeline (warned once).

Checkpoints record the model's class name and config (plain data) and rebuild it with ``from_config`` (never a
download). A pretrained model is loaded by the caller (``SD3Transformer2DModel.from_pretrained(...)``) and wrapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

#: stacks tried in this order; every one found is used, one after the other (Flux: double- then single-stream)
STACK_NAMES = ("transformer_blocks", "single_transformer_blocks")
#: what the known families embed at pure noise (u = 1), when it is not 1000 × config.timestep_scale
_TIMESTEP_SCALE = {"FluxTransformer2DModel": 1.0}
#: keyword conditioning a family cannot run without
_REQUIRED = {
    "SD3Transformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "FluxTransformer2DModel": ("encoder_hidden_states", "pooled_projections"),
    "PixArtTransformer2DModel": ("encoder_hidden_states",),
    "SanaTransformer2DModel": ("encoder_hidden_states",),
}
#: families whose tokens are packed 2×2 by their pipeline (in_channels = 4 × latent channels)
_PACKED = ("FluxTransformer2DModel",)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - the extra is installed in the test environment
        raise ImportError(
            "DiffusersNetwork needs diffusers: `pip install 'lightning-diffusionblocks[diffusers]'`."
        ) from err
    return diffusers


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


class DiffusersNetwork(nn.Module):
    """A diffusers transformer with the image tasks' call ``forward(x, noise_level, labels=None, **conditioning)``.

    Args:
        model: the diffusers model, or its class name (e.g. ``"SD3Transformer2DModel"``) with ``config``.
        config: the model's config when ``model`` is a class name (what checkpoints record); built with
            ``from_config``.
        block_path: the stack(s) inside the model, e.g. ``"transformer_blocks"`` or
            ``"transformer_blocks+single_transformer_blocks"``; default every one of :data:`STACK_NAMES` it has.
        timestep_scale: what the model embeds at pure noise (see the module doc); default from the family and its
            config.
        sample_size: latent height = width (or (H, W)) of one sample, when the config has no ``sample_size``
            (Flux); used for the sample shape before any training batch is seen.
    """

    #: the model's stacks cut into groups run as the model trimmed to the group (see the module doc)
    diffusionblocks_trimmed_stack = True

    def __init__(
        self,
        model: nn.Module | str,
        config: Mapping[str, Any] | None = None,
        block_path: str | None = None,
        timestep_scale: float | None = None,
        sample_size: int | tuple[int, int] | list[int] | None = None,
    ) -> None:
        super().__init__()
        diffusers = _diffusers()
        if isinstance(model, str):
            model = self._from_config(diffusers, model, config)
        elif config is not None:
            raise ValueError("Pass either a model, or a class name with its config, not a model and a config.")
        if not isinstance(model, nn.Module) or not callable(getattr(model, "from_config", None)):
            raise TypeError(
                "DiffusersNetwork wraps a diffusers model (e.g. SD3Transformer2DModel(...)); got"
                f" {type(model).__name__}."
            )
        self.model = model
        self.family = type(model).__name__
        cfg = dict(model.config)
        self.diffusionblocks_stack_path = self._stack_path(block_path)
        self.block_path = block_path
        self.timestep_scale_option = timestep_scale
        self.timestep_scale = float(
            timestep_scale
            if timestep_scale is not None
            else _TIMESTEP_SCALE.get(self.family, 1000.0 * float(cfg.get("timestep_scale") or 1.0))
        )
        if not self.timestep_scale > 0:
            raise ValueError(f"timestep_scale must be positive, got {timestep_scale}.")
        self.packed = self.family in _PACKED
        in_channels = int(cfg["in_channels"])
        if self.packed and in_channels % 4:
            raise ValueError(f"{self.family} packs 2×2 latent patches, so in_channels={in_channels} must be 4 × C.")
        self.channels = in_channels // 4 if self.packed else in_channels
        out_channels = cfg.get("out_channels") or in_channels
        #: the model predicts a variance too (learned σ): its output's first half is the prediction
        self.learned_sigma = out_channels == 2 * in_channels
        size = sample_size if sample_size is not None else cfg.get("sample_size")
        self.sample_size_option = sample_size
        self.image_size = list(size) if isinstance(size, (tuple, list)) else size
        if self.packed and self.image_size is not None:
            self.image_size = self.image_size if isinstance(self.image_size, list) else [self.image_size] * 2
        self.required = _REQUIRED.get(self.family, ()) + (("guidance",) if cfg.get("guidance_embeds") else ())
        self.accepted = self._accepted_keywords()
        self.takes_class_labels = "class_labels" in self.accepted and cfg.get("num_embeds_ada_norm") is not None
        #: the image tasks pass class labels only to a model that embeds them
        self.diffusionblocks_takes_labels = self.takes_class_labels
        #: DiT's null label: the extra row of its label embeddings
        self.null_label = int(cfg["num_embeds_ada_norm"]) if self.takes_class_labels else None
        self.label_dropout_disabled = self._disable_label_dropout()
        self.noise_input: dict[str, Any] | None = None
        self._warned_mask = False

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _from_config(diffusers: Any, name: str, config: Mapping[str, Any] | None) -> nn.Module:
        short = name.removeprefix("diffusers.")
        found: Any = getattr(diffusers, short, None) if short.isidentifier() else None
        if not (isinstance(found, type) and issubclass(found, diffusers.ModelMixin)):
            raise ValueError(f"{name!r} is not a diffusers model class (e.g. 'SD3Transformer2DModel').")
        if config is None:
            raise ValueError(f"DiffusersNetwork({name!r}) needs the model's config: DiffusersNetwork({name!r}, cfg).")
        cls: Any = found
        return cls.from_config(dict(config))

    @property
    def init_args(self) -> dict[str, Any]:
        """What a checkpoint records: the model's class name and config (plain data), rebuilt with ``from_config``."""
        return {
            "model": self.family,
            "config": _plain(dict(self.model.config)),
            "block_path": self.block_path,
            "timestep_scale": self.timestep_scale_option,
            "sample_size": _plain(self.sample_size_option),
        }

    def _stack_path(self, block_path: str | None) -> str:
        if block_path is not None:
            return "+".join(f"model.{part.strip()}" for part in block_path.split("+"))
        found = [n for n in STACK_NAMES if isinstance(getattr(self.model, n, None), nn.ModuleList)]
        if not found:
            lists = [n for n, m in self.model.named_children() if isinstance(m, nn.ModuleList)]
            raise ValueError(
                f"Could not find the block stack of {self.family}: it has none of {', '.join(STACK_NAMES)}. Name it:"
                f" DiffusersNetwork(model, block_path='<attribute>') (stacks run one after the other joined by '+');"
                f" its module lists are {lists}."
            )
        return "+".join(f"model.{n}" for n in found)

    def _accepted_keywords(self) -> set[str]:
        import inspect

        return set(inspect.signature(self.model.forward).parameters) - {"hidden_states", "timestep", "return_dict"}

    def _disable_label_dropout(self) -> int:
        """Turn off the model's own label dropout (diffusers' ``LabelEmbedding`` drops labels in ``train()``, in every
        block independently); the task drops labels once. Returns how many embeddings were changed."""
        count = 0
        for module in self.model.modules():
            if hasattr(module, "embedding_table") and isinstance(getattr(module, "dropout_prob", None), float):
                module.dropout_prob = 0.0
                count += 1
        return count

    # ------------------------------------------------------------------ the task's protocol
    def diffusionblocks_noise_input(self, spec: Mapping[str, Any]) -> None:
        """Told by the task what its noise level is: ``{"kind": "edm_c_noise"/"flow_time"/"ddpm_timestep", ...}``."""
        if spec.get("kind") not in ("edm_c_noise", "flow_time", "ddpm_timestep"):
            raise ValueError(
                f"DiffusersNetwork cannot map the noise level {dict(spec)} to {self.family}'s timesteps; it maps EDM,"
                " rectified flow and DDPM levels. Pass the model's own timesteps and call it directly."
            )
        self.noise_input = dict(spec)

    def network_time(self, level: Tensor) -> Tensor:
        """The model's ``timestep`` for the task's noise level (see the module doc)."""
        spec = self.noise_input
        if spec is None:
            return level
        kind = spec["kind"]
        if kind == "ddpm_timestep":
            total = int(spec["num_timesteps"])
            if self.timestep_scale == total and not level.is_floating_point():
                return level  # the model's own integer timesteps
            unit = level.double() / total
        elif kind == "flow_time":
            unit = level.double() / float(spec["scale"])
            unit = 1 - unit if spec.get("reverse") else unit
        else:  # EDM c_noise = ln(σ)/4
            sigma = torch.exp(4 * level.double())
            unit = sigma / (1 + sigma)
        return (self.timestep_scale * unit).float()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, noise_level: Tensor, labels: Tensor | None = None, **conditioning: Any) -> Tensor:
        """The model's prediction at ``x`` (N, C, H, W) and noise level (N,), as an (N, C, H, W) tensor."""
        if not isinstance(noise_level, Tensor) or noise_level.ndim != 1 or noise_level.shape[0] != x.shape[0]:
            shape = tuple(noise_level.shape) if isinstance(noise_level, Tensor) else type(noise_level).__name__
            raise ValueError(
                f"{self.family} takes one timestep per sample, shape ({x.shape[0]},); got {shape}. Pass"
                " t.expand(x.shape[0]) for one level shared by the batch."
            )
        conditioning = self._text_mask(conditioning)
        unknown = sorted(set(conditioning) - self.accepted - {"diffusionblocks_text_mask"})
        if unknown:
            takes = sorted(set(conditioning) - set(unknown) - {"diffusionblocks_text_mask"})
            raise ValueError(
                f"{self.family} takes no conditioning {unknown}; its keyword arguments are {sorted(self.accepted)}."
                " A dict batch passes every key but 'images' and 'labels': remove those keys from the batch, or name"
                f" the keys the network takes with the task's conditioning_keys={takes!r}."
            )
        missing = [k for k in self.required if conditioning.get(k) is None]
        if missing:
            raise ValueError(
                f"{self.family} needs the conditioning {missing}: train on dict batches {{'images': x, "
                + ", ".join(f"'{k}': ..." for k in self.required)
                + "} and sample with sample(conditioning={...}); or give the task null_conditioning={...} for"
                " unconditional samples."
            )
        kwargs = dict(conditioning)
        if self.takes_class_labels:
            if labels is None:
                labels = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            kwargs["class_labels"] = labels
        if self.packed:
            return self._packed_forward(x, noise_level, kwargs)
        out = self._unwrap(self.model(x, timestep=self.network_time(noise_level), return_dict=False, **kwargs))
        return out[:, : x.shape[1]] if self.learned_sigma else out

    def _text_mask(self, conditioning: dict[str, Any]) -> dict[str, Any]:
        """A text mask (``encoder_attention_mask``, (N, tokens), 1 = real token) for a model whose forward takes none:
        Flux gets it as a joint attention mask over [text; image] (padding then changes nothing); a model that cannot
        mask (SD3) attends to the padding as its pipeline does, with a warning once."""
        mask = conditioning.get("encoder_attention_mask")
        if mask is None or "encoder_attention_mask" in self.accepted:
            return conditioning
        conditioning = {k: v for k, v in conditioning.items() if k != "encoder_attention_mask"}
        if self.packed and "joint_attention_kwargs" in self.accepted:
            conditioning["diffusionblocks_text_mask"] = mask
        elif not self._warned_mask:
            self._warned_mask = True
            rank_zero_warn(
                f"{self.family} takes no text attention mask, so `encoder_attention_mask` is not used: padding tokens"
                " are attended to (as in its own pipeline). Pad prompts the same way in training and sampling."
            )
        return conditioning

    def _packed_forward(self, x: Tensor, level: Tensor, kwargs: dict[str, Any]) -> Tensor:
        n, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"{self.family} packs 2×2 patches: height and width must be even, got {h}×{w}.")
        tokens = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)
        if kwargs.get("img_ids") is None:
            rows = torch.arange(h // 2, device=x.device).repeat_interleave(w // 2)
            cols = torch.arange(w // 2, device=x.device).repeat(h // 2)
            kwargs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(x.dtype)
        if kwargs.get("txt_ids") is None:
            text = kwargs["encoder_hidden_states"]
            kwargs["txt_ids"] = torch.zeros(text.shape[1], 3, device=x.device, dtype=x.dtype)
        for key in ("img_ids", "txt_ids"):  # ids per sample in a batch are the same: the model takes one set
            if kwargs[key].ndim == 3:
                kwargs[key] = kwargs[key][0]
        text_mask = kwargs.pop("diffusionblocks_text_mask", None)
        if text_mask is not None:  # queries over [text; image] attend only to real text tokens and every image token
            keys = torch.cat([text_mask.bool(), torch.ones(n, tokens.shape[1], dtype=torch.bool, device=x.device)], 1)
            joint = dict(kwargs.get("joint_attention_kwargs") or {})
            joint["attention_mask"] = keys[:, None, None, :].expand(n, 1, keys.shape[1], keys.shape[1])
            kwargs["joint_attention_kwargs"] = joint
        out = self._unwrap(self.model(tokens, timestep=self.network_time(level), return_dict=False, **kwargs))
        out = out[..., : c * 4] if self.learned_sigma else out
        return out.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)

    @staticmethod
    def _unwrap(out: Any) -> Tensor:
        if isinstance(out, Tensor):
            return out
        sample = getattr(out, "sample", None)
        if isinstance(sample, Tensor):
            return sample
        if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            return out[0]
        raise TypeError(f"Cannot read a prediction tensor from the model's output {type(out).__name__}.")


__all__ = ["STACK_NAMES", "DiffusersNetwork"]
