"""Continuous targets: class-conditional image generation with EDM preconditioning and an L2 loss.

The network is the user's, unchanged: ``forward(x, c_noise, labels)`` returns the raw output F of EDM.
Its conventions are discovered when the module binds the task (:meth:`ImageGeneration.bind`): the
"no label" value it expects (its ``null_label`` or ``num_classes`` attribute, or the last row of its label
embedding), how its ``forward`` takes the noise level and the labels (positionally or by keyword), and
the shape of one sample (its ``channels``/``image_size``-style attributes, or the first training batch).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_diffusionblocks.conditioning import Conditioning, check_null_conditioning
from lightning_diffusionblocks.levels import NoiseLevels, append_dims
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import (
    check_clip,
    check_count,
    check_integer,
    check_labels,
    classifier_free_guidance,
    euler_sample,
)
from lightning_diffusionblocks.tasks.base import Preview, Task, routed_loss

EXPECTED_SIGNATURE = "forward(x, c_noise, labels=None)"
#: how ImageGeneration calls the network, quoted when a signature is refused
EXPECTED_CALL = (
    f"ImageGeneration calls the network as {EXPECTED_SIGNATURE} (x = c_in·z, c_noise = ¼·ln σ, labels = class ids)"
)
_CHANNEL_ATTRS = ("channels", "in_channels", "in_chans", "num_channels")
_SIZE_ATTRS = ("image_size", "input_size", "img_size", "sample_size")
_LABEL_MODULE = re.compile(r"(label|class|y_emb)", re.IGNORECASE)
#: |pixel| beyond which float images are taken for unscaled data (0–255 pixels), not data scaled to about [-1, 1]
_UNSCALED = 20.0


@dataclass(frozen=True)
class CallConvention:
    """How a network's ``forward`` takes (x, c_noise, labels): ``None`` = positionally, a name = by keyword;
    ``takes_labels`` False for unconditional networks."""

    noise_keyword: str | None = None
    labels_keyword: str | None = None
    takes_labels: bool = True
    #: the keyword arguments a dict batch's conditioning may fill (None: any, the forward takes ``**kwargs``)
    keywords: tuple[str, ...] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, net: nn.Module, expected: str = EXPECTED_CALL) -> CallConvention:
        """Read the convention from ``net.forward``'s signature; refuse shapes it cannot serve (quoting ``expected``,
        the task's own call)."""
        declared = getattr(net, "diffusionblocks_takes_labels", None)  # a wrapper whose model takes no class labels
        declared = declared if isinstance(declared, bool) else True
        try:
            params = list(inspect.signature(net.forward).parameters.values())
        except (TypeError, ValueError):
            return cls(takes_labels=declared)
        kinds = inspect.Parameter
        if any(p.kind is kinds.VAR_POSITIONAL for p in params):
            return cls(takes_labels=declared)
        positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        keyword = [p for p in params if p.kind is kinds.KEYWORD_ONLY]
        has_var_kw = any(p.kind is kinds.VAR_KEYWORD for p in params)

        def refuse(why: str) -> ValueError:
            return ValueError(
                f"{type(net).__name__}.forward{inspect.signature(net.forward)} {why}. {expected}; the noise"
                " level and the labels may also be keyword-only arguments."
            )

        if not positional:
            raise refuse("takes no positional input for the noisy image")
        slots: list[str | None] = []  # how c_noise and labels are passed
        rest_pos, rest_kw = positional[1:], list(keyword)
        for _ in range(2):
            if rest_pos:
                rest_pos.pop(0)
                slots.append(None)
            elif rest_kw:
                slots.append(rest_kw.pop(0).name)
            else:
                slots.append("<absent>")
        if slots[0] == "<absent>":
            raise refuse("takes no noise level")
        required = [p.name for p in rest_pos + rest_kw if p.default is inspect.Parameter.empty]
        if required:
            raise refuse(f"requires further arguments {required}")
        if slots[1] == "<absent>" and has_var_kw:
            slots[1] = "labels"
        takes_labels = slots[1] != "<absent>" and declared
        names = None if has_var_kw else tuple(p.name for p in rest_pos + rest_kw)
        return cls(noise_keyword=slots[0], labels_keyword=slots[1], takes_labels=takes_labels, keywords=names)

    def call(self, run: Runner, x: Tensor, c_noise: Tensor, labels: Tensor | Conditioning | None) -> Any:
        """Call the network; a :class:`Conditioning` gives its labels (to a network that takes labels; a captioned
        batch's labels are otherwise only data) and its values as the network's keyword arguments."""
        args: list[Any] = [x]
        kwargs: dict[str, Any] = {}
        if isinstance(labels, Conditioning):
            unknown = sorted(set(labels.values) - set(self.keywords)) if self.keywords is not None else []
            if unknown:
                raise ValueError(
                    f"The batches carry the conditioning {unknown} (every key of a dict batch but 'images' and"
                    " 'labels' is passed to the network by name), but the network's forward takes no such argument"
                    f" (it takes {list(self.keywords or ())}). Remove those keys from the batches, or give the network"
                    " those keyword arguments (or **conditioning)."
                )
            kwargs.update(labels.values)
            labels = labels.labels if self.takes_labels else None
        if self.noise_keyword is None:
            args.append(c_noise)
        else:
            kwargs[self.noise_keyword] = c_noise
        if self.takes_labels:
            if self.labels_keyword is None:
                args.append(labels)
            else:
                kwargs[self.labels_keyword] = labels
        elif labels is not None:
            raise ValueError(
                "The batches carry labels but the network's forward takes none; use an unconditional data set"
                f" or give the network a labels argument ({EXPECTED_SIGNATURE})."
            )
        return run(*args, **kwargs)


