"""The headline on one GPU: a DiT whose end-to-end training does not fit the card trains block-wise.

    python benchmarks/headline.py --out benchmarks/results      # needs a CUDA device

The model is sized from the card: its end-to-end static training memory (fp32 weights, gradients and the
two Adam moments, 16 bytes a parameter) is ``--oversize`` (1.1) times the card's memory, so end-to-end
training runs out of memory at any batch size. The same model is then trained block-wise (B=8,
sequential phases, ``BlockOffload`` to pinned host memory, ``BlockMemoryMonitor``), and each group's CUDA
peak and step time are recorded. Each configuration runs in its own process. The weights of every group
fit on the card at once (the strategy places the whole model on the device before inactive groups
leave), so the host needs about 10.5 bytes a parameter of pinned memory for the offloaded groups.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload

GIB = 2**30


def params_per_layer(dim: int) -> int:
    """A DiT block: qkv 3d², projection d², MLP 8d², adaLN 6d² (biases are small)."""
    return 18 * dim * dim


def plan(args: argparse.Namespace) -> dict:
    card = torch.cuda.get_device_properties(0).total_memory
    depth = math.ceil(args.oversize * card / (16 * params_per_layer(args.dim)))
    return {"card": torch.cuda.get_device_name(0), "card_gib": card / GIB, "dim": args.dim, "depth": depth}


def build(cfg: dict, blocks: int) -> ldb.DiffusionBlocksModule:
    torch.manual_seed(0)
    net = ldb.presets.demo_dit(image_size=32, channels=3, patch=2, dim=cfg["dim"], depth=cfg["depth"],
                               heads=cfg["dim"] // 128)  # fmt: skip
    return ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=blocks, lr=1e-4)


def loader(batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch * 64, 3, 32, 32, generator=g) * 2 - 1
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (batch * 64,), generator=g)), batch_size=batch)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[tuple[int | None, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        torch.cuda.synchronize()
        self.times.append((pl_module.last_group, time.perf_counter() - self._start))


class EarlyReport(L.Callback):
    """Writes the per-group figures when training ends, before teardown (which copies the model to the host):
    a process that dies after that still leaves its measurements behind."""

    def __init__(self, path: str, collect) -> None:  # noqa: ANN001
        self.path, self.collect = path, collect

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        with open(self.path, "w") as f:
            json.dump(self.collect(), f)


def child(args: argparse.Namespace, cfg: dict) -> dict:
    start = time.perf_counter()
    torch.set_float32_matmul_precision("high")
    module = build(cfg, args.blocks)
    params = sum(p.numel() for p in module.network.parameters())
    monitor, timer = BlockMemoryMonitor(log=False), StepTimer()
    common = {"accelerator": "gpu", "devices": 1, "precision": "bf16-mixed", "logger": False,
              "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
              "num_sanity_val_steps": 0}  # fmt: skip
    result = {"mode": "diffusionblocks" if args.blocks > 1 else "end_to_end", "blocks": args.blocks,
              "params": params, "e2e_static_gib": 16 * params / GIB, "batch": args.batch}  # fmt: skip
    if args.blocks > 1:
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=args.steps_per_group)
        callbacks = [BlockOffload(prefetch=True), monitor, timer]
        steps = args.steps_per_group * args.blocks
    else:
        strategy, callbacks, steps = "auto", [monitor, timer], args.steps_per_group

    def collect() -> dict:
        return {**result, "fits": True, "per_group": per_group(monitor), **timing(timer, args)}

    callbacks.append(EarlyReport(args.report, collect))
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=callbacks, **common)
    try:
        trainer.fit(module, loader(args.batch))
        result["fits"] = True
    except torch.OutOfMemoryError as err:
        result["fits"] = False
        result["error"] = str(err).splitlines()[0][:300]
        result["max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    except Exception:  # noqa: BLE001 - record whatever else went wrong, for the report
        result["fits"] = False
        result["error"] = traceback.format_exc()[-1500:]
    result.update(per_group=per_group(monitor), **timing(timer, args))
    result["wall_seconds"] = time.perf_counter() - start
    return result


def per_group(monitor: BlockMemoryMonitor) -> dict:
    return {
        k: {"steps": g.steps, "cuda_peak_gib": g.cuda_peak / GIB, "params_gib": g.params / GIB,
            "grads_gib": g.grads / GIB, "optimizer_gib": g.optimizer / GIB, "activations_gib": g.activations / GIB}
        for k, g in monitor.groups.items()
    }  # fmt: skip


def timing(timer: StepTimer, args: argparse.Namespace) -> dict:
    steady = [t for i, (_, t) in enumerate(timer.times) if i % args.steps_per_group != 0]  # skip phase changes
    return {"step_seconds_median": sorted(steady)[len(steady) // 2] if steady else None,
            "step_seconds_all": [round(t, 4) for _, t in timer.times]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=3584)
    p.add_argument("--oversize", type=float, default=1.1, help="end-to-end static memory / card memory")
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps-per-group", type=int, default=3)
    p.add_argument("--skip-end-to-end", action="store_true", help="only the block-wise row (end-to-end known OOM)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/headline.py needs a CUDA device.")
    if args.child:
        cfg = json.loads(args.child)
        print("RESULT " + json.dumps(child(args, cfg)), flush=True)
        return
    os.makedirs(args.out, exist_ok=True)
    cfg = plan(args)
    print(f"plan: {cfg}", flush=True)
    rows = []
    for blocks in (args.blocks,) if args.skip_end_to_end else (1, args.blocks):
        report = os.path.join(args.out, f"headline_b{blocks}.partial.json")
        cmd = [sys.executable, __file__, "--child", json.dumps(cfg), "--blocks", str(blocks), "--batch",
               str(args.batch), "--steps-per-group", str(args.steps_per_group), "--dim", str(args.dim),
               "--report", report]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=os.environ)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line:
            row = json.loads(line[7:])
        elif os.path.exists(report):  # training finished, the process died in teardown
            with open(report) as f:
                row = {**json.load(f), "exit_code": out.returncode, "after_training": out.stderr[-1500:]}
        else:
            row = {"blocks": blocks, "fits": False, "exit_code": out.returncode, "error": out.stderr[-3000:]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "step_seconds_all"}, indent=1), flush=True)
    report = {"command": "python benchmarks/headline.py " + " ".join(sys.argv[1:]), "plan": cfg, "rows": rows,
              "torch": torch.__version__, "lightning": L.__version__}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "headline_cuda.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
