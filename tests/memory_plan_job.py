"""Train a DiT block-wise on the CPU (BlockOffload to disk, sequential phases) and print, as one JSON line, the memory
plan's predicted device peak per group beside the measured peak RSS of that group's training steps.

Run in a fresh process (``PYTHONPATH=<repo> python tests/memory_plan_job.py DIM DEPTH BATCH IMAGE B STEPS``) so no
other test's memory is in its RSS; the plan measures the process's baseline itself (RSS minus the model's tensors).
"""

from __future__ import annotations

import json
import sys
import tempfile

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload


def main(dim: int, depth: int, batch: int, image: int, blocks: int, steps: int) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = ldb.models.DiT(image_size=image, channels=1, patch=2, dim=dim, depth=depth, heads=4, num_classes=10)
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=blocks)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch * 2, 1, image, image, generator=g) * 2 - 1
    data = TensorDataset(images, torch.randint(0, 10, (batch * 2,), generator=g))
    monitor = BlockMemoryMonitor(log=False)
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=steps)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            strategy=strategy, accelerator="cpu", devices=1, max_steps=steps * blocks, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
            callbacks=[BlockOffload(target="disk", directory=root, prefetch=False), monitor],
        )  # fmt: skip
        trainer.fit(module, DataLoader(data, batch_size=batch))
    plan = strategy.memory_plan
    assert plan is not None
    return {
        "params": sum(p.numel() for p in module.network.parameters()),
        "baseline": plan.baseline_device,
        "predicted": {str(gp.group): plan.baseline_device + gp.device for gp in plan.groups},
        "planned": {str(gp.group): dict(vars(gp).items()) for gp in plan.groups},
        "measured": {k: v.peak_rss for k, v in monitor.groups.items()},
        "monitor": {k: vars(v) for k, v in monitor.groups.items()},
    }


if __name__ == "__main__":
    print(json.dumps(main(*(int(a) for a in sys.argv[1:7]))))