def discover_null_label(net: nn.Module) -> int | None:
    """The label id a network reads as "no label": its ``null_label``, its ``num_classes`` (the extra row of
    a ``num_classes + 1`` embedding), or the last row of a label embedding; None if it declares none."""
    return find_null_label(net)[0]


def find_null_label(net: nn.Module) -> tuple[int | None, str]:
    """:func:`discover_null_label` and where the id comes from, in words (for messages)."""
    for name, owner in (("", net), *((n, m) for n, m in net.named_modules() if n and _LABEL_MODULE.search(n))):
        where = f"`{name}.`" if name else "the network's "
        value = getattr(owner, "null_label", None)
        if isinstance(value, int):
            return value, f"declared as {where}null_label"
        value = getattr(owner, "num_classes", None)
        if isinstance(value, int) and value > 0:
            return value, f"the extra row after {where}num_classes={value}"
    found = label_embedding(net)
    if found is not None:
        name, table = found
        return (
            table.num_embeddings - 1,
            f"guessed as the last row of the label embedding `{name}` (Embedding({table.num_embeddings}, ...)), as the"
            " network declares no `num_classes` or `null_label`",
        )
    return None, "none declared"


def label_embedding(net: nn.Module) -> tuple[str, nn.Embedding] | None:
    """The network's label embedding (the first ``nn.Embedding`` named like a label/class table), or None."""
    for name, module in net.named_modules():
        if isinstance(module, nn.Embedding) and _LABEL_MODULE.search(name):
            return name, module
    return None


def discover_sample_shape(net: nn.Module) -> list[int] | None:
    """(C, H, W) from the usual attribute names (ours, timm, diffusers, the DiT reference code)."""
    channels = next((getattr(net, a) for a in _CHANNEL_ATTRS if isinstance(getattr(net, a, None), int)), None)
    size = next((getattr(net, a) for a in _SIZE_ATTRS if getattr(net, a, None) is not None), None)
    if channels is None or size is None:
        return None
    if isinstance(size, int):
        return [channels, size, size]
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return [channels, *size]
    return None


