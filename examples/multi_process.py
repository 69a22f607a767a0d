"""DiffusionBlocks in several processes: data parallel or block parallel, on CPUs (gloo) or GPUs.

    python examples/multi_process.py --devices 2                            # block parallel, CPU, MNIST
    python examples/multi_process.py --devices 2 --mode ddp                 # data parallel: "diffusionblocks"
    python examples/multi_process.py --devices 4 --accelerator gpu --steps 6000
    torchrun --nproc-per-node 4 examples/multi_process.py --devices 4 --accelerator gpu

Lightning launches the other processes itself (it re-runs this script once per rank) unless torchrun or
SLURM did. Block parallel with --devices equal to --num-blocks trains one group per process; rank 0 writes
the checkpoint with every group's weights, and samples are drawn from it on one device afterwards.

Nothing here needs a seed for correctness: each process builds its own network, and the strategy copies rank 0's
weights to every process before training and checks at the end (and before each checkpoint) that the processes
that train the same group still hold bit-identical copies; a difference stops the run with an error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.visualize import save_image_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="block_parallel", choices=["block_parallel", "ddp"])
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--num-blocks", type=int, default=2)
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each process")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--data-dir", default=None, help="MNIST IDX files (default: the bundled copy)")
    p.add_argument("--out", default="outputs/multi_process")
    args = p.parse_args()

    net = ldb.presets.demo_dit(dim=args.dim, depth=args.depth)  # the MNIST demo's DiT, EDM's noise scale
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=args.num_blocks, lr=2e-3,
                                       warmup_steps=50, lr_schedule="cosine", ema_decay=0.995)  # fmt: skip
    if args.mode == "block_parallel":
        strategy = ldb.BlockParallelStrategy(process_group_backend="gloo" if args.accelerator == "cpu" else None)
    else:  # the plain name: with several devices or nodes it trains data parallel
        strategy = "diffusionblocks"
    out = Path(args.out)
    trainer = L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=args.devices,
                        num_nodes=args.num_nodes, max_steps=args.steps, default_root_dir=out, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=ldb.data.MNISTDataModule(data_dir=args.data_dir, batch_size=args.batch_size))
    trainer.save_checkpoint(out / "model.ckpt")  # every process enters; rank 0 writes every group
    if trainer.is_global_zero:
        model = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt")
        images = model.sample(labels=torch.arange(10).repeat_interleave(2), steps=30, guidance=2.0)
        save_image_grid(images, out / "samples.png", rows=10)
        print(f"steps per group: {model.group_steps.tolist()}; wrote {out / 'model.ckpt'} and {out / 'samples.png'}")


if __name__ == "__main__":
    main()
