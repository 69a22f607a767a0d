"""A training job for the resume tests: run it, kill it with SIGKILL at a step, resume it from a checkpoint.

python tests/resume_job.py OUT --max-steps 24 [--kill-at 14] [--resume CKPT]
python tests/resume_job.py OUT --block-parallel 3 ...      # three processes (gloo), one group each
python tests/resume_job.py OUT --data-parallel 2 ...       # two processes (gloo), the same group each step

Checkpoints: ``OUT/ckpt`` every ``--every`` steps (and ``last.ckpt``), ``OUT/epoch_ckpt`` at every epoch end
(Lightning's default ``ModelCheckpoint`` schedule) with ``--epoch-ckpt``. The final state dict goes to
``OUT/final.pt``; ``OUT/trace.txt`` lists (step, micro-batch, epoch, group, labels) of every batch rank 0 trained.
"""

from __future__ import annotations

import argparse
import json
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


class Trace(Callback):
    """Record what each batch was (rank 0), to tell a wrong shuffle from a wrong step."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                micro = pl_module.optimisation.micro
                print(
                    trainer.global_step, micro, trainer.current_epoch, pl_module.group_at(), batch[1].tolist(), file=f
                )
        if os.environ.get("LDB_DEBUG"):
            print("STEP", trainer.global_step, batch[1].tolist(), flush=True)


class KillAt(Callback):
    """SIGKILL this process when micro-batch ``micro`` of optimizer step ``step`` starts (every process of a
    multi-process run reaches it at the same batch, so the whole run dies there)."""

    def __init__(self, step: int, micro: int = 0) -> None:
        self.step, self.micro = step, micro

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.step and pl_module.optimisation.micro == self.micro:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--max-steps", type=int, default=24)
    p.add_argument("--kill-at", type=int, default=None, help="optimizer step to die at (when its batch starts)")
    p.add_argument("--kill-micro", type=int, default=0, help="with --accumulate: the micro-batch of that step")
    p.add_argument("--resume", default=None)
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--offload", action="store_true", help="BlockOffload(directory=OUT/offload/rank<r>) anyway")
    p.add_argument("--block-parallel", type=int, default=0, help="processes (one group each); 0 = one device")
    p.add_argument("--data-parallel", type=int, default=0, help="processes training the same group; 0 = one device")
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--every", type=int, default=None, help="checkpoint every N steps (default 6 / 5)")
    p.add_argument("--epoch-ckpt", action="store_true", help="also Lightning's default per-epoch checkpoint")
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--schedule", default="sequential")
    p.add_argument(
        "--loader", choices=("stateful", "plain", "ordered"), default="stateful",
        help="stateful: the package's make_loader; plain: DataLoader(shuffle=True); ordered: DataLoader(shuffle=False)",
    )  # fmt: skip
    p.add_argument("--plain-loader", action="store_true", help="same as --loader plain")
    p.add_argument("--state-precision", default=None, help="StatePrecision's fields as JSON (default fp32)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.rand(args.samples, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (args.samples,), generator=g)
    )
    loader_kind = "plain" if args.plain_loader else args.loader
    if loader_kind == "stateful":
        loader = make_loader(data, batch_size=16, shuffle=True, seed=2)
    else:  # Lightning shards it per process under several processes
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=loader_kind == "plain")
    module = ldb.DiffusionBlocksModule(
        tiny_dit(),
        ldb.tasks.ImageGeneration(),
        num_blocks=args.num_blocks,
        weight_decay=0.05,
        warmup_steps=3,
        lr_schedule="cosine",
        gradient_clip_val=1.0,
        ema_decay=0.9,
        accumulate_grad_batches=args.accumulate,
        state_precision=json.loads(args.state_precision) if args.state_precision else None,
    )
    every = args.every or (6 if args.block_parallel else 5)
    callbacks: list[Callback] = [
        ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=every, save_top_k=-1, save_last=True)
    ]
    if args.epoch_ckpt:
        callbacks.append(ModelCheckpoint(dirpath=out / "epoch_ckpt", save_top_k=-1))
    processes = args.block_parallel or args.data_parallel
    if args.offload or (not args.no_offload and not processes):
        callbacks.insert(0, BlockOffload(directory=out / "offload" / f"rank{rank}"))
    callbacks.append(Trace(out / "trace.txt"))
    if args.kill_at is not None:
        callbacks.append(KillAt(args.kill_at, args.kill_micro))
    strategy: L.pytorch.strategies.Strategy = ldb.DiffusionBlocksStrategy(schedule=args.schedule, steps_per_phase=8)
    if args.block_parallel:
        strategy = ldb.BlockParallelStrategy(process_group_backend="gloo")
    elif args.data_parallel:
        strategy = ldb.DiffusionBlocksDDPStrategy(
            schedule=args.schedule, steps_per_phase=8, process_group_backend="gloo"
        )
    trainer = L.Trainer(
        strategy=strategy,
        accelerator="cpu",
        devices=max(1, processes),
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
    if processes:  # every replica's weights, to check that they agree
        torch.save(module.state_dict(), out / f"final_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
