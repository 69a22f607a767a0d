"""The largest DiT that trains on this machine, end to end and block-wise, found by bisection on depth.

    python benchmarks/largest_model.py --budget-gib 16 --dim 1024
    python benchmarks/largest_model.py --quick        # tiny budget and sizes (the tests run this)

Each probe is a fresh process that builds a DiT of ``--dim`` width and the probed depth, then trains it: end to
end (``strategy="auto"``) for ``--e2e-steps`` steps, or block-wise with ``--blocks-per-group`` blocks per group,
inactive groups on disk (:class:`BlockOffload`), every group trained once (sequential phases of one step), with
the given :class:`StatePrecision`. The parent polls the probe's resident memory (RSS) ten times a second and kills
it past ``--budget-gib``; a probe fits when it finishes within the budget. The memory plan is set to print only, so what
is measured is the run itself. The end of a block-wise fit counts: every group (and its Adam state) comes back into
memory for the model the fit leaves behind.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from common import machine, write_report

from lightning_diffusionblocks.memory import proc_kib_field

GIB = 2**30
#: the block-wise variants: StatePrecision fields (None: end to end)
MODES: dict[str, dict[str, str] | None] = {
    "end_to_end": None,
    "blockwise_fp32": {},
    "blockwise_bf16_8bit": {"weights": "bf16", "moments": "8bit", "rounding": "stochastic"},
}


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Build and train one model; print its parameter count and step count."""
    import lightning as L
    import torch

    import lightning_diffusionblocks as ldb
    from lightning_diffusionblocks.callbacks import BlockOffload

    torch.manual_seed(0)
    net = ldb.presets.demo_dit(image_size=args.image_size, channels=3, patch=args.patch, dim=args.dim,
                               depth=args.depth, heads=args.heads)  # fmt: skip
    params = sum(p.numel() for p in net.parameters())
    state = MODES[args.mode]
    blockwise = state is not None
    groups = max(1, args.depth // args.blocks_per_group) if blockwise else 1
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=groups,
                                       state_precision=ldb.StatePrecision(**state) if state else None)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size * 4, 3, args.image_size, args.image_size, generator=g)
    labels = torch.randint(0, 10, (args.batch_size * 4,), generator=g)
    loader = torch.utils.data.DataLoader(list(zip(images, labels)), batch_size=args.batch_size)
    if blockwise:
        strategy: Any = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=1, memory_plan="print")
        steps, callbacks = groups, [BlockOffload(target="disk", prefetch=False, directory=args.offload_dir)]
    else:
        strategy, steps, callbacks = "auto", args.e2e_steps, []
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, loader)
    return {"params": params, "steps": trainer.global_step, "seconds": time.perf_counter() - start}


def rss(pid: int) -> int:
    return proc_kib_field(f"/proc/{pid}/status", "VmRSS") or 0


def probe(args: argparse.Namespace, mode: str, depth: int) -> dict[str, Any]:
    """One probe in a fresh process, killed past the budget; its outcome, peak RSS and parameter count."""
    cmd = [sys.executable, __file__, "--child", "--mode", mode, "--depth", str(depth), "--dim", str(args.dim),
           "--heads", str(args.heads), "--patch", str(args.patch), "--image-size", str(args.image_size),
           "--batch-size", str(args.batch_size), "--e2e-steps", str(args.e2e_steps),
           "--blocks-per-group", str(args.blocks_per_group)]  # fmt: skip
    if args.offload_dir:
        cmd += ["--offload-dir", args.offload_dir]
    budget = int(args.budget_gib * GIB)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, killed = 0, False
    while proc.poll() is None:
        peak = max(peak, rss(proc.pid))
        if peak > budget:
            proc.kill()
            killed = True
            break
        time.sleep(0.1)
    out, err = proc.communicate()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    result = json.loads(line[len("RESULT ") :]) if line else {}
    fits = not killed and proc.returncode == 0 and line is not None
    row = {"mode": mode, "depth": depth, "fits": fits, "peak_rss_gib": peak / GIB, "killed_at_budget": killed,
           "wall_seconds": time.perf_counter() - start, **result}  # fmt: skip
    if not fits and not killed:
        row["error"] = err[-2000:]
    print(f"{mode} depth {depth}: {'fits' if fits else 'does not fit'} (peak {peak / GIB:.2f} GiB)", flush=True)
    return row


def bisect(args: argparse.Namespace, mode: str, lo: int, hi: int) -> tuple[int, list[dict[str, Any]]]:
    """The largest depth in [lo, hi) that fits, given that ``lo`` fits and ``hi`` does not (checked first)."""
    rows = [probe(args, mode, lo)]
    if not rows[-1]["fits"]:
        return 0, rows
    rows.append(probe(args, mode, hi))
    while rows[-1]["fits"]:  # grow until a depth does not fit
        lo, hi = hi, hi * 2
        rows.append(probe(args, mode, hi))
    while hi - lo > max(1, int(lo * args.tolerance)):
        mid = (lo + hi) // 2
        rows.append(probe(args, mode, mid))
        lo, hi = (mid, hi) if rows[-1]["fits"] else (lo, mid)
    return lo, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-gib", type=float, default=16.0, help="RSS past which a probe is killed")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--e2e-steps", type=int, default=2)
    p.add_argument("--blocks-per-group", type=int, default=2, help="block-wise: B = depth / this")
    p.add_argument("--start", type=int, default=16, help="first depth probed (and the bracket's low end)")
    p.add_argument("--tolerance", type=float, default=0.05, help="stop when the bracket is this share of the depth")
    p.add_argument("--offload-dir", default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="end_to_end", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.quick:
        args.budget_gib, args.dim, args.heads, args.start, args.tolerance = 1.0, 512, 8, 2, 0.5
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    found, rows = {}, []
    for mode in args.modes:
        depth, probes = bisect(args, mode, args.start, args.start * 2)
        rows += probes
        best = next((r for r in probes if r["fits"] and r["depth"] == depth), None)
        found[mode] = {"depth": depth, "params": best["params"] if best else 0,
                       "peak_rss_gib": best["peak_rss_gib"] if best else None}  # fmt: skip
    e2e = found.get("end_to_end", {}).get("params") or 0
    lines = ["| mode | largest depth | parameters | peak RSS (GiB) | parameters / end to end |", "|---" * 5 + "|"]
    for mode, f in found.items():
        ratio = f"{f['params'] / e2e:.2f}" if e2e else "-"
        peak = f"{f['peak_rss_gib']:.2f}" if f["peak_rss_gib"] is not None else "-"
        lines.append(f"| {mode} | {f['depth']} | {f['params'] / 1e9:.3f} B | {peak} | {ratio} |")
    payload = {"meta": machine(" ".join(["python", *sys.argv]), cuda=False), "settings": vars(args),
               "found": found, "probes": rows}  # fmt: skip
    write_report(args.out, "largest_model_cpu.json", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
