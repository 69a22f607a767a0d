"""Checkpoints written by release 0.2.0 load, sample exactly as 0.2.0 sampled them, and resume training.

The files in ``tests/data`` were written and sampled by the 0.2.0 code itself (``tests/data/make_v020_checkpoint.py``
says how, with the commit): a change in how a checkpoint is read (its record, the rebuilt network and task), in the
partition, the routing or any formulation's sampler shows here as different samples.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb

DATA = Path(__file__).parent / "data"
EXPECTED = torch.load(DATA / "v020_samples.pt", weights_only=True)
TASKS = {"edm": "ImageGeneration", "flow": "FlowMatching", "ddpm": "DDPM"}


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (16,), generator=g)), batch_size=8)


@pytest.mark.parametrize("name", list(TASKS))
def test_a_0_2_0_checkpoint_loads_and_samples_bit_for_bit(name):
    """Rebuilt from the file alone (network and task from its record, safe unpickler), the model draws exactly the
    samples 0.2.0 drew from it: equal bits, no tolerance."""
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(DATA / f"v020_{name}.ckpt")
    assert type(module.task).__name__ == TASKS[name]
    assert module.num_blocks == 3
    assert module.blockwise
    samples = module.sample(labels=torch.tensor(EXPECTED["labels"]), steps=EXPECTED["steps"], seed=EXPECTED["seed"])
    assert samples.dtype == EXPECTED[name].dtype
    assert torch.equal(samples, EXPECTED[name])


def test_a_0_2_0_checkpoint_resumes_training(tmp_path):
    """``fit(ckpt_path=...)`` on a full 0.2.0 checkpoint continues its run: the 3 recorded steps are kept, the
    weights start from the file's, the groups train on, and the missing record of the run's settings is a warning."""
    ckpt = DATA / "v020_edm.ckpt"
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(ckpt)
    assert int(module.step_count) == 3
    assert int(module.group_steps.sum()) == 3
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = L.Trainer(
        strategy="diffusionblocks", accelerator="cpu", devices=1, max_steps=6, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="does not record the run's settings"):
        trainer.fit(module, _loader(), ckpt_path=ckpt)
    assert trainer.global_step == 6
    assert int(module.step_count) == 6
    assert int(module.group_steps.sum()) == 6
    changed = [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.equal(v, start[k])]
    assert any(k.startswith("network.net.blocks") for k in changed)
    after = module.sample(labels=torch.tensor(EXPECTED["labels"]), steps=EXPECTED["steps"], seed=EXPECTED["seed"])
    assert torch.isfinite(after).all()
    assert not torch.equal(after, EXPECTED["edm"])
