"""Plain backbones made DiffusionBlocks-ready (ConditioningAdapter) and the Classification task."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.data import FashionMNISTDataModule, find_fashion_mnist_dir
from lightning_diffusionblocks.models import ConditioningAdapter
from lightning_diffusionblocks.partition import autograd_leaves
from tests.conftest import trainer_kwargs


def tiny_vit(name: str = "vit_tiny_patch16_224", depth: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=16, patch_size=4, in_chans=1,
                             depth=depth, embed_dim=32, num_heads=2)  # fmt: skip


class MyEncoder(nn.Module):
    """A user's own model: a stem, a `layers` stack of (N, T, D) blocks, its own head."""

    def __init__(self, dim: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.hidden_size = dim
        self.embed = nn.Linear(16, dim)
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, 2, 48, batch_first=True) for _ in range(depth))
        self.out = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 16))
        for layer in self.layers:
            h = layer(h)
        return self.out(h.mean(1))


def loader(n: int = 48, num_classes: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.randn(n, 1, 16, 16, generator=g) + labels.view(-1, 1, 1, 1).float()
    return DataLoader(TensorDataset(images, labels), batch_size=16)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "vit_small_patch16_224"])
def test_untrained_adapter_leaves_the_backbone_unchanged(name):
    vit = tiny_vit(name)
    x = torch.randn(2, 1, 16, 16)
    before = vit.forward_features(x)
    adapter = ConditioningAdapter(vit, num_classes=5)
    assert torch.equal(vit.forward_features(x), before)  # hooks are inert outside the adapter
    # inside the adapter the zero-initialised modulation is the identity: the first block sees exactly the
    # backbone's own tokens, with the noisy-target token prepended
    seen = []
    vit.blocks[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    adapter(x, torch.randn(2, 32), torch.tensor([0.3, 3.0]))
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    assert seen[-1].shape[1] == tokens.shape[1] + 1
    assert torch.equal(seen[-1][:, 1:], tokens)


def test_adapter_logits_shape_and_ownership():
    adapter = ConditioningAdapter(tiny_vit(), num_classes=5)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(5), num_blocks=3, stem="shared")
    assert module.network.block_path == "backbone.blocks"
    x, z = torch.randn(3, 1, 16, 16), torch.randn(3, 32)
    for g in range(3):
        logits = module.network(x, z, torch.full((3,), 0.5), group=g)
        assert logits.shape == (3, 5)
        leaves = autograd_leaves(logits.sum())
        own = {id(p) for p in module.network.group_parameters(g)}
        others = {id(p) for k in range(3) if k != g for p in module.network.group_parameters(k)}
        assert own & leaves
        assert not others & leaves
        # the block's modulation belongs to its group
        names = {id(p): n for n, p in module.network.named_parameters()}
        assert any("noise_modulation" in names[i] for i in own)


def test_users_own_module_is_adapted_without_source_changes():
    adapter = ConditioningAdapter(MyEncoder(), num_classes=3, features="not_there")
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(3), num_blocks=2, stem="shared")
    logits = module.network(torch.randn(2, 1, 16, 16), torch.randn(2, 24), torch.ones(2), group=1)
    assert logits.shape == (2, 3)


