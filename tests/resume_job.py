"""A training job for the resume test: run it, kill it with SIGKILL mid-phase, resume it.

python tests/resume_job.py OUT --max-steps 24 [--kill-at 14] [--resume CKPT]
python tests/resume_job.py OUT --block-parallel 3 ...      # three processes (gloo), one group each
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning_diffusionblocks as ldb  # noqa: E402
from lightning_diffusionblocks.callbacks import BlockOffload  # noqa: E402
from lightning_diffusionblocks.data import make_loader  # noqa: E402
from tests.conftest import tiny_dit  # noqa: E402


class PrintBatches(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if os.environ.get("LDB_DEBUG"):
            print("STEP", trainer.global_step, batch[1].tolist(), flush=True)


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--resume", default=None)
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--block-parallel", type=int, default=0, help="processes (one group each); 0 = one device")
    p.add_argument("--every", type=int, default=None, help="checkpoint every N steps (default 6 / 5)")
    p.add_argument("--plain-loader", action="store_true", help="block parallel: a plain DataLoader")
    args = p.parse_args()
    out = Path(args.out)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.rand(96, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (96,), generator=g)
    )
    loader = make_loader(data, batch_size=16, shuffle=True, seed=2)
    module = ldb.DiffusionBlocksModule(
        tiny_dit(),
        ldb.tasks.ImageGeneration(),
        num_blocks=3,
        weight_decay=0.05,
        warmup_steps=3,
        lr_schedule="cosine",
        gradient_clip_val=1.0,
        ema_decay=0.9,
    )
    every = args.every or (6 if args.block_parallel else 5)
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True)]
    if args.block_parallel and args.plain_loader:
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)  # Lightning shards it per group
    if not args.no_offload and not args.block_parallel:
        callbacks.insert(0, BlockOffload(directory=out / "offload"))
    callbacks.append(PrintBatches())
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at))
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=8)
    if args.block_parallel:
        strategy = ldb.BlockParallelStrategy(process_group_backend="gloo")
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=max(1, args.block_parallel),
        max_steps=args.max_steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module, loader, ckpt_path=args.resume)
    if trainer.is_global_zero:  # block parallel: every group was gathered when training ended
        torch.save(module.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main()
