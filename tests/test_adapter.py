"""ConditioningAdapter across plain-backbone families: token layouts, adaLN-Zero, refusals, block-wise training."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from timm.layers import GatedMlp
from timm.models.mlp_mixer import Affine, MlpMixer, ResBlock, SpatialGatingBlock
from timm.models.vision_transformer import ResPostBlock
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.models import ConditioningAdapter
from tests.conftest import trainer_kwargs

D = 32
TIMM = {  # family → timm name; all built with the same tiny ViT-style kwargs
    "vit": "vit_tiny_patch16_224",
    "deit": "deit_tiny_patch16_224",
    "eva02": "eva02_tiny_patch14_224",  # rotary position embedding
    "beit": "beit_base_patch16_224",  # relative position bias in every block
    "vit_relpos": "vit_relpos_small_patch16_224",  # relative position MLP
}
MIXERS = {  # the timm registry fixes patch_size for these, so build the class with its own tiny kwargs
    "mixer": {},
    "resmlp": {"block_layer": ResBlock, "norm_layer": Affine, "mlp_ratio": 4},
    "gmlp": {"block_layer": SpatialGatingBlock, "mlp_layer": GatedMlp, "mlp_ratio": 6},
}
LAYOUT = {"vit": "token", "deit": "token", "eva02": "additive", "beit": "additive", "vit_relpos": "additive",
          "mixer": "additive", "resmlp": "additive"}  # fmt: skip
FAMILIES = list(LAYOUT)


def build(family: str, depth: int = 2, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    if family in TIMM:
        return timm.create_model(TIMM[family], pretrained=False, num_classes=0, img_size=16, patch_size=4,
                                 in_chans=1, depth=depth, embed_dim=D, num_heads=2, **kwargs)  # fmt: skip
    return MlpMixer(num_classes=0, img_size=16, in_chans=1, patch_size=4, num_blocks=depth, embed_dim=D,
                    **MIXERS[family], **kwargs)  # fmt: skip


def noisy(n: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 16, 16, generator=g), torch.randn(n, D, generator=g), torch.tensor([0.05, 1.0, 20.0])[:n]


def first_block_inputs(backbone: nn.Module) -> list[Tensor]:
    seen: list[Tensor] = []
    backbone.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))  # after the adapter's own hook
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_film_adapter_per_family(family: str) -> None:
    backbone = build(family).eval()
    x, z, sigma = noisy()
    before = backbone.forward_features(x)
    adapter = ConditioningAdapter(backbone, num_classes=5)
    assert adapter.layout == LAYOUT[family], adapter.layout_reason
    assert torch.equal(backbone.forward_features(x), before)  # building (and probing) left no trace
    seen = first_block_inputs(backbone)
    backbone.forward_features(x)
    own = seen[-1]
    nn.init.normal_(adapter.head.weight, std=0.1)  # the zero-initialised head would stop every gradient
    logits = adapter(x, z, sigma)
    assert logits.shape == (3, 5)
    # untrained, the first block sees exactly the backbone's own tokens (plus the target token in that layout)
    if adapter.layout == "token":
        assert seen[-1].shape[1] == own.shape[1] + 1
        assert torch.equal(seen[-1][:, 1:], own)
    else:
        assert torch.equal(seen[-1], own)
    assert torch.equal(backbone.forward_features(x), before)  # hooks are inert outside the adapter
    logits.logsumexp(-1).sum().backward()
    for block in (backbone.blocks[0], backbone.blocks[-1]):
        grads = {n: p.grad for n, p in block.named_parameters()}
        assert all(g is not None for g in grads.values())
        assert any(g.abs().sum() > 0 for n, g in grads.items() if "noise_modulation" not in n)
        assert block.noise_modulation.linear.weight.grad.abs().sum() > 0
    if adapter.layout == "additive":
        assert adapter.target_proj.weight.grad.abs().sum() > 0  # the noisy target reaches the stack


@pytest.mark.parametrize("family", FAMILIES)
def test_adaln_zero_blocks_start_as_identity(family: str) -> None:
    backbone = build(family).eval()
    x, z, sigma = noisy()
    before = backbone.forward_features(x)
    adapter = ConditioningAdapter(backbone, num_classes=5, conditioning="adaln_zero")
    assert adapter.layout == LAYOUT[family]
    pairs: list[tuple[Tensor, Tensor]] = []
    for block in backbone.blocks:  # prepend: record before the adapter's hook ends the stack at the last block
        block.register_forward_hook(lambda m, a, out: pairs.append((a[0], out)), prepend=True)
    nn.init.normal_(adapter.head.weight, std=0.1)
    adapter(x, z, sigma).logsumexp(-1).sum().backward()
    assert len(pairs) == len(backbone.blocks)
    for inp, out in pairs:
        assert torch.equal(out, inp)  # gates are 0: every block is the identity at init
    assert torch.equal(backbone.forward_features(x), before)  # the hooks do nothing outside the adapter
    pairs.clear()
    for block in backbone.blocks:
        grad = block.noise_modulation.linear.weight.grad.view(6, D, D)
        assert grad[[2, 5]].abs().sum() > 0  # gates learn first, as in DiT
        assert grad[[0, 1, 3, 4]].abs().sum() == 0  # shift/scale only matter once a gate opens
    with torch.no_grad():
        for block in backbone.blocks:  # open the gates (bias rows 2 and 5): the branches now reach the stream
            block.noise_modulation.linear.bias.view(6, D)[[2, 5]] = 1.0
        opened = adapter(x, z, sigma)
        assert not any(torch.equal(out, inp) for inp, out in pairs)
        for block in backbone.blocks:  # shift/scale of norm1/norm2 (gates kept) change what the branches compute
            block.noise_modulation.linear.bias.view(6, D)[[0, 1, 3, 4]] = 0.5
        assert not torch.equal(adapter(x, z, sigma), opened)


def test_adaln_zero_copy_uses_its_own_weights() -> None:
    adapter = ConditioningAdapter(build("mixer"), num_classes=4, conditioning="adaln_zero")
    with torch.no_grad():
        for p in (adapter.head.weight, *[b.noise_modulation.linear.weight for b in adapter.backbone.blocks]):
            nn.init.normal_(p, std=0.1)
    twin = copy.deepcopy(adapter)  # e.g. EMA weights
    x, z, sigma = noisy()
    with torch.no_grad():
        torch.testing.assert_close(twin(x, z, sigma), adapter(x, z, sigma))
        for block in twin.backbone.blocks:
            block.noise_modulation.linear.weight.zero_()
        assert not torch.allclose(twin(x, z, sigma), adapter(x, z, sigma))


def test_explicit_layouts_and_bad_options() -> None:
    vit = build("vit").eval()
    adapter = ConditioningAdapter(vit, num_classes=4, layout="additive")  # selectable where a token would work
    assert adapter.layout == "additive"
    assert adapter(*noisy()).shape == (3, 4)
    with pytest.raises(ValueError, match=r"layout='token' cannot work with Eva: one extra token breaks its rotary"):
        ConditioningAdapter(build("eva02"), num_classes=4, layout="token")
    with pytest.raises(ValueError, match=r"layout must be one of \('auto', 'token', 'additive'\), got 'prepend'"):
        ConditioningAdapter(build("vit"), num_classes=4, layout="prepend")
    with pytest.raises(ValueError, match=r"conditioning must be one of \('film', 'adaln_zero'\), got 'adaln'"):
        ConditioningAdapter(build("vit"), num_classes=4, conditioning="adaln")


def test_refused_backbones_name_the_cause_and_the_fix() -> None:
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=16,
                             in_chans=1, patch_size=4, depths=(1, 1), embed_dim=D, num_heads=(2, 2),
                             window_size=2)  # fmt: skip
    with pytest.raises(ValueError, match=r"SwinTransformer is hierarchical: its stages go 32 channels.*isotropic"):
        ConditioningAdapter(swin, num_classes=4)
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=0, in_chans=1, depths=(1, 1, 1, 1),
                                 dims=(8, 8, 16, 16))  # fmt: skip
    with pytest.raises(ValueError, match=r"ConvNeXt is hierarchical.*use an isotropic backbone"):
        ConditioningAdapter(convnext, num_classes=4)
    gmlp = build("gmlp")
    assert ConditioningAdapter(gmlp, num_classes=4).layout == "additive"  # FiLM needs only the block's input
    with pytest.raises(ValueError, match=r"block 0 \(SpatialGatingBlock\).*Use conditioning='film'"):
        ConditioningAdapter(build("gmlp"), num_classes=4, conditioning="adaln_zero")
    with pytest.raises(ValueError, match=r"ResPostBlock is not one: `norm1` does not normalise.*conditioning='film'"):
        ConditioningAdapter(build("vit", block_fn=ResPostBlock), num_classes=4, conditioning="adaln_zero")


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img_size = (16, 16)
        self.proj = nn.Conv2d(1, D, 4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class GridMix(nn.Module):
    """A token-mixing block under a name no rule knows: only running it with one extra token tells."""

    def __init__(self, width: int = D) -> None:
        super().__init__()
        self.mix, self.out = nn.Linear(16, 16), nn.Linear(D, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(x + self.mix(x.transpose(1, 2)).transpose(1, 2))


class Grid(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (D, D)) -> None:
        super().__init__()
        self.embed_dim = D
        self.patch_embed = PatchEmbed()
        self.blocks = nn.Sequential(*(GridMix(w) for w in widths))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.blocks(self.patch_embed(x))


def test_probe_finds_what_rules_miss() -> None:
    grid = Grid().train()
    grid.blocks[0].eval()
    adapter = ConditioningAdapter(grid, num_classes=3)
    assert adapter.layout == "additive"
    assert "one extra token breaks it (RuntimeError" in adapter.layout_reason
    assert [m.training for m in (grid, grid.blocks[0], grid.blocks[1])] == [True, False, True]  # modes restored
    assert adapter(*noisy(2)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"layout='token' cannot work with Grid: with one extra token it raises"):
        ConditioningAdapter(Grid(), num_classes=3, layout="token")
    with pytest.raises(ValueError, match=r"Grid's block 1 \(GridMix\) maps shape \(1, 16, 32\) to \(1, 16, 8\)"):
        ConditioningAdapter(Grid((D, 8)), num_classes=3)


@pytest.mark.parametrize(("family", "conditioning"), [("eva02", "adaln_zero"), ("mixer", "film")])
def test_blockwise_training_on_fixed_token_backbones(tmp_path: Path, family: str, conditioning: str) -> None:
    adapter = ConditioningAdapter(build(family, depth=4), num_classes=3, conditioning=conditioning)
    module = ldb.DiffusionBlocksModule(adapter, task=ldb.tasks.Classification(3), num_blocks=2, stem="shared")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (32,), generator=g)
    data = TensorDataset(torch.randn(32, 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1), labels)
    L.Trainer(strategy="diffusionblocks", max_steps=4, **trainer_kwargs(tmp_path)).fit(
        module, DataLoader(data, batch_size=8)
    )
    assert module.global_step == 4
    assert any(b.noise_modulation.linear.weight.abs().sum() > 0 for b in adapter.backbone.blocks)  # blocks trained
    probs = module.predict_proba(torch.randn(5, 1, 16, 16))
    assert probs.shape == (5, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