class ImageGeneration(Task):
    """Denoise images y + σε back to y; the conditioning x is the class label (or nothing).

    Batches are ``(images, labels)`` or ``images``; images should be scaled to about [-1, 1]. During
    training a share ``label_dropout`` of labels is replaced by the null label so the model also learns the
    unconditional denoiser that classifier-free guidance needs.

    Conditioning beyond class labels comes in dict batches ``{"images": x, "labels": y (optional),
    "encoder_hidden_states": h, "pooled_projections": p, ...}``: every other key is passed to the network as the
    keyword argument of that name (one row per sample; see :mod:`lightning_diffusionblocks.conditioning`). The same
    share ``label_dropout`` of samples then has all of its conditioning dropped at once (labels to the null label,
    each value to ``null_conditioning[key]`` or zeros), and ``sample(conditioning=..., guidance=g)`` guides with it.

    Args:
        label_dropout: share of labels (and dict-batch conditioning) dropped to the null in training.
        noise: the EDM noise schedule.
        null_label: the label id the network reads as "no label"; default what the network declares
            (``null_label`` or ``num_classes`` attribute, or the last row of its label embedding), else -1.
        null_conditioning: the "no conditioning" value of dict-batch keys, one sample's worth each (e.g. the
            empty prompt's ``encoder_hidden_states``, padded like the prompts); keys not given drop to zeros.
        conditioning_keys: the dict-batch keys the network takes as conditioning; other keys ride along as data
            (a caption index, a file name) and are not passed. Default: every key but ``images`` and ``labels``.
    """

    inference = ("sample",)
    reads = "image-shaped outputs (a denoised image, a velocity or a noise estimate)"
    #: how this task calls the network, quoted when the network's signature cannot be served
    expected_call = EXPECTED_CALL

    def __init__(
        self,
        label_dropout: float = 0.1,
        noise: NoiseLevels = EDM,
        null_label: int | None = None,
        null_conditioning: Mapping[str, Any] | None = None,
        conditioning_keys: Sequence[str] | None = None,
    ) -> None:
        super().__init__(noise)
        self.null_conditioning = check_null_conditioning(null_conditioning)
        if conditioning_keys is not None and (
            isinstance(conditioning_keys, str) or not all(isinstance(k, str) for k in conditioning_keys)
        ):
            raise ValueError(
                f"conditioning_keys must be a list of dict-batch keys, got {conditioning_keys!r}; e.g."
                " conditioning_keys=['encoder_hidden_states', 'pooled_projections']."
            )
        self.conditioning_keys = None if conditioning_keys is None else tuple(conditioning_keys)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
        if null_label is not None and not isinstance(null_label, int):
            raise ValueError(f"null_label must be an integer label id, got {null_label!r}.")
        self.label_dropout = label_dropout
        self.null_label_option = null_label
        self.null_label = -1 if null_label is None else null_label
        #: where the null label comes from, in words (for messages; found again by :meth:`bind`)
        self.null_label_origin = "none declared" if null_label is None else f"given as null_label={null_label}"
        #: rows of the network's label embedding, when one is found (labels must index it)
        self.label_rows: int | None = None
        self._warned_range = False
        self.convention = CallConvention()
        self.sample_shape: list[int] | None = None
        self.data_range: list[float] | None = None

    @property
    def init_args(self) -> dict[str, Any] | None:
        """The constructor arguments a checkpoint records; a null conditioning as nested lists (plain data)."""
        recorded = getattr(self, "_recorded_init_args", None)
        if recorded is None or not recorded.get("null_conditioning"):
            return recorded
        null = {k: v.tolist() for k, v in self.null_conditioning.items()}
        return {**recorded, "null_conditioning": null}

    def noise_input(self) -> dict[str, Any]:
        """What the network receives as its noise level, in plain data, told to a network that asks
        (``diffusionblocks_noise_input``) so it can map it to its own time convention: EDM's c_noise = ¼·ln σ."""
        return {"kind": "edm_c_noise"}

    # ------------------------------------------------------------------ conventions
    def bind(self, net: nn.Module) -> None:
        self.check_network_outputs(net)
        if self.null_label_option is None:
            found, self.null_label_origin = find_null_label(net)
            self.null_label = -1 if found is None else found
        self.convention = CallConvention.of(net, self.expected_call)
        declare = getattr(net, "diffusionblocks_noise_input", None)
        if callable(declare):  # the network maps this task's noise level to its own time convention
            declare(self.noise_input())
        self.sample_shape = self.sample_shape or discover_sample_shape(net)
        table = label_embedding(net) if self.convention.takes_labels else None
        self.label_rows = None if table is None else table[1].num_embeddings
        if table is not None and self.null_label_option is None and self.null_label >= table[1].num_embeddings:
            name, rows = table[0], table[1].num_embeddings
            raise ValueError(
                f"{type(self).__name__} feeds label {self.null_label} for 'no label' ({self.null_label_origin}): a"
                f" share label_dropout={self.label_dropout} of training labels and every unguided sample get it. But"
                f" the label embedding `{name}` has {rows} rows (ids 0..{rows - 1}), so that id would fail with an"
                f" IndexError. Give the network a row for 'no label' (nn.Embedding(num_classes + 1, dim)), or tell"
                f" the task which id the network reads as 'no label': {type(self).__name__}(null_label=<id>)."
            )

    def observe(self, batch: Any) -> None:
        images, labels = self.split(batch)
        if isinstance(labels, Conditioning):
            labels.check_rows(images.shape[0], "the training batch")
            labels = labels.labels if self.convention.takes_labels else None
        self.check_batch(images, labels)
        self.sample_shape = list(images.shape[1:])
        # one device sync for every statistic: the data range and what the labels hold
        stats = [images.min().float(), images.max().float()]
        if labels is not None:
            stats += [(labels == self.null_label).any().float(), labels.max().float()]
        values = torch.stack(stats).tolist()
        lo, hi = values[0], values[1]
        if labels is not None:
            self.check_label_values(labels, bool(values[2]), int(values[3]))
        if max(abs(lo), abs(hi)) > _UNSCALED and not self._warned_range:
            self._warned_range = True
            rank_zero_warn(
                f"Training images range over [{lo:.4g}, {hi:.4g}], but {type(self).__name__} expects images scaled to"
                " about [-1, 1] (its noise levels and loss weights assume it). Scale them in the data pipeline, e.g."
                " images / 127.5 - 1 for 0–255 pixels."
            )
        if self.data_range is not None:
            lo, hi = min(lo, self.data_range[0]), max(hi, self.data_range[1])
        self.data_range = [lo, hi]

    def check_batch(self, images: Tensor, labels: Tensor | None) -> None:
        """Refuse training data this task would silently misread: integer images (0–255 pixels) and labels that
        are not one class id per image (floats, one-hot rows)."""
        name = type(self).__name__
        if not images.is_floating_point():
            raise ValueError(
                f"{name} got {images.dtype} images (pixel values such as 0–255), but it denoises float images scaled"
                " to about [-1, 1]. Convert them in the data pipeline: images.float() / 127.5 - 1 (or torchvision's"
                " ToTensor() then Normalize(0.5, 0.5))."
            )
        if labels is None:
            return
        not_ids = labels.is_floating_point() or labels.dtype == torch.bool
        if not_ids or labels.ndim != 1:
            per_image_rows = labels.ndim == 2 and labels.shape[0] == images.shape[0]
            if per_image_rows and labels.shape[1] == 1:
                hint = f" For a column of class ids pass labels.squeeze(1){'.long()' if not_ids else ''}."
            elif per_image_rows:
                hint = " For one-hot labels pass labels.argmax(-1)."
            else:
                hint = " Convert them with labels.long()." if not_ids else " Pass one class id per image."
            raise ValueError(
                f"{name} expects labels as a 1-D integer tensor of class ids, one per image; got {labels.dtype} of"
                f" shape {tuple(labels.shape)}.{hint}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"{name} got {labels.shape[0]} labels for {images.shape[0]} images; a batch is (images, labels) with"
                " one class id per image."
            )

    def check_label_values(self, labels: Tensor, has_null: bool, top: int) -> None:
        """Refuse labels the network cannot embed, and real labels equal to the null label (they would be read as
        'no label': dropped out of their class for guidance, and unguided samples would be of that class)."""
        name = type(self).__name__
        if self.label_rows is not None and top >= self.label_rows:
            raise ValueError(
                f"{name} got label {top}, but the network's label embedding has {self.label_rows} rows"
                f" (ids 0..{self.label_rows - 1}). Build the network for the data set's number of classes."
            )
        if has_null:
            raise ValueError(
                f"The training labels include {self.null_label}, the id {name} feeds for 'no label' (classifier-free"
                f" guidance; {self.null_label_origin}). That class would be treated as 'no label': its images"
                " unconditional and unguided samples of that class. Give the network a row for 'no label'"
                " (nn.Embedding(num_classes + 1, dim) and a `num_classes` attribute), or tell the task which id no"
                f" class uses: {name}(null_label=<id>)."
            )

    def state(self) -> dict[str, Any]:
        return {"sample_shape": self.sample_shape, "data_range": self.data_range}

    def load_state(self, state: dict[str, Any]) -> None:
        self.sample_shape = state.get("sample_shape") or self.sample_shape
        self.data_range = state.get("data_range") or self.data_range

    def split(self, batch: Any) -> tuple[Tensor, Any]:
        """``(images, labels)``: class ids (a tuple batch), a :class:`Conditioning` (a dict batch with conditioning
        beyond labels), or None."""
        if isinstance(batch, Mapping):
            if "images" not in batch:
                raise ValueError(
                    f"{type(self).__name__} got a dict batch with keys {sorted(batch)} but no 'images': a dict batch is"
                    " {'images': x, 'labels': y (optional), <network keyword>: <one row per sample>, ...}."
                )
            keys = self.conditioning_keys
            values = {k: v for k, v in batch.items() if k not in ("images", "labels") and (keys is None or k in keys)}
            labels = batch.get("labels")
            return batch["images"], Conditioning(labels, values) if values else labels
        if isinstance(batch, Tensor):
            return batch, None
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return batch[0], batch[1]
        raise ValueError(
            f"{type(self).__name__} expects batches of `images` or `(images, labels)`, got"
            f" {type(batch).__name__} of length {len(batch) if hasattr(batch, '__len__') else '?'}."
        )

    def batch_size(self, batch: Any) -> int:
        return self.split(batch)[0].shape[0]

    def binned_losses(
        self, router: Router, batch: Any, batch_idx: int, bins: Sequence[tuple[str, float, float]]
    ) -> dict[str, Tensor]:
        """Validation loss per range of levels: for each ``(name, lo, hi)`` the mean of ``per_sample_loss`` at levels
        drawn in [lo, hi], each sample served by the group owning its level; noise fixed by ``batch_idx``."""
        images, labels = self.split(batch)
        gen = torch.Generator(device=images.device).manual_seed(10_007 + batch_idx)
        eps = torch.randn(images.shape, generator=gen, device=images.device).to(images)
        per_sample_loss = self.per_sample_loss
        metrics = {}
        for name, lo, hi in bins:
            levels = self.noise.sample(images.shape[0], lo, hi, generator=gen, device=images.device)

            def loss_at(run: Runner, rows: Tensor | slice, levels: Tensor = levels) -> Tensor:
                rows_labels = None if labels is None else labels[rows]
                return per_sample_loss(run, images[rows], rows_labels, levels[rows], eps[rows])

            metrics[name] = routed_loss(router, levels, loss_at).mean()
        return metrics

    # ------------------------------------------------------------------ formulas
    @property
    def edm(self) -> NoiseSchedule:
        """The EDM schedule this task's denoiser reads (σ_data, preconditioning); other levels are refused."""
        if not isinstance(self.noise, NoiseSchedule):
            raise TypeError(
                f"{type(self).__name__}'s EDM denoiser needs an EDM NoiseSchedule, got {type(self.noise).__name__}."
                " Use FlowMatching for a FlowSchedule and DDPM for a DDPMSchedule."
            )
        return self.noise

    def denoise(self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None) -> Tensor:
        """EDM denoiser D(z; σ) = c_skip·z + c_out·F(c_in·z, c_noise, labels), in float32."""
        c_skip, c_out, c_in, c_noise = self.edm.precondition(sigma.float())
        out = self.convention.call(run, (append_dims(c_in, z.ndim) * z).to(z.dtype), c_noise, labels)
        return append_dims(c_skip, z.ndim) * z.float() + append_dims(c_out, z.ndim) * out.float()

    def per_sample_loss(self, run: Runner, images: Tensor, labels: Tensor | None, sigma: Tensor, eps: Tensor) -> Tensor:
        """w(σ)·mean((D(x + σε; σ) − x)²) per sample at levels σ (N,) with noise ε."""
        z = images + append_dims(sigma, images.ndim).to(images) * eps
        denoised = self.denoise(run, z, sigma, labels)
        per_sample = (denoised - images.float()).pow(2).flatten(1).mean(1)
        return self.noise.loss_weight(sigma) * per_sample

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        images, labels = self.split(batch)
        labels = self.drop_labels(labels, generator)
        eps = torch.randn(images.shape, generator=generator, device=generator.device).to(images)
        return self.per_sample_loss(run, images, labels, sigma, eps)

    def drop_labels(self, labels: Any, generator: torch.Generator) -> Any:
        """Training labels with a share ``label_dropout`` replaced by the null label (for guidance); a
        :class:`Conditioning` has the same share of samples dropped whole (see :meth:`null_of`)."""
        if labels is None or self.label_dropout == 0:
            return labels
        if isinstance(labels, Conditioning):
            count = labels.num_rows
            drop = torch.rand((count,), generator=generator, device=generator.device) < self.label_dropout
            return labels.where(drop, self.null_of(labels))
        drop = torch.rand(labels.shape, generator=generator, device=generator.device) < self.label_dropout
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.null_label), labels)

    def null_of(self, labels: Any) -> Any:
        """What "no conditioning" is for ``labels``: the null label id for class ids; for a :class:`Conditioning`
        the same rows with labels at the null label and each value at ``null_conditioning[key]`` (else zeros)."""
        if isinstance(labels, Conditioning):
            return labels.null(self.null_label if self.convention.takes_labels else None, self.null_conditioning)
        return self.null_label

    def guided_denoise(
        self, run: Runner, z: Tensor, sigma: Tensor, labels: Tensor | None, guidance: float = 1.0
    ) -> Tensor:
        """Denoiser with classifier-free guidance: D_u + g·(D_c − D_u), both halves in one batch."""
        return classifier_free_guidance(partial(self.denoise, run), z, sigma, labels, self.null_of(labels), guidance)

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def sample(
        self,
        router: Router,
        labels: Tensor | Sequence[int] | None = None,
        num_samples: int | None = None,
        steps: int = 50,
        guidance: float = 1.0,
        seed: int = 0,
        shape: Sequence[int] | None = None,
        clip: bool | tuple[float, float] = False,
        conditioning: Mapping[str, Any] | None = None,
    ) -> Tensor:
        """Generate images, every network call served by the group that owns its noise level (the module's
        ``sample(...)`` forwards here; one signature for every image formulation).

        ``labels`` (class ids, one sample each), ``conditioning`` (the network's keyword conditioning, one row per
        sample, as in a dict batch: ``{"encoder_hidden_states": h, "pooled_projections": p, ...}``) or
        ``num_samples`` (unconditional) says what to draw. ``steps`` is chosen here, independent of B and never
        stored. ``guidance`` > 1 turns on classifier-free guidance (needs ``labels`` or ``conditioning``):
        u + g·(c − u) of the formulation's output, u from the null conditioning (the null label; each value at the
        task's ``null_conditioning`` or zeros). Without labels a class-conditional network gets its null label
        (unconditional samples); without ``conditioning`` a network that needs it gets the null conditioning when
        the task was given one. ``seed`` fixes the noise. ``shape`` is one sample's shape; by default
        the one found on the network or seen in training. The raw output of the sampler may leave the data range;
        ``clip=True`` clamps it to the range seen in the training data, ``clip=(lo, hi)`` to a given range. How the
        levels are walked is the formulation's :meth:`integrate` (EDM here: Euler in σ).
        """
        labels, num_samples, shape = self.sampling_inputs(
            router, labels, num_samples, guidance, shape, steps=steps, clip=clip, seed=seed, conditioning=conditioning
        )
        gen = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn((num_samples, *shape), generator=gen)
        return self._clip(self.integrate(router, noise, labels, guidance, steps, gen, clip), clip)

    def integrate(
        self,
        router: Router,
        noise: Tensor,
        labels: Tensor | None,
        guidance: float,
        steps: int,
        generator: torch.Generator,
        clip: bool | tuple[float, float],
    ) -> Tensor:
        """This formulation's sampler from unit Gaussian ``noise`` (on the CPU) to images, in ``steps`` steps with
        classifier-free ``guidance``; :meth:`sample` checked the arguments and clips the result. EDM: Euler in σ over
        the equal-probability grid, each σ step calling only the group that owns it."""
        sigmas = self.noise.equiprobable_grid(steps)
        z = (noise * sigmas[0].item()).to(router.device)

        def denoise(z: Tensor, sigma_vec: Tensor, sigma: float) -> Tensor:
            return self.guided_denoise(router.at(sigma), z, sigma_vec, labels, guidance)

        return euler_sample(denoise, z, sigmas)

    def sampling_inputs(
        self,
        router: Router,
        labels: Tensor | Sequence[int] | None,
        num_samples: int | None,
        guidance: float,
        shape: Sequence[int] | None,
        *,
        steps: int = 1,
        clip: bool | tuple[float, float] = False,
        seed: int = 0,
        conditioning: Mapping[str, Any] | None = None,
    ) -> tuple[Any, int, Sequence[int]]:
        """Check :meth:`sample`'s arguments, for every sampler of this task family: (labels on the router's device
        or None, number of samples, the shape of one sample). Without labels a class-conditional network gets its
        null label. ``steps``, ``clip`` and ``seed`` are checked too (refused, never rounded or swapped). With
        ``conditioning`` the labels returned are a :class:`Conditioning` holding both."""
        check_count(steps, "steps")
        check_clip(clip)
        check_integer(seed, "seed")
        if conditioning is not None:
            return self._conditioned_inputs(router, labels, num_samples, conditioning, shape)
        if labels is None and num_samples is None:
            raise ValueError("Pass `labels` or `num_samples` to sample().")
        labels, num_samples = check_labels(labels, num_samples, router.device)
        assert num_samples is not None
        if labels is not None:
            if not self.convention.takes_labels:
                raise ValueError("The network takes no labels; call sample(num_samples=...) without labels.")
            if self.label_rows is not None and bool((labels >= self.label_rows).any()):
                beyond = sorted(set(labels[labels >= self.label_rows].tolist()))
                raise ValueError(
                    f"sample() got labels {beyond[:8]} beyond the network's label embedding, which has"
                    f" {self.label_rows} rows (ids 0..{self.label_rows - 1}; {self.null_label} means 'no label')."
                )
        elif guidance != 1.0:
            raise ValueError("Classifier-free guidance needs `labels`; pass labels or guidance=1.0.")
        if labels is None and self.convention.takes_labels:
            labels = torch.full((num_samples,), self.null_label, dtype=torch.long, device=router.device)
        if self.null_conditioning:  # a network with keyword conditioning gets its null (unconditional samples)
            values = {k: _rows_of(v, num_samples) for k, v in self.null_conditioning.items()}
            labels = Conditioning(labels, values).to(router.device)
        return labels, num_samples, self._shape(shape)

    def _shape(self, shape: Sequence[int] | None) -> Sequence[int]:
        if shape is None:
            if self.sample_shape is None:
                raise ValueError(
                    "The sample shape is unknown: the network has no `channels`/`image_size`-style attributes and"
                    " no training batch was seen. Pass shape=(C, H, W)."
                )
            shape = self.sample_shape
        return shape

    def _conditioned_inputs(
        self,
        router: Router,
        labels: Tensor | Sequence[int] | None,
        num_samples: int | None,
        conditioning: Mapping[str, Any],
        shape: Sequence[int] | None,
    ) -> tuple[Conditioning, int, Sequence[int]]:
        """:meth:`sampling_inputs` with keyword ``conditioning`` (one row per sample), and class labels if given."""
        if not isinstance(conditioning, Mapping) or not conditioning:
            raise TypeError(
                "conditioning must be a dict of the network's keyword conditioning, one row per sample, e.g."
                " sample(conditioning={'encoder_hidden_states': h, 'pooled_projections': p}, guidance=4.0)."
            )
        values = {k: v for k, v in conditioning.items() if k not in ("images", "labels")}
        if labels is None and "labels" in conditioning:
            labels = conditioning["labels"]
        cond = Conditioning(None, values)
        count = cond.num_rows
        if labels is not None:
            checked, _ = check_labels(labels, None, router.device)
            assert checked is not None
            count = checked.shape[0]
        elif self.convention.takes_labels:
            checked = torch.full((count,), self.null_label, dtype=torch.long, device=router.device)
        else:
            checked = None
        if num_samples is not None and check_count(num_samples, "num_samples") != count:
            raise ValueError(
                f"sample() draws one sample per row of `conditioning` ({count} rows) but got num_samples={num_samples};"
                " leave num_samples out or give that many rows."
            )
        cond = Conditioning(checked if self.convention.takes_labels else None, values)
        cond.check_rows(count, "sample(conditioning=...)")
        return cond.to(router.device), count, self._shape(shape)

    def _clip(self, images: Tensor, clip: bool | tuple[float, float]) -> Tensor:
        if clip is False:
            return images
        if clip is True:
            if self.data_range is None:
                raise ValueError("clip=True clamps to the training data's range, but none was seen; pass clip=(lo, hi)")
            lo, hi = self.data_range
        else:
            lo, hi = clip
        return images.clamp(lo, hi)

    def predict_step(self, router: Router, batch: Any, batch_idx: int) -> Tensor:
        """Samples for a batch of class labels (a 1-D integer tensor, or a 1-tuple of one), or for a dict batch of
        conditioning (one sample per row; ``images`` refused)."""
        if isinstance(batch, Mapping) and "images" not in batch:
            return self.sample(router, conditioning=batch, seed=batch_idx)
        labels = batch[0] if isinstance(batch, (tuple, list)) and len(batch) == 1 else batch
        if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                "ImageGeneration's predict_step draws one sample per label, so a predict batch must be a 1-D tensor"
                " of class ids (e.g. DataLoader(TensorDataset(labels))). This batch holds something else"
                f" ({_describe(batch)}); images in a predict batch would be ignored, so they are refused."
            )
        return self.sample(router, labels=labels, seed=batch_idx)

    def preview(
        self,
        router: Router,
        batch: Any,
        per_row: int = 8,
        max_rows: int = 10,
        steps: int = 32,
        guidance: float = 1.0,
        seed: int = 0,
    ) -> Preview:
        """A grid of samples, one row per class seen in ``batch`` (at most ``max_rows``), ``per_row`` each; without
        labels (unlabelled data or a network that takes none) ``max_rows`` rows of unconditional samples. The noise is
        the same at every call (``seed``), so successive previews show the model changing, not the noise."""
        _, labels = self.split(batch)
        if isinstance(labels, Conditioning):  # one row per sample of the batch's conditioning (e.g. its prompts)
            count = min(max_rows, labels.num_rows)
            rows_of = labels[slice(0, count)].repeat_interleave(per_row)
            images = self.sample(
                router, labels=rows_of.labels if self.convention.takes_labels else None,
                conditioning=rows_of.values, steps=steps, guidance=guidance, seed=seed,
            )  # fmt: skip
            value_range = (self.data_range[0], self.data_range[1]) if self.data_range else (-1.0, 1.0)
            caption = f"{type(self).__name__}: one row per conditioning of the batch, guidance {guidance}"
            caption += f", {steps} sampling steps"
            return Preview(images=images.detach().cpu(), rows=count, value_range=value_range, caption=caption)
        classes: list[int] = []
        if labels is not None and self.convention.takes_labels:
            classes = [c for c in sorted(set(labels.view(-1).tolist())) if c != self.null_label][:max_rows]
        if classes:
            grid_labels = torch.tensor(classes).repeat_interleave(per_row)
            images = self.sample(router, labels=grid_labels, steps=steps, guidance=guidance, seed=seed)
            rows, what = len(classes), f"one row per class ({', '.join(map(str, classes))}), guidance {guidance}"
        else:
            images = self.sample(router, num_samples=max_rows * per_row, steps=steps, seed=seed)
            rows, what = max_rows, "unconditional samples"
        value_range = (self.data_range[0], self.data_range[1]) if self.data_range else (-1.0, 1.0)
        caption = f"{type(self).__name__}: {what}, {steps} sampling steps"
        return Preview(images=images.detach().cpu(), rows=rows, value_range=value_range, caption=caption)


def _rows_of(one: Tensor, count: int) -> Tensor:
    """One sample's value (a leading 1 optional) repeated as ``count`` rows."""
    one = one if one.ndim and one.shape[0] == 1 else one.unsqueeze(0)
    return one.expand(count, *one.shape[1:])


def _describe(batch: Any) -> str:
    if isinstance(batch, Tensor):
        return f"a {batch.dtype} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} items"
    return type(batch).__name__
