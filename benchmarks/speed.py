"""Speed: one DiffusionBlocks step vs one end-to-end step, offload overhead per phase, and sampling.

    python benchmarks/speed.py                     # CPU
    python benchmarks/speed.py --accelerator gpu   # GPU (adds CUDA synchronisation around timings)

All ratios come from one process and the same model and batch. Writes benchmarks/results/speed_<device>.json
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from common import add_model_arguments, build_module, machine, quiet_trainer, synthetic_loader, write_report
from lightning.pytorch.callbacks import Callback

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockOffload


class StepTimer(Callback):
    """Wall time of every training batch (start of the batch hooks to the end of the optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.groups: list[int | None] = []

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._sync(trainer)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self._sync(trainer)
        self.times.append(time.perf_counter() - self._start)


def train(args: argparse.Namespace, strategy, steps: int, callbacks=()):  # noqa: ANN001, ANN201
    module = build_module(args, args.blocks)
    timer = StepTimer()
    trainer = quiet_trainer(args, strategy, steps, [timer, *callbacks])
    start = time.perf_counter()
    trainer.fit(module, synthetic_loader(args, batches=8))
    return module, timer, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, dim=384, depth=12, heads=6)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=30, help="timed steps per configuration")
    p.add_argument("--steps-per-phase", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="interleaved end-to-end / DiffusionBlocks rounds")
    p.add_argument("--sample-steps", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.model != "dit":
        p.error("speed.py times the image DiT (training and sampling); use --model dit (LMs: memory.py).")
    warm = 5
    B = args.blocks

    # interleaved rounds (A, B, A, B, …): load on a shared machine hits both configurations alike
    rounds = max(1, args.rounds)
    e2e_times, db_times = [], []
    for _ in range(rounds):
        _, e2e, _ = train(args, "auto", args.steps // rounds + warm)
        _, db, _ = train(args, ldb.DiffusionBlocksStrategy(schedule="random"), args.steps // rounds + warm)
        e2e_times += e2e.times[warm:]
        db_times += db.times[warm:]
    step_e2e, step_db = statistics.median(e2e_times), statistics.median(db_times)

    offload = BlockOffload()
    phased = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=args.steps_per_phase)
    module, timer, fit_seconds = train(args, phased, args.steps_per_phase * B, callbacks=[offload])
    phase_seconds = sum(timer.times)
    offload_overhead = offload.stats["seconds"] / phase_seconds

    # sampling: group-routed vs the whole network at every step, same module and steps
    labels = torch.arange(10).repeat(2)
    if args.accelerator == "gpu":
        module.cuda()
    samples: dict[bool, list[float]] = {True: [], False: []}
    module.sample(labels=labels, steps=3)  # warm-up
    for _ in range(3):  # interleaved: routed, whole, routed, whole, …
        for routed in (True, False):
            module.trained_blockwise.fill_(routed)
            if args.accelerator == "gpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            module.sample(labels=labels, steps=args.sample_steps, guidance=2.0)
            if args.accelerator == "gpu":
                torch.cuda.synchronize()
            samples[routed].append(time.perf_counter() - start)
    timings = {routed: statistics.median(times) for routed, times in samples.items()}

    rows = {
        "train_step_seconds_end_to_end": step_e2e,
        "train_step_seconds_diffusionblocks": step_db,
        "train_step_ratio": step_db / step_e2e,
        "train_step_target": 1.1 / B,
        "offload_seconds": offload.stats["seconds"],
        "offload_moves": offload.stats["offloads"] + offload.stats["loads"],
        "offload_mib_moved": offload.stats["bytes_moved"] / 2**20,
        "phased_train_seconds": phase_seconds,
        "offload_overhead_fraction": offload_overhead,
        "sample_seconds_routed": timings[True],
        "sample_seconds_end_to_end": timings[False],
        "sample_ratio": timings[True] / timings[False],
        "sample_target": 1.1 / B,
    }
    device = "cuda" if args.accelerator == "gpu" else "cpu"
    command = "python benchmarks/speed.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
    )
    meta = machine(command, device == "cuda")
    table = "\n".join(
        [
            "| measure | DiffusionBlocks | end-to-end | ratio | target |",
            "|---|---|---|---|---|",
            f"| training step (s, median) | {step_db:.4f} | {step_e2e:.4f} | {rows['train_step_ratio']:.3f} |"
            f" ≤ {1.1 / B:.3f} |",
            f"| sampling, {args.sample_steps} steps, CFG (s) | {timings[True]:.3f} | {timings[False]:.3f} |"
            f" {rows['sample_ratio']:.3f} | ≤ {1.1 / B:.3f} |",
            f"| offload time / phased training time | {offload.stats['seconds']:.3f} s of {phase_seconds:.2f} s | – |"
            f" {offload_overhead:.3f} | < 0.05 |",
        ]
    )
    write_report(args.out, f"speed_{device}.json", {"meta": meta, "results": rows, "table": table}, table)


if __name__ == "__main__":
    main()
