"""How ``v020_*.ckpt`` and ``v020_samples.pt`` were made: with the code of release 0.2.0, not with this tree's.

The files pin that checkpoints written by 0.2.0 still load, sample identically and resume
(``tests/test_old_checkpoints.py``). They were written by the 0.2.0 release commit
2287e708887504056e6e9987ec72f936c81624c6 (the last commit whose ``pyproject.toml`` says ``version = "0.2.0"``):

    git worktree add /tmp/v020 2287e708887504056e6e9987ec72f936c81624c6
    cd /tmp/v020 && ln -s <this checkout>/.venv .venv
    OMP_NUM_THREADS=1 PYTHONPATH=/tmp/v020 .venv/bin/python <this checkout>/tests/data/make_v020_checkpoint.py \
        <this checkout>/tests/data
    git worktree remove /tmp/v020

(torch 2.x on a CPU, one thread.) Each formulation 0.2.0 offered for images — EDM ``ImageGeneration``, rectified-flow
``FlowMatching``, ``DDPM`` — gets a very small DiT (depth 3, width 4), B = 3 groups, seed 0, 3 block-wise training
steps with ``Trainer(strategy="diffusionblocks")``; then 4 labelled samples with a fixed seed and one step per group
are drawn by that same old code and stored as the expected samples.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb

COMMIT = "2287e708887504056e6e9987ec72f936c81624c6"
#: what the test samples with: labels, seed and steps (one per group)
SAMPLE_LABELS = [0, 3, 7, 10]  # 10: the null label (an unconditional sample)
SAMPLE_SEED = 5
STEPS = 3


def tiny_net() -> torch.nn.Module:
    torch.manual_seed(0)
    return ldb.models.DiT(image_size=8, channels=1, patch=4, dim=4, depth=3, heads=2, num_classes=10)


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, 1, 8, 8, generator=g) * 2 - 1
    labels = torch.randint(0, 10, (16,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=8, shuffle=False)


def tasks() -> dict[str, object]:
    return {
        "edm": ldb.tasks.ImageGeneration(),
        "flow": ldb.tasks.FlowMatching(),
        "ddpm": ldb.tasks.DDPM(noise=ldb.DDPMSchedule(num_timesteps=30)),
    }


def main(out: Path) -> None:
    if ldb.__version__ != "0.2.0":
        raise SystemExit(f"Run this with the 0.2.0 code ({COMMIT}) on PYTHONPATH, got version {ldb.__version__}.")
    torch.set_num_threads(1)
    expected = {}
    for name, task in tasks().items():
        module = ldb.DiffusionBlocksModule(tiny_net(), task, num_blocks=3, lr=1e-3, seed=0)
        trainer = L.Trainer(
            strategy="diffusionblocks", accelerator="cpu", devices=1, max_steps=3, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=out / "_v020_run",
        )  # fmt: skip
        trainer.fit(module, loader())
        # the EDM file is a full checkpoint (resumable); the others keep only what loading and sampling read
        trainer.save_checkpoint(out / f"v020_{name}.ckpt", weights_only=name != "edm")
        expected[name] = module.sample(labels=torch.tensor(SAMPLE_LABELS), steps=STEPS, seed=SAMPLE_SEED)
    torch.save({"commit": COMMIT, "labels": SAMPLE_LABELS, "seed": SAMPLE_SEED, "steps": STEPS, **expected},
               out / "v020_samples.pt")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
