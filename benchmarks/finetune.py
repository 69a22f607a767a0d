"""Fine-tuning a pretrained model: continuing end to end vs block-wise, at equal extra layer evaluations.

    python benchmarks/finetune.py --seeds 0 1 2 --jobs 2 --out benchmarks/results/finetune_cpu.json
    python benchmarks/finetune.py --quick ...        # tiny sizes and budgets, for the tests

Per seed: the MNIST demo's DiT (``lightning_diffusionblocks.presets.MNISTDemo``, rectified flow) is pretrained end to
end for ``--pretrain-steps``; from that checkpoint (``ldb.pretrained.load_pretrained``: its EMA weights, into every
group's blocks and stem/head and the EMA copy) it is then either trained on end to end for ``--extra-steps`` or
fine-tuned block-wise (B groups, random schedule) for B × ``--extra-steps``. Accounting: an end-to-end step runs all
L layers, a block-wise step the L/B of one group, so both continuations cost ``extra_steps × L`` layer evaluations
(per sample); each group gets about ``extra_steps`` steps, the same as the end-to-end continuation, with the same
optimizer settings counted in its own steps. Both continuations start a fresh AdamW and EMA from the same weights.

Scored (benchmarks/parity_score.py's classifier features and FID, class accuracy of class-conditional samples):
the pretrained start (end-to-end routing: the pretrained function), the same weights routed block-wise before any
fine-tuning (each group = the stem/head + its own L/B pretrained layers), the end-to-end continuation and the
block-wise fine-tune; the ratios block-wise / end-to-end per seed, mean ± spread. Writes JSON and prints a markdown
table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from parity_run import run_jobs
from parity_score import FeatureNet, load_generator, mnist_tensors, train_feature_net
from parity_summary import spread
from torchmetrics.image.fid import FrechetInceptionDistance

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.presets import MNISTDemo

ROOT = Path(__file__).resolve().parents[1]
#: --quick: the tiny sizes (the tests run these)
QUICK = {"dim": 32, "depth": 3, "heads": 2, "batch_size": 16}
ARMS = ("pretrained", "pretrained_blockwise_routing", "e2e_continued", "blockwise_finetuned")


def train_stage(settings_file: Path) -> None:
    """One training run from a settings file: the demo's module, started from ``start`` if given, trained
    ``demo.steps`` steps under ``demo.strategy``; writes OUT/model.ckpt and OUT/summary.json."""
    saved = json.loads(settings_file.read_text())
    demo, out = MNISTDemo.from_dict(saved["demo"]), Path(saved["out"])
    torch.set_num_threads(saved.get("threads", 1))
    L.seed_everything(demo.seed, verbose=False)
    module = demo.module()
    callbacks: list[L.Callback] = []
    if saved.get("start"):
        reference = ldb.pretrained.load_pretrained(module, saved["start"])
        drift = ldb.pretrained.PretrainedDrift(reference)
        callbacks.append(drift)
    trainer = L.Trainer(
        strategy=demo.strategy, accelerator=demo.accelerator, devices=1, max_steps=demo.total_steps,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=out,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=demo.datamodule())
    seconds = time.perf_counter() - start
    trainer.save_checkpoint(out / "model.ckpt")
    summary = {
        "strategy": demo.strategy, "formulation": demo.formulation, "seed": demo.seed, "steps": demo.total_steps,
        "steps_per_group": module.group_steps.tolist(), "layer_evaluations": demo.layer_evaluations,
        "train_seconds": round(seconds, 1), "val": {}, "start": saved.get("start"),
        "drift_from_pretrained": callbacks[0].last if callbacks else None,  # type: ignore[attr-defined]
        "pretrained": module.pretrained,
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def job(demo: MNISTDemo, out: Path, start: Path | None = None) -> tuple[str, list[str]]:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "finetune_settings.json"
    path.write_text(json.dumps({"demo": demo.to_dict(), "out": str(out), "start": str(start) if start else None}))
    return str(out), [sys.executable, str(Path(__file__).resolve()), "--job", str(path)]


@torch.no_grad()
def module_quality(
    module: ldb.DiffusionBlocksModule, features: FeatureNet, real: torch.Tensor, per_class: int, steps: int,
    guidance: float,
) -> dict[str, Any]:  # fmt: skip
    """FID and class accuracy of ``module``'s class-conditional samples (the parity benchmark's seeds per chunk)."""
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    fid.update(real, real=True)
    correct = total = 0
    start = time.perf_counter()
    for chunk in torch.arange(10).repeat_interleave(per_class).split(200):
        seed = int(chunk[0]) * 7919 + total + 1
        images = module.sample(labels=chunk, steps=steps, guidance=guidance, seed=seed).clamp(-1, 1)
        fid.update(images, real=False)
        correct += int((features.logits(images).argmax(-1) == chunk).sum())
        total += len(chunk)
    return {"fid": float(fid.compute()), "class_accuracy": correct / total, "samples": total,
            "sample_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def blockwise_routed(demo: MNISTDemo, checkpoint: Path) -> ldb.DiffusionBlocksModule:
    """The pretrained weights in a B-group module routed block-wise, before any fine-tuning."""
    torch.manual_seed(demo.seed)
    module = replace(demo, strategy="diffusionblocks").module()
    ldb.pretrained.load_pretrained(module, checkpoint)
    module.trained_blockwise.fill_(True)
    return module.eval()


def table(report: dict) -> str:
    s = report["summary"]
    lines = [
        "| model | FID (mean ± std) | class accuracy (mean ± std) |",
        "|---|---|---|",
    ]
    for arm in ARMS:
        if arm in s:
            f, a = s[arm]["fid"], s[arm]["class_accuracy"]
            lines.append(f"| {arm} | {f['mean']:.2f} ± {f['std']:.2f} | {a['mean']:.3f} ± {a['std']:.3f} |")
    if "fid_ratio" in s:
        f, a = s["fid_ratio"], s["accuracy_ratio"]
        lines += [
            "",
            "| ratio block-wise / end-to-end (per seed) | mean ± std | min–max |",
            "|---|---|---|",
            f"| FID (lower is better) | {f['mean']:.3f} ± {f['std']:.3f} | {f['min']:.3f}–{f['max']:.3f} |",
            f"| class accuracy | {a['mean']:.3f} ± {a['std']:.3f} | {a['min']:.3f}–{a['max']:.3f} |",
        ]
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            out[arm] = {"fid": spread([r["fid"] for r in mine]),
                        "class_accuracy": spread([r["class_accuracy"] for r in mine])}  # fmt: skip
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if ("e2e_continued", r["seed"]) in by
                    and ("blockwise_finetuned", r["seed"]) in by})  # fmt: skip
    if seeds:
        bw, e2e = "blockwise_finetuned", "e2e_continued"
        out["seeds_compared"] = seeds
        out["fid_ratio"] = spread([by[bw, s]["fid"] / by[e2e, s]["fid"] for s in seeds])
        out["accuracy_ratio"] = spread([by[bw, s]["class_accuracy"] / max(by[e2e, s]["class_accuracy"], 1e-9)
                                        for s in seeds])  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--pretrain-steps", type=int, default=600, help="end-to-end pretraining steps")
    p.add_argument("--extra-steps", type=int, default=200, help="end-to-end continuation steps (block-wise: B×)")
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3, help="pretraining learning rate (the demo's)")
    p.add_argument("--finetune-lr", type=float, default=1e-3, help="both continuations' learning rate")
    p.add_argument("--finetune-warmup", type=int, default=20, help="both continuations' warmup (per group)")
    p.add_argument("--fid-samples", type=int, default=500)
    p.add_argument("--feature-steps", type=int, default=800, help="training steps of the MNIST feature CNN")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0, help="CFG scale (the demo's for rectified flow)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--workdir", default="outputs/finetune")
    p.add_argument("--reuse-pretrained", action="store_true",
                   help="keep the pretrained checkpoints already in --workdir (same settings), train only the rest")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (for tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.job:
        train_stage(Path(args.job))
        return
    started = time.perf_counter()
    torch.set_num_threads(1)
    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    real = mnist_tensors(mnist, "test")[0][: args.fid_samples]
    per_class = max(1, args.fid_samples // 10)
    sizes = QUICK if args.quick else {"dim": args.dim, "depth": args.depth, "heads": args.heads,
                                      "batch_size": args.batch_size}  # fmt: skip
    base = MNISTDemo(formulation="flow", num_blocks=args.num_blocks, lr=args.lr, data_dir=str(mnist), **sizes)
    workdir = Path(args.workdir)
    out_path = Path(args.out or ROOT / "benchmarks" / "results" / "finetune.json")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "command": "python benchmarks/finetune.py " + " ".join(sys.argv[1:]),
        "settings": {**vars(args), "demo": base.to_dict()},
        "accounting": (
            f"end-to-end continuation: {args.extra_steps} steps x {base.depth} layers; block-wise fine-tune:"
            f" {args.num_blocks * args.extra_steps} steps x {base.depth}/{args.num_blocks} layers: both"
            f" {args.extra_steps * base.depth} layer evaluations per sample (batch {base.batch_size})"
        ),
        "rows": [],
        "partial": True,
    }
    features: list[FeatureNet] = []

    def write() -> None:
        report["summary"] = summarize(report["rows"])
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        out_path.write_text(json.dumps(report, indent=2))

    def score(arm: str, seed: int, module: ldb.DiffusionBlocksModule, summary: dict | None) -> None:
        if not features:
            net, acc = train_feature_net(mnist, 30 if args.quick else args.feature_steps)
            features.append(net)
            report["feature_net_test_accuracy"] = acc
        row = {"arm": arm, "seed": seed, **module_quality(module, features[0], real, per_class, args.sample_steps,
                                                          args.guidance)}  # fmt: skip
        if summary is not None:
            row |= {k: summary.get(k) for k in ("steps", "steps_per_group", "layer_evaluations", "train_seconds",
                                                "drift_from_pretrained")}  # fmt: skip
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        write()

    pretrain = {s: workdir / f"seed{s}" / "pretrain" for s in args.seeds}
    todo = [s for s in args.seeds if not (args.reuse_pretrained and (pretrain[s] / "model.ckpt").exists())]
    jobs = [job(replace(base, strategy="auto", steps=args.pretrain_steps, seed=s), pretrain[s]) for s in todo]

    def score_pretrained(s: int) -> None:
        module, summary = load_generator(pretrain[s])
        score("pretrained", s, module, summary)
        demo = replace(base, seed=s)
        score("pretrained_blockwise_routing", s, blockwise_routed(demo, pretrain[s] / "model.ckpt"), None)

    for s in args.seeds:
        if s not in todo:
            wanted = replace(base, strategy="auto", steps=args.pretrain_steps, seed=s).to_dict()
            saved = json.loads((pretrain[s] / "finetune_settings.json").read_text())["demo"]
            if saved != wanted:
                changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
                sys.exit(f"{pretrain[s]} was pretrained with other settings ({changed}); drop --reuse-pretrained.")
            print(f"reusing {pretrain[s]}", flush=True)
    run_jobs(jobs, args.jobs, done=lambda i: score_pretrained(todo[i]))
    ft = replace(base, lr=args.finetune_lr, warmup=args.finetune_warmup)
    arms, jobs = [], []
    for s in args.seeds:
        start = pretrain[s] / "model.ckpt"
        for arm, strategy, steps in (("e2e_continued", "auto", args.extra_steps),
                                     ("blockwise_finetuned", "diffusionblocks", args.num_blocks * args.extra_steps)):
            arms.append((arm, s, workdir / f"seed{s}" / f"{arm}_{steps}"))
            jobs.append(job(replace(ft, strategy=strategy, steps=steps, seed=s), arms[-1][2], start))

    def finetuned_done(i: int) -> None:
        arm, s, out = arms[i]
        module, summary = load_generator(out)
        score(arm, s, module, summary)

    run_jobs(jobs, args.jobs, done=finetuned_done)
    for s in args.seeds:  # reused starts are scored last, so that the training jobs start at once
        if s not in todo:
            score_pretrained(s)
    report["partial"] = False
    write()
    print(table(report))
    print(f"\nwritten {out_path}")


if __name__ == "__main__":
    main()
