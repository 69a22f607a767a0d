"""GPU checks: skipped without CUDA (CI has none); run on a GPU machine with `pytest tests/test_gpu.py`."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload
from tests.conftest import image_loader, tiny_dit, trainer_kwargs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_strategy_trains_on_gpu_with_offload(tmp_path, precision):
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=3)
    offload, monitor = BlockOffload(), BlockMemoryMonitor(log=False)
    kwargs = trainer_kwargs(tmp_path, accelerator="gpu", precision=precision)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=12, callbacks=[offload, monitor], **kwargs)
    trainer.fit(module, image_loader())
    assert trainer.strategy.root_device.type == "cuda"
    assert offload.stats["offloads"] >= 2
    assert all(g.cuda_peak > 0 for g in monitor.groups.values())
    group_bytes = [sum(p.numel() * 4 for p in module.network.group_parameters(g)) for g in range(3)]
    for name, stats in monitor.groups.items():
        assert stats.params == group_bytes[int(name)]
    images = module.cuda().sample(labels=[0, 1], steps=6, guidance=2.0)
    assert images.is_cuda
    assert torch.isfinite(images).all()
