"""Quality cost of low-precision per-group state: the MNIST demo trained block-wise with fp32, bf16 and 8-bit state.

    python benchmarks/state_quality.py --seeds 0 1 2 --steps 1500 --jobs 2
    python benchmarks/state_quality.py --quick          # tiny sizes (the tests run this)

Every configuration trains the same demo (same DiT, data, seed, steps: equal layer evaluations) block-wise; only
:class:`~lightning_diffusionblocks.StatePrecision` changes. Each run is the demo's own training (parity's jobs, one
process each), scored by parity's FID and class accuracy (a small MNIST CNN's features). Ratios are per seed,
against the fp32 run of the same seed: FID ratio > 1 and accuracy ratio < 1 mean the low-precision state cost
quality. Results go to benchmarks/results/state_quality_cpu.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from common import machine, write_report
from parity_run import QUICK_GENERATION, demo_job, generation_demo, run_jobs
from parity_score import generation_quality, mnist_tensors, train_feature_net
from text_to_image import spread

import lightning_diffusionblocks as ldb

#: the configurations compared, as MNISTDemo's state fields (the first is the reference)
CONFIGS: dict[str, dict[str, str]] = {
    "fp32": {"state_weights": "fp32", "state_moments": "fp32", "state_rounding": "nearest"},
    "bf16": {"state_weights": "bf16", "state_moments": "bf16", "state_rounding": "stochastic"},
    "8bit": {"state_weights": "fp32", "state_moments": "8bit", "state_rounding": "nearest"},
}


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each configuration's FID and accuracy, and its per-seed ratios to the fp32 run of the same seed."""
    by = {(r["config"], r["seed"]): r for r in rows}
    out: dict[str, Any] = {}
    for config in CONFIGS:
        mine = [r for r in rows if r["config"] == config]
        if not mine:
            continue
        entry: dict[str, Any] = {m: spread([r[m] for r in mine]) for m in ("fid", "class_accuracy", "train_seconds")}
        seeds = sorted(r["seed"] for r in mine if ("fp32", r["seed"]) in by)
        if config != "fp32" and seeds:
            for m in ("fid", "class_accuracy", "train_seconds"):
                ratios = [by[config, s][m] / max(by["fp32", s][m], 1e-12) for s in seeds]
                entry[f"{m}_ratio"] = spread(ratios) | {"per_seed": ratios}
        out[config] = entry
    return out


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| state | FID | class accuracy | FID ratio | accuracy ratio | train time ratio |", "|---" * 6 + "|"]

    def pm(d: dict[str, float], digits: int) -> str:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    for config, e in summary.items():
        ratios = [pm(e[k], 3) if k in e else "1 (reference)" for k in ("fid_ratio", "class_accuracy_ratio",
                                                                        "train_seconds_ratio")]  # fmt: skip
        lines.append(f"| {config} | {pm(e['fid'], 1)} | {pm(e['class_accuracy'], 3)} | {' | '.join(ratios)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run (block-wise)")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time (one torch thread each)")
    p.add_argument("--feature-steps", type=int, default=1500, help="training steps of the MNIST feature CNN")
    p.add_argument("--per-class", type=int, default=50, help="samples per digit scored")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--fid-samples", type=int, default=2000, help="real test images for FID")
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--runs", default="outputs/state_quality", help="where the runs are trained")
    p.add_argument("--quick", action="store_true", help="tiny sizes and budgets (for the tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.formulation, args.accelerator = "flow", "cpu"  # the demo's formulation; what generation_demo reads
    if args.quick:
        args.steps, args.feature_steps, args.per_class, args.sample_steps, args.fid_samples = 12, 20, 2, 2, 64

    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    real = mnist_tensors(mnist, "test")[0][: args.fid_samples]
    runs: dict[int, tuple[str, int, Path]] = {}
    jobs = []
    for seed in args.seeds:
        for config in args.configs:
            demo = replace(generation_demo(args, mnist, QUICK_GENERATION, steps=args.steps, seed=seed),
                           **CONFIGS[config])  # fmt: skip
            out = Path(args.runs) / f"{config}_seed{seed}"
            runs[len(jobs)] = (config, seed, out)
            jobs.append(demo_job(demo, out))
    start = time.perf_counter()
    run_jobs(jobs, args.jobs)
    train_wall = time.perf_counter() - start

    torch.manual_seed(0)
    features, feature_accuracy = train_feature_net(mnist, args.feature_steps)
    rows = []
    for config, seed, out in runs.values():
        row = generation_quality(out, features, real, args.per_class, args.sample_steps, args.guidance)
        rows.append(row | {"config": config, "seed": seed, "state": CONFIGS[config]})
        print(f"{config} seed {seed}: FID {row['fid']:.1f}, accuracy {row['class_accuracy']:.3f}", file=sys.stderr)
    summary = summarize(rows)
    payload = {
        "meta": machine(" ".join(["python", *sys.argv]), cuda=False),
        "settings": {k: v for k, v in vars(args).items() if k != "quick"} | {"quick": args.quick},
        "feature_net_test_accuracy": feature_accuracy,
        "train_wall_seconds": train_wall,
        "rows": rows,
        "summary": summary,
    }
    write_report(args.out, "state_quality_cpu.json", payload, markdown(summary))


if __name__ == "__main__":
    main()
