"""Make a plain backbone DiffusionBlocks-ready without touching its source.

`ConditioningAdapter` wraps a backbone whose block stack maps (N, T, D) → (N, T, D) tokens of one width
(timm ViT/DeiT, EVA/EVA-02, BEiT, ``vit_relpos_*``, MLP-Mixer, ResMLP, or a user's own module). Through
forward hooks (:mod:`~lightning_diffusionblocks.models.stack_hooks`) it

- conditions every block on the noise level with a zero-initialised modulation, a submodule added to the
  block so it belongs to the block's group (``conditioning=``):

  - ``"film"`` (default): shift/scale of the block's input. Untrained, every block computes what it always
    did, so a pretrained backbone keeps its function at the start of training.
  - ``"adaln_zero"``: the paper's DiT-style layers. Shift/scale of the outputs of the block's two pre-norms
    and a gate on each residual branch, from Linear(SiLU(c)) → 6·D. The gates start at 0, so every block
    starts as the identity (DiT's choice: stable from scratch, but a pretrained backbone's function is not
    kept). Needs pre-norm blocks whose sublayers the adapter can find; others are refused.

- carries the noisy target c_in·z through the stack (``layout=``):

  - ``"token"``: c_in·z (+ a learned position) is an extra token prepended to the tokens entering the first
    running block, and read back where the stack ends (the official ViT code's layout).
  - ``"additive"``: a zero-initialised projection of c_in·z is added to every token entering the first
    running block, and the readout is the mean of the stack's output tokens. For backbones whose token
    count is fixed by their position machinery (rotary embeddings, relative position bias, token-mixing
    MLPs), where one extra token breaks the backbone.
  - ``"auto"`` (default): "additive" when such machinery is found (by module type, then by running the
    backbone once on a tiny example with one extra token, when it has an image patch embedding to build
    one), else "token". ``adapter.layout``/``adapter.layout_reason`` say what was chosen and why.

- skips whatever the backbone computes after its stack and reads out the class logits with EDM
  preconditioning: D = c_out·norm(readout) + c_skip·z, a final adaLN modulation and a linear classifier.

Hierarchical backbones (Swin, ConvNeXt, …), whose stages change the token count or width, are refused:
DiffusionBlocks trains groups of one stack of same-shape blocks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.models.dit import NoiseEmbedding
from lightning_diffusionblocks.models.stack_hooks import (
    CONDITIONINGS,
    AdapterError,
    Conditioning,
    StackFinished,
    StackHooks,
    infer_width,
)
from lightning_diffusionblocks.noise import edm_scalings
from lightning_diffusionblocks.partition import _first_tensor, find_block_stack
from lightning_diffusionblocks.records import RecordsInitArgs

Layout = Literal["auto", "token", "additive"]
LAYOUTS: tuple[str, ...] = ("auto", "token", "additive")

_ROTARY = re.compile(r"Rope|RoPE|Rotary")
_RELATIVE = re.compile(r"RelPos(Bias|Mlp)|RelativePosition")
_GRID_MIXING = re.compile(r"^LPI$|LocalPatchInteraction")
_ISOTROPIC = "ViT, DeiT, EVA, BEiT, vit_relpos, MLP-Mixer or ResMLP"


def fixed_token_count_cause(backbone: nn.Module) -> str | None:
    """Why one extra token would break ``backbone`` (its position machinery is sized for the patch grid), or None."""
    for name, module in backbone.named_modules():
        kind = type(module).__name__
        where = f"{kind} at `{name or '.'}`"
        if _ROTARY.search(kind):
            return f"rotary position embedding ({where}), computed for exactly the patch grid"
        if _RELATIVE.search(kind) or getattr(module, "relative_position_bias_table", None) is not None:
            return f"relative position bias ({where}), sized for exactly the patch grid"
        if _GRID_MIXING.search(kind):
            return f"local patch interaction ({where}, XCiT), which folds the tokens back into the patch grid"
        if any(isinstance(getattr(module, a, None), nn.Module) for a in ("mlp_tokens", "linear_tokens")) or (
            "SpatialGating" in kind
        ):
            return f"token-mixing MLP ({where}), with one weight per token position"
    return None


def hierarchy_cause(backbone: nn.Module) -> str | None:
    """How a timm backbone's stages change width or resolution (from its ``feature_info``), or None."""
    info = getattr(backbone, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return None
    stages: list[tuple[Any, Any]] = []
    for entry in info:
        if isinstance(entry, dict) and (entry.get("num_chs"), entry.get("reduction")) not in stages[-1:]:
            stages.append((entry.get("num_chs"), entry.get("reduction")))
    if len(stages) < 2:
        return None
    return "its stages go " + " → ".join(f"{chs} channels at 1/{red} resolution" for chs, red in stages)


def _patch_embed(backbone: nn.Module) -> nn.Module | None:
    for name in ("patch_embed", "stem"):  # timm transformers / timm MLP-Mixer and ResMLP
        module = getattr(backbone, name, None)
        if isinstance(module, nn.Module) and getattr(module, "img_size", None) is not None:
            return module
    return None


def _example_input(backbone: nn.Module) -> Tensor | None:
    """One tiny image the backbone accepts (from its patch embedding), to probe it; None when unknown."""
    embed = _patch_embed(backbone)
    size = getattr(embed, "img_size", None)
    channels = getattr(getattr(embed, "proj", None), "in_channels", None)
    if channels is None and embed is not None:  # a convolutional stem (XCiT, LeViT): its first convolution's input
        channels = next((m.in_channels for m in embed.modules() if isinstance(m, nn.Conv2d)), None)
    if size is None or not isinstance(channels, int):
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    param = next(backbone.parameters(), None)
    image = torch.randn(1, channels, *size, generator=torch.Generator().manual_seed(0))
    return image if param is None else image.to(param.device, param.dtype if param.is_floating_point() else None)


@contextmanager
def _probing(backbone: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, private RNG: a probe leaves no trace on the backbone or on the user's random stream."""
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _probe_stack(call: Callable[[], Any], blocks: Sequence[nn.Module], extra_token: bool) -> list[tuple]:
    """Run the backbone once with temporary hooks; return each block's (input shape, output shape).

    ``extra_token`` prepends one zero token to the first block's input, as the token layout does.
    """
    shapes: list[tuple] = []

    def enter(block: nn.Module, args: tuple) -> tuple | None:
        x = _first_tensor(args)
        if extra_token and not shapes and x is not None and x.ndim == 3:
            return (torch.cat([torch.zeros_like(x[:, :1]), x], dim=1), *args[1:])
        return None

    def leave(block: nn.Module, args: tuple, output: Any) -> None:
        x, y = _first_tensor(args), _first_tensor(output)
        shapes.append((None if x is None else tuple(x.shape), None if y is None else tuple(y.shape)))
        if len(shapes) == len(blocks):
            raise StackFinished(y)

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        call()
    except StackFinished:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class ConditioningAdapter(RecordsInitArgs, StackHooks, nn.Module):
    """σ-conditioned classifier around a plain backbone (see the module docstring).

    Args:
        backbone: e.g. ``timm.create_model("vit_tiny_patch16_224", num_classes=0)``.
        num_classes: size of the label embedding and of the readout.
        dim: token width (read from ``embed_dim``/``num_features``… when omitted).
        block_path: dotted path of the block stack (found automatically for timm/Hugging Face layouts).
        features: name of the backbone method that runs embedding and stack (``forward_features`` for timm;
            falls back to calling the backbone).
        learn_embedding: train the label embedding (official code). Must be False with per-group stems,
            where each group would otherwise learn its own, incompatible embedding space.
        layout: how the noisy target travels through the stack: ``"auto"``, ``"token"`` or ``"additive"``.
        conditioning: how blocks see the noise level: ``"film"`` (keeps the backbone's function at init) or
            ``"adaln_zero"`` (the paper's DiT layers; every block starts as the identity).
    """

    #: what the adapter returns, checked by the task that binds it (``Task.reads``): it serves Classification
    diffusionblocks_outputs = "class logits"

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        dim: int | None = None,
        block_path: str | None = None,
        features: str = "forward_features",
        learn_embedding: bool = True,
        layout: Layout = "auto",
        conditioning: Conditioning = "film",
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}.")
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}.")
        hierarchy = hierarchy_cause(backbone) if block_path is None else None
        if hierarchy:
            raise ValueError(
                f"{type(backbone).__name__} is hierarchical: {hierarchy}. DiffusionBlocks needs one stack of blocks"
                f" that keep (N, T, D) tokens of one width; use an isotropic backbone ({_ISOTROPIC}) instead."
            )
        self.backbone = backbone
        self.block_path, blocks = find_block_stack(backbone, block_path)
        #: where DiffusionBlocks finds the stack inside the adapter
        self.diffusionblocks_stack_path = f"backbone.{self.block_path}"
        self.dim = dim or infer_width(backbone)
        self.num_classes = num_classes
        self.features = features if hasattr(backbone, features) else None
        self.learn_embedding = learn_embedding
        example = _example_input(backbone)
        self.layout, self.layout_reason, probed = self._choose_layout(layout, blocks, example)
        d = self.dim
        self.noise_embed = NoiseEmbedding(d)
        self.label_embed = nn.Embedding(num_classes, d)
        nn.init.normal_(self.label_embed.weight, std=0.02)
        self.label_embed.weight.requires_grad_(learn_embedding)
        if self.layout == "token":
            self.target_pos = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.target_pos, std=0.02)
        else:  # zero-initialised: the untrained adapter feeds the blocks the backbone's own tokens
            self.target_proj = nn.Linear(d, d, bias=False)
            nn.init.zeros_(self.target_proj.weight)
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(d, 2 * d)
        self.head = nn.Linear(d, num_classes)
        for layer in (self.final_ada, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.install_stack_hooks(blocks, conditioning)
        if conditioning == "adaln_zero" and example is not None and probed:
            with _probing(backbone):  # adaLN-Zero checks the blocks' sublayer order as they run: do it now
                zeros = torch.zeros(1, d, dtype=example.dtype, device=example.device)
                self._features(example, zeros, zeros)

    # ------------------------------------------------------------------ DiffusionBlocksModule protocol
    def diffusionblocks_check_stem(self, stem: str) -> None:
        """Asked by :class:`~lightning_diffusionblocks.DiffusionBlocksModule`: a learned label embedding must be
        one table for all groups, so per-group stems (each group trains its own copy) are refused."""
        if stem == "per_group" and self.learn_embedding:
            raise ValueError(
                "With stem='per_group' every group owns a copy of the label embedding, so learned copies would drift"
                " into incompatible target spaces. Use stem='shared' (the official code) or build the network with"
                " learn_embedding=False."
            )

    # ------------------------------------------------------------------ layout
    def _choose_layout(self, layout: str, blocks: Sequence[nn.Module], example: Tensor | None) -> tuple[str, str, bool]:
        """Resolve ``layout`` (see the module docstring) → (layout, why, whether the backbone was probed).

        Also refuses a stack whose blocks change the token shape, when the probe can run the backbone.
        """
        name = type(self.backbone).__name__
        cause = fixed_token_count_cause(self.backbone)
        if cause and layout == "token":
            raise ValueError(
                f"layout='token' cannot work with {name}: one extra token breaks its {cause}."
                " Use layout='additive' (or 'auto')."
            )
        if cause:
            chosen, reason = "additive", f"its {cause}"
        elif layout == "auto":
            chosen, reason = "token", "no fixed token count found"
        else:
            chosen, reason = layout, f"layout={layout!r}"
        if example is None:
            return chosen, reason + (" (not probed: no image patch embedding)" if layout == "auto" else ""), False
        call = self._backbone_call(example)
        with _probing(self.backbone):
            try:
                shapes = _probe_stack(call, blocks, extra_token=False)
            except Exception:  # noqa: BLE001 - the example does not fit this backbone: inconclusive, decide statically
                return chosen, reason + " (probe inconclusive)", False
            for index, (x, y) in enumerate(shapes):
                if x is None or len(x) != 3 or x[-1] != self.dim or y != x:
                    raise AdapterError(
                        f"{name}'s block {index} ({type(blocks[index]).__name__}) maps shape {x} to {y}."
                        f" DiffusionBlocks needs one stack of blocks that keep (N, T, {self.dim}) tokens; use an"
                        f" isotropic backbone ({_ISOTROPIC}), or pass block_path/dim for such a stack."
                    )
            if chosen == "token":
                try:
                    _probe_stack(call, blocks, extra_token=True)
                except Exception as err:  # noqa: BLE001 - whatever the backbone raises, one extra token broke it
                    message = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    if layout == "token":
                        raise ValueError(
                            f"layout='token' cannot work with {name}: with one extra token it raises {message}."
                            " Use layout='additive' (or 'auto')."
                        ) from err
                    return "additive", f"one extra token breaks it ({message})", True
                reason += "; an extra token runs through it"
        return chosen, reason, True

    def _backbone_call(self, inputs: Tensor) -> Callable[[], Any]:
        call = getattr(self.backbone, self.features) if self.features is not None else self.backbone
        return lambda: call(inputs)

    def _check_inputs(self, inputs: Tensor) -> None:
        patch_embed = _patch_embed(self.backbone)
        size = getattr(patch_embed, "img_size", None)
        size = (size, size) if isinstance(size, int) else size
        strict = size is not None and getattr(patch_embed, "strict_img_size", True) and inputs.ndim == 4
        if strict and size is not None and tuple(inputs.shape[-2:]) != tuple(size):
            raise ValueError(
                f"Images are {tuple(inputs.shape[-2:])} but the backbone was built for {tuple(size)}."
                f" Resize the data or create the backbone with img_size={tuple(inputs.shape[-2:])}."
            )

    # ------------------------------------------------------------------ forward
    def embeddings(self) -> Tensor:
        """The L2-normalised label embeddings (C, D): the clean targets, in training and sampling alike."""
        return F.normalize(self.label_embed.weight, dim=-1)

    def _features(self, inputs: Tensor, c: Tensor, target: Tensor) -> Tensor:
        """Run the stack with noise embedding ``c`` and preconditioned target ``target`` (N, D); return (N, D)."""
        call = self._backbone_call(inputs)
        if self.layout == "token":
            hidden = self.run_hooked(call, c, prepend=target[:, None, :] + self.target_pos)
            return hidden[:, 0]
        hidden = self.run_hooked(call, c, add=self.target_proj(target.to(self.target_proj.weight.dtype)))
        return hidden.mean(dim=1)

    def forward(
        self,
        inputs: Tensor | None = None,
        z: Tensor | None = None,
        sigma: Tensor | None = None,
        sigma_data: float = 0.5,
        mode: str = "logits",
    ) -> Tensor:
        """``mode="logits"``: class logits for noisy targets ``z`` (N, D) at noise ``sigma`` (N,).
        ``mode="embeddings"``: the normalised label embeddings (so per-group copies are used correctly)."""
        if mode == "embeddings":
            return self.embeddings()
        if mode != "logits" or inputs is None or z is None or sigma is None:
            raise ValueError("Call the adapter as adapter(inputs, z, sigma) or adapter(mode='embeddings').")
        self._check_inputs(inputs)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma.float().view(-1, 1), sigma_data)
        c = self.noise_embed(c_noise.flatten())
        readout = self._features(inputs, c, c_in * z.float())
        denoised = c_out * self.norm(readout.float()) + c_skip * z.float()
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.head(denoised * (1 + scale) + shift)
