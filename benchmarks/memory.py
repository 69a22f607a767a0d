"""Training memory: end-to-end vs DiffusionBlocks on the same model and batch, one process per configuration.

    python benchmarks/memory.py                       # CPU: disk offload, B in 2 3 4 6
    python benchmarks/memory.py --accelerator gpu     # GPU: pinned-CPU offload, adds CUDA peaks
    python benchmarks/memory.py --model lm --seq-len 256   # a decoder LM (activation memory dominates)
    python benchmarks/memory.py --lora 8 --blocks-list 4   # LoRA fine-tuning (rank 8, one adapter per group)
    python benchmarks/memory.py --variants fp32,bf16,8bit,bf16+8bit,checkpointing --blocks-list 4
                                                      # per-group state precision and activation checkpointing

For every configuration a fresh Python process trains a few steps with `BlockMemoryMonitor` (and, for
DiffusionBlocks, `BlockOffload`) under sequential phases, so each group is measured. It reports the
exact accounting (parameters, gradients and optimizer state resident on the compute device, bytes
saved for backward) of the most expensive group, and the process's peak RSS (or CUDA peak) during
training steps. Results go to benchmarks/results/memory_<device>.json and a markdown table on stdout.

With ``--lora RANK`` both sides fine-tune with ``GroupLoRA(rank=RANK)`` on every Linear of the blocks (base weights
frozen): end to end every adapter trains at every step; block-wise only the active group's adapter does, and the
offload moves the inactive groups' frozen weights, adapters and Adam state.

With ``--variants`` the end-to-end row is followed by one DiffusionBlocks row per variant at the first B of
``--blocks-list``: the state precision of :data:`VARIANTS` (what inactive groups keep, and what the offload writes)
or activation checkpointing of every block. Each row adds the host side (the offload folder's largest size on disk,
and what the memory plan predicted), the mean training step time and the plan's predicted device peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import lightning as L
from common import add_model_arguments, build_module, machine, quiet_trainer, synthetic_loader, write_report
from lightning.pytorch.callbacks import Callback

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload

MIB = 2**20

#: --variants: the module options of each DiffusionBlocks row
VARIANTS: dict[str, dict] = {
    "fp32": {},
    "bf16": {"state_precision": ldb.StatePrecision(weights="bf16", moments="bf16", rounding="stochastic")},
    "8bit": {"state_precision": ldb.StatePrecision(moments="8bit")},
    "bf16+8bit": {"state_precision": ldb.StatePrecision(weights="bf16", moments="8bit", rounding="stochastic")},
    "checkpointing": {"activation_checkpointing": "every"},
}


class FolderSize(Callback):
    """The largest size of the offload folder on disk (bytes of its group files), read after every step."""

    def __init__(self, offload: BlockOffload) -> None:
        self.offload, self.peak = offload, 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        folder = self.offload.directory
        if folder is not None and folder.is_dir():
            self.peak = max(self.peak, sum(f.stat().st_size for f in folder.glob("group_*.pt")))


def child(args: argparse.Namespace) -> dict:
    blocks = args.blocks or 1
    variant = getattr(args, "variant", "")
    options = VARIANTS[variant] if variant and args.blocks else {}
    module = build_module(args, blocks, ldb.GroupLoRA(rank=args.lora) if args.lora else None, **options)
    loader = synthetic_loader(args, batches=64)
    monitor = BlockMemoryMonitor(log=False)
    callbacks: list[Callback] = [monitor]
    folder: FolderSize | None = None
    if args.blocks:
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=args.steps_per_group,
                                               memory_plan="print")  # fmt: skip
        steps = args.steps_per_group * blocks
        if not args.no_offload:
            offload = BlockOffload(prefetch=False)  # steady state: one group resident
            folder = FolderSize(offload)
            callbacks[:0] = [offload, folder]
    else:
        strategy, steps = "auto", args.steps_per_group
    trainer = quiet_trainer(args, strategy, steps, callbacks)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    worst = max(monitor.groups.values(), key=lambda g: g.total)
    plan = getattr(trainer.strategy, "memory_plan", None)
    record = plan.record() if plan is not None else None
    return {
        "mode": "diffusionblocks" if args.blocks else "end_to_end",
        "variant": variant if args.blocks else None,
        "blocks": blocks,
        "offload_disk_peak_mib": folder.peak / MIB if folder is not None else 0.0,
        "plan": record,
        "step_time_s": sum(g.step_time for g in monitor.groups.values()) / len(monitor.groups),
        "offload": bool(args.blocks) and not args.no_offload,
        "lora_rank": args.lora,
        "params_total_mib": sum(p.numel() * p.element_size() for p in module.network.parameters()) / MIB,
        "trainable_mib": sum(p.numel() * p.element_size() for p in module.network.parameters() if p.requires_grad)
        / MIB,
        "per_group": {
            k: {f: v / MIB if f not in ("steps", "step_time") else v for f, v in vars(g).items()}
            for k, g in monitor.groups.items()
        },
        "worst": {f: v / MIB if f not in ("steps", "step_time") else v for f, v in vars(worst).items()},
        "device": str(trainer.strategy.root_device),
        "seconds": seconds,
    }


def markdown(rows: list[dict], cuda: bool) -> str:
    base = next(r for r in rows if r["mode"] == "end_to_end")
    peak = "cuda_peak" if cuda else "peak_rss"
    head = [
        "config",
        "params",
        "grads",
        "optimizer",
        "activations",
        "total",
        "total ratio",
        "1/B",
        "CUDA peak" if cuda else "peak RSS",
        "peak ratio",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        w = r["worst"]
        name = "end-to-end" if r["mode"] == "end_to_end" else f"DiffusionBlocks B={r['blocks']}"
        name = f"LoRA r={r['lora_rank']}, {name}" if r.get("lora_rank") else name
        name = f"{name}, {r['variant']}" if r.get("variant") else name
        cells = [name] + [f"{w[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "total")]
        cells += [
            f"{w['total'] / base['worst']['total']:.3f}",
            f"{1 / r['blocks']:.3f}",
            f"{w[peak]:.0f}",
            f"{w[peak] / base['worst'][peak]:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def variants_markdown(rows: list[dict], cuda: bool) -> str:
    """One row per variant: the device side (accounting and the measured peak, against the plan's prediction), the
    host side (the offload folder on disk, against the plan) and the step time, as ratios to the fp32 variant."""
    peak = "cuda_peak" if cuda else "peak_rss"
    base = next(r for r in rows if r.get("variant") == "fp32")
    head = ["variant", "params+grads+optimizer", "activations", f"{'CUDA peak' if cuda else 'peak RSS'}",
            "peak ratio", "plan: device peak", "offload on disk", "disk ratio", "plan: disk", "step time (s)",
            "step ratio"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["mode"] == "end_to_end":
            continue
        w, plan = r["worst"], r.get("plan") or {}
        state = w["params"] + w["grads"] + w["optimizer"]
        cells = [
            f"{r['variant']} (B={r['blocks']})",
            f"{state:.1f}",
            f"{w['activations']:.1f}",
            f"{w[peak]:.0f}",
            f"{w[peak] / base['worst'][peak]:.3f}",
            f"{plan['device_peak'] / MIB:.0f}" if plan else "-",
            f"{r['offload_disk_peak_mib']:.1f}",
            f"{r['offload_disk_peak_mib'] / max(base['offload_disk_peak_mib'], 1e-9):.3f}",
            f"{plan['disk_total'] / MIB:.1f}" if plan else "-",
            f"{r['step_time_s']:.3f}",
            f"{r['step_time_s'] / base['step_time_s']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, dim=768, depth=12, heads=12)
    p.add_argument("--blocks-list", default="2,3,4,6")
    p.add_argument("--steps-per-group", type=int, default=2)
    p.add_argument("--no-offload", action="store_true")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="fine-tune with one LoRA adapter of this rank per group (base weights frozen)")  # fmt: skip
    p.add_argument("--variants", default="", help=f"comma-separated, of {', '.join(VARIANTS)}: one row each at the"
                   " first B of --blocks-list")  # fmt: skip
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")
    if variants and "fp32" not in variants:
        variants.insert(0, "fp32")  # the reference of the ratios
    first = int(args.blocks_list.split(",")[0])
    configs = [(b, "") for b in [0] + [int(b) for b in args.blocks_list.split(",")]] if not variants else (
        [(0, "")] + [(first, v) for v in variants])  # fmt: skip
    rows = []
    for blocks, variant in configs:
        cmd = [sys.executable, __file__, "--child", "--blocks", str(blocks), "--variant", variant] + [
            a for a in sys.argv[1:] if a != "--child"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"configuration B={blocks} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
        print(f"done: {rows[-1]['mode']} {variant} B={rows[-1]['blocks']} total={rows[-1]['worst']['total']:.1f} MiB",
              flush=True)  # fmt: skip
    cuda = rows[0]["device"].startswith("cuda")
    table = markdown(rows, cuda) + ("\n\n" + variants_markdown(rows, cuda) if variants else "")
    meta = machine("python benchmarks/memory.py " + " ".join(sys.argv[1:]), cuda)
    device = "cuda" if cuda else "cpu"
    name = f"memory_{device}.json" if args.model == "dit" else f"memory_{args.model}_{device}.json"
    name = name.replace("memory_", "memory_lora_", 1) if args.lora else name
    name = name.replace("memory_", "memory_state_", 1) if variants else name
    write_report(args.out, name, {"meta": meta, "rows": rows, "table": table}, table)


if __name__ == "__main__":
    main()
