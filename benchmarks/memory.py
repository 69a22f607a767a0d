"""Training memory: end-to-end vs DiffusionBlocks on the same model and batch, one process per configuration.

    python benchmarks/memory.py                       # CPU: disk offload, B in 2 3 4 6
    python benchmarks/memory.py --accelerator gpu     # GPU: pinned-CPU offload, adds CUDA peaks
    python benchmarks/memory.py --model lm --seq-len 256   # a decoder LM (activation memory dominates)
    python benchmarks/memory.py --lora 8 --blocks-list 4   # LoRA fine-tuning (rank 8, one adapter per group)

For every configuration a fresh Python process trains a few steps with `BlockMemoryMonitor` (and, for
DiffusionBlocks, `BlockOffload`) under sequential phases, so each group is measured. It reports the
exact accounting (parameters, gradients and optimizer state resident on the compute device, bytes
saved for backward) of the most expensive group, and the process's peak RSS (or CUDA peak) during
training steps. Results go to benchmarks/results/memory_<device>.json and a markdown table on stdout.

With ``--lora RANK`` both sides fine-tune with ``GroupLoRA(rank=RANK)`` on every Linear of the blocks (base weights
frozen): end to end every adapter trains at every step; block-wise only the active group's adapter does, and the
offload moves the inactive groups' frozen weights, adapters and Adam state.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import add_model_arguments, build_module, machine, quiet_trainer, synthetic_loader, write_report

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload

MIB = 2**20


def child(args: argparse.Namespace) -> dict:
    blocks = args.blocks or 1
    module = build_module(args, blocks, ldb.GroupLoRA(rank=args.lora) if args.lora else None)
    loader = synthetic_loader(args, batches=64)
    monitor = BlockMemoryMonitor(log=False)
    callbacks = [monitor]
    if args.blocks:
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=args.steps_per_group)
        steps = args.steps_per_group * blocks
        if not args.no_offload:
            callbacks.insert(0, BlockOffload(prefetch=False))  # steady state: one group resident
    else:
        strategy, steps = "auto", args.steps_per_group
    trainer = quiet_trainer(args, strategy, steps, callbacks)
    start = time.perf_counter()
    trainer.fit(module, loader)
    seconds = time.perf_counter() - start
    worst = max(monitor.groups.values(), key=lambda g: g.total)
    return {
        "mode": "diffusionblocks" if args.blocks else "end_to_end",
        "blocks": blocks,
        "offload": bool(args.blocks) and not args.no_offload,
        "lora_rank": args.lora,
        "params_total_mib": sum(p.numel() * p.element_size() for p in module.network.parameters()) / MIB,
        "trainable_mib": sum(p.numel() * p.element_size() for p in module.network.parameters() if p.requires_grad)
        / MIB,
        "per_group": {
            k: {f: v / MIB if f != "steps" else v for f, v in vars(g).items()} for k, g in monitor.groups.items()
        },
        "worst": {f: v / MIB if f != "steps" else v for f, v in vars(worst).items()},
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
        cells = [name] + [f"{w[k]:.1f}" for k in ("params", "grads", "optimizer", "activations", "total")]
        cells += [
            f"{w['total'] / base['worst']['total']:.3f}",
            f"{1 / r['blocks']:.3f}",
            f"{w[peak]:.0f}",
            f"{w[peak] / base['worst'][peak]:.3f}",
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
    p.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for blocks in [0] + [int(b) for b in args.blocks_list.split(",")]:
        cmd = [sys.executable, __file__, "--child", "--blocks", str(blocks)] + [
            a for a in sys.argv[1:] if a != "--child"
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"configuration B={blocks} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(line[len("RESULT ") :]))
        print(f"done: {rows[-1]['mode']} B={rows[-1]['blocks']} total={rows[-1]['worst']['total']:.1f} MiB", flush=True)
    cuda = rows[0]["device"].startswith("cuda")
    table = markdown(rows, cuda)
    meta = machine("python benchmarks/memory.py " + " ".join(sys.argv[1:]), cuda)
    device = "cuda" if cuda else "cpu"
    name = f"memory_{device}.json" if args.model == "dit" else f"memory_{args.model}_{device}.json"
    name = name.replace("memory_", "memory_lora_", 1) if args.lora else name
    write_report(args.out, name, {"meta": meta, "rows": rows, "table": table}, table)


if __name__ == "__main__":
    main()
