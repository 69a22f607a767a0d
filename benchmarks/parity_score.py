"""Scoring parity runs: FID and class accuracy of a trained generator's samples.

FID (torchmetrics `FrechetInceptionDistance`) is computed on the 128-d features of a small MNIST classifier
trained here (Inception weights cannot be downloaded offline), between generated samples and real MNIST test
images; the same classifier gives the share of class-conditional samples assigned to the requested class.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.fid import FrechetInceptionDistance

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.checkpoints import CheckpointLoadError
from lightning_diffusionblocks.data.idx import load_split
from lightning_diffusionblocks.presets import GENERATION_TASKS


class FeatureNet(nn.Module):
    """A small MNIST CNN; its 128-d penultimate layer is the FID feature space."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.float()))


def mnist_tensors(root: Path, split: str) -> tuple[Tensor, Tensor]:
    images, labels = load_split(root, split)
    return torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(
        labels.astype("int64")
    )


def train_feature_net(root: Path, steps: int, seed: int = 0, device: str = "cpu") -> tuple[FeatureNet, float]:
    torch.manual_seed(seed)
    x, y = mnist_tensors(root, "train")
    x, y = x.to(device), y.to(device)
    net = FeatureNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    step = 0
    while step < steps:
        for xb, yb in loader:
            loss = F.cross_entropy(net.logits(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    net.eval()
    xt, yt = mnist_tensors(root, "test")
    xt, yt = xt.to(device), yt.to(device)
    with torch.no_grad():
        acc = float((net.logits(xt).argmax(-1) == yt).float().mean())
    return net, acc


def load_generator(out: Path) -> tuple[ldb.DiffusionBlocksModule, dict]:
    """A run's trained module, rebuilt from its checkpoint's own record of the network and task."""
    summary = json.loads((out / "summary.json").read_text())
    try:
        module = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt", map_location="cpu")
    except CheckpointLoadError:  # written before checkpoints recorded them: the demo's defaults of that time
        m = {"noise_scale": 100.0, **summary.get("model", {})}  # runs that did not record it: the demo's DiT
        net = ldb.presets.demo_dit(**m)
        task = GENERATION_TASKS[summary.get("formulation", "edm")]()
        module = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt", net=net, task=task,
                                                                map_location="cpu")  # fmt: skip
    return module.eval(), summary


@torch.no_grad()
def generation_quality(
    out: Path,
    features: FeatureNet,
    real: Tensor,
    per_class: int,
    steps: int,
    guidance: float,
    eval_seed: int = 0,
    device: str = "cpu",
) -> dict:
    """FID and class accuracy of one run's class-conditional samples (``eval_seed`` varies only the sampler)."""
    module, summary = load_generator(out)
    module.to(device)
    features = features.to(device)
    fid = FrechetInceptionDistance(feature=features, normalize=False).to(device)
    fid.update(real.to(device), real=True)
    correct = total = 0
    start = time.perf_counter()
    for chunk in torch.arange(10).repeat_interleave(per_class).split(200):
        seed = int(chunk[0]) * 7919 + total + 1_000_003 * eval_seed
        images = module.sample(labels=chunk.to(device), steps=steps, guidance=guidance, seed=seed).clamp(-1, 1)
        fid.update(images, real=False)
        correct += int((features.logits(images).argmax(-1) == chunk.to(device)).sum())
        total += len(chunk)
    return {
        "run": str(out),
        "strategy": summary["strategy"],
        "formulation": summary.get("formulation", "edm"),
        "seed": summary.get("seed", 0),
        "eval_seed": eval_seed,
        "steps": summary["steps"],
        "layer_evaluations": summary["layer_evaluations"],
        "fid": float(fid.compute()),
        "class_accuracy": correct / total,
        "samples": total,
        "sample_seconds": time.perf_counter() - start,
        "train_seconds": summary.get("train_seconds"),
        "val_loss": summary["val"].get("val/loss"),
    }