@pytest.mark.parametrize("strategy", ["diffusionblocks", "auto"])
def test_classification_trains_and_predicts(tmp_path, strategy):
    adapter = ConditioningAdapter(tiny_vit(), num_classes=4)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(4), num_blocks=3, stem="shared", lr=3e-3)
    trainer = L.Trainer(strategy=strategy, max_steps=9, limit_val_batches=1, **trainer_kwargs(tmp_path))
    trainer.fit(module, loader(), loader())
    assert "val/acc" in trainer.callback_metrics
    probs = module.predict_proba(torch.randn(5, 1, 16, 16))
    assert probs.shape == (5, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    out = trainer.predict(module, DataLoader(TensorDataset(torch.randn(4, 1, 16, 16)), batch_size=2))
    assert torch.cat(out).shape == (4, 4)


def test_prediction_calls_each_group_once_with_default_steps():
    adapter = ConditioningAdapter(tiny_vit(), num_classes=4)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(4), num_blocks=3, stem="shared")
    calls = []
    original = module.network.forward

    def counted(*args, group=None, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if kw.get("mode") != "embeddings":
            calls.append(group)
        return original(*args, group=group, **kw)

    module.network.forward = counted
    module.predict_proba(torch.randn(2, 1, 16, 16))
    assert calls == [0, 1, 2]  # default steps = B: 80 → 0.301 → 0.002
    calls.clear()
    module.predict_proba(torch.randn(2, 1, 16, 16), steps=7)
    assert len(calls) == 7
    assert calls == sorted(calls)


def test_classification_bad_input():
    adapter = ConditioningAdapter(tiny_vit(), num_classes=4)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(4), num_blocks=3, stem="shared")
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 4\); got \[7\]"):
        module.group_loss(module.network, (torch.randn(2, 1, 16, 16), torch.tensor([1, 7])), 0, gen)
    with pytest.raises(ValueError, match="at least 1 inference step"):
        module.predict_proba(torch.randn(2, 1, 16, 16), steps=0)  # not replaced by the default
    with pytest.raises(ValueError, match=r"Images are \(24, 24\) but the backbone was built for \(16, 16\)"):
        module.predict_proba(torch.randn(2, 1, 24, 24))  # the backbone was built for 16×16 images
    with pytest.raises(ValueError, match="learn_embedding=False"):
        ldb.DiffusionBlocksModule(ConditioningAdapter(tiny_vit(), 4), ldb.tasks.Classification(4), stem="per_group")
    frozen = ConditioningAdapter(tiny_vit(), 4, learn_embedding=False)
    assert not frozen.label_embed.weight.requires_grad
    ldb.DiffusionBlocksModule(frozen, ldb.tasks.Classification(4), num_blocks=3, stem="per_group")


class Shrinking(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_dim = 8
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_backbone_that_changes_width_is_refused():
    adapter = ConditioningAdapter(Shrinking(), num_classes=3)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(3), num_blocks=2, stem="shared")
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="keep the token count and width"):
        module.network(x, torch.randn(2, 8), torch.ones(2))


def test_fashion_mnist_module(mnist_dir, tmp_path, monkeypatch):
    dm = FashionMNISTDataModule(mnist_dir, batch_size=8)
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 1, 28, 28)
    monkeypatch.setenv("LDB_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist_dir()


@pytest.mark.parametrize("weighting", ["per_sample", "batch_mean", "none"])
def test_classification_weightings(weighting):
    task = ldb.tasks.Classification(4, weighting=weighting)
    adapter = ConditioningAdapter(tiny_vit(), num_classes=4)
    module = ldb.DiffusionBlocksModule(adapter, task, num_blocks=3, stem="shared")
    batch = (torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1]))
    sigma = torch.tensor([0.002, 0.01, 0.1, 1.0, 10.0, 80.0])
    per_sample = task.loss(lambda *a, **k: module.network(*a, group=None, **k), batch, sigma, torch.Generator())
    weights = ldb.EDM.loss_weight(sigma)
    ratio = per_sample.detach()
    assert per_sample.shape == (6,)
    if weighting == "per_sample":  # untrained head: uniform logits, CE = ln 4 for every sample
        assert torch.allclose(ratio, weights * torch.log(torch.tensor(4.0)), rtol=1e-4)
    elif weighting == "batch_mean":
        assert torch.allclose(ratio, weights.mean() * torch.log(torch.tensor(4.0)).expand(6), rtol=1e-4)
    else:
        assert torch.allclose(ratio, torch.log(torch.tensor(4.0)).expand(6), rtol=1e-4)
    with pytest.raises(ValueError, match="weighting must be"):
        ldb.tasks.Classification(4, weighting="mean")
