"""Shared fixtures: tiny models, synthetic data, Trainer defaults for fast CPU tests."""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb

os.environ.setdefault("WANDB_MODE", "offline")
# Tiny models gain nothing from several threads, and the subprocess tests run 2–4 processes at once: one thread
# each (inherited by those processes) keeps them from spinning against each other (10× slower steps were seen).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)


def tiny_dit(depth: int = 6, dim: int = 32, num_classes: int = 10) -> ldb.models.DiT:
    torch.manual_seed(0)
    return ldb.presets.tiny_dit(depth=depth, dim=dim, num_classes=num_classes)


def image_loader(n: int = 64, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path: Path, **overrides) -> dict:  # noqa: ANN003
    kwargs = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        "num_sanity_val_steps": 0,
    }
    kwargs.update(overrides)
    return kwargs


def make_module(depth: int = 3, **kwargs: Any) -> ldb.DiffusionBlocksModule:
    """The tiny DiT of ``depth`` blocks under ImageGeneration, in ``num_blocks=3`` groups unless given."""
    kwargs.setdefault("num_blocks", 3)
    return ldb.DiffusionBlocksModule(tiny_dit(depth=depth), ldb.tasks.ImageGeneration(), **kwargs)


def fit(
    module: L.LightningModule,
    root: Path,
    steps: int = 3,
    strategy: object = "diffusionblocks",
    callbacks: Iterable[Callback] = (),
    loader: DataLoader | None = None,
    **trainer: Any,
) -> L.Trainer:
    """Train ``module`` for ``steps`` optimizer steps under ``strategy`` on ``loader`` (default: the synthetic images),
    with the fast CPU Trainer defaults of :func:`trainer_kwargs` (``trainer`` overrides them)."""
    fitted = L.Trainer(strategy=strategy, max_steps=steps, callbacks=list(callbacks), **trainer_kwargs(root, **trainer))
    fitted.fit(module, image_loader() if loader is None else loader)
    return fitted


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def write_mnist(root: Path, train: int = 200, test: int = 50) -> Path:
    """Synthetic MNIST-format IDX files (28×28, 10 classes) in a new directory ``root``."""
    root.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)))
    return root


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    """A directory with synthetic MNIST-format IDX files (28×28, 10 classes)."""
    return write_mnist(tmp_path / "mnist")
