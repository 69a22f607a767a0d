"""Plain backbones made DiffusionBlocks-ready (ConditioningAdapter) and the Classification task."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.data import FashionMNISTDataModule, find_fashion_mnist_dir
from lightning_diffusionblocks.models import ConditioningAdapter
from lightning_diffusionblocks.partition import autograd_leaves
from lightning_diffusionblocks.tasks import Classification
from tests.conftest import trainer_kwargs
from tests.fakes import FACTORS, Recorder, Scale
from tests.reference import SIGMA_MAX, close, cross_entropy, edm_boundaries, edm_grid, gen, owner, weight


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
def test_untrained_conditioning_adapter_leaves_the_vit_unchanged(name):
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


# ------------------------------------------- the Classification task against the paper's equations (tests/reference.py)


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


class Table(nn.Module):
    """``net(mode="embeddings")`` returns ``table``, or fails when there is none."""

    def __init__(self, table: Tensor | None) -> None:
        super().__init__()
        self.table = table

    def forward(self, mode: str = "logits") -> Tensor:
        if self.table is None:
            raise RuntimeError("no table")
        return self.table


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


def test_classification_refuses_float_labels_and_image_networks_by_name() -> None:
    """Float labels are refused (the one-hot hint only for (N, num_classes) labels); a network declaring image
    outputs is refused by bind, naming the task that reads them."""
    task = Classification(num_classes=3)
    x = torch.zeros(3, 2)
    with pytest.raises(
        ValueError, match=r"^Labels must be a 1-D integer tensor, got torch\.float32 of shape \(3,\)\.$"
    ):
        task.split((x, torch.zeros(3)))
    with pytest.raises(ValueError, match=r"of shape \(3, 3\)\. For one-hot labels pass labels\.argmax\(-1\)\.$"):
        task.split((x, torch.eye(3)))

    class ImageNet(nn.Module):
        diffusionblocks_outputs = "image-shaped outputs (a denoised image, a velocity or a noise estimate)"

    with pytest.raises(ValueError, match=r"^ImageNet returns image-shaped outputs .* Train it with"):
        task.bind(ImageNet())


def test_classification_preview_is_the_confusion_matrix_and_the_accuracy_after_each_sigma_step() -> None:
    """The preview shows the bridge's chain on ``batch``: accuracy after each σ step (text and scalars), the last
    step's confusion matrix (rows: true class, columns: predicted), B steps and seed 0 unless given."""
    net = FakeClassifier()
    module = ldb.DiffusionBlocksModule(net, Classification(5), num_blocks=3)
    task, router = module.task, module.router()
    inputs = torch.randn(12, 3, generator=gen(5))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 4])
    for steps, seed, options in ((5, 2, {"steps": 5, "seed": 2}), (3, 0, {})):
        chain = task.probability_chain(router, inputs, steps, seed)
        preview = task.preview(router, (inputs, labels), **options)
        assert len(chain) == steps
        hits = [[int(p.argmax()) == int(y) for p, y in zip(probs, labels)] for _, probs in chain]
        accuracy = [sum(h) / len(h) for h in hits]
        assert preview.scalars == pytest.approx({f"accuracy_step_{i}": a for i, a in enumerate(accuracy)})
        assert preview.text == [f"step {i}: sigma {s:.4g}, accuracy {a:.3f}" for i, ((s, _), a) in
                                enumerate(zip(chain, accuracy))]  # fmt: skip
        predicted = [int(p.argmax()) for p in chain[-1][1]]
        counts = [[0] * 5 for _ in range(5)]
        for y, p in zip(labels.tolist(), predicted):
            counts[y][p] += 1
        assert preview.table == (["true/predicted", "0", "1", "2", "3", "4"], [[str(c), *counts[c]] for c in range(5)])
        assert preview.caption == f"Classification: 12 inputs, {steps} sigma steps"
        assert (preview.images, preview.tokens) == (None, None)
    assert any(counts[c][p] for c in range(5) for p in range(5) if c != p)  # the matrix is not a diagonal
    assert counts != [list(row) for row in zip(*counts)]  # nor symmetric: a transposed matrix would differ
