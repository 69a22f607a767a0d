"""How well a trained DDPM run recovers the clean image at each timestep: the error of its x̂₀.

    python benchmarks/denoise_error.py outputs/parity/gen_diffusionblocks_ddpm outputs/parity/gen_auto_ddpm

For real MNIST test images x, noise ε and timesteps k from T − 1 down to 0, forms x_k = √ᾱ_k·x + √(1 − ᾱ_k)·ε,
asks the group owning k for x̂₀ (with the image's label and with the null label) and reports the mean squared
error against x, next to the error of the best constant guess (the mean test image). Where the model's error is
above that constant, its x̂₀ carries no information about the image, so a sampler starting there cannot place
the digit. Runs are folders of ``examples/mnist_generation.py --formulation ddpm``. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from parity_score import load_generator, mnist_tensors  # noqa: E402

import lightning_diffusionblocks as ldb  # noqa: E402

TIMESTEPS = (999, 900, 800, 700, 600, 500, 400, 300, 200, 100, 50, 10, 0)


@torch.no_grad()
def denoise_errors(run: Path, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """x̂₀ mean squared error per timestep of one run (conditional and null label)."""
    module, summary = load_generator(run)
    task = module.task
    rows = []
    with module.evaluating() as router:
        for k in TIMESTEPS:
            alpha_bar = float(task.noise.alpha_bar(torch.tensor([k])))
            eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(k))
            z = alpha_bar**0.5 * images + (1 - alpha_bar) ** 0.5 * eps
            ks = torch.full((images.shape[0],), k)
            run_k = router.at(float(k))
            cond = task.denoise(run_k, z, ks, labels)
            null = task.denoise(run_k, z, ks, torch.full_like(labels, task.null_label))
            rows.append({"timestep": k, "alpha_bar": alpha_bar, "mse": float(((cond - images) ** 2).mean()),
                         "mse_null_label": float(((null - images) ** 2).mean())})  # fmt: skip
    return {"run": str(run), "strategy": summary["strategy"], "steps": summary["steps"],
            "prediction": summary.get("prediction", "epsilon"), "beta_schedule": summary.get("beta_schedule", "linear"),
            "rows": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="output folders of examples/mnist_generation.py --formulation ddpm")
    p.add_argument("--images", type=int, default=200, help="MNIST test images")
    p.add_argument("--mnist-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/ddpm_denoise_error.json")
    args = p.parse_args()
    images, labels = mnist_tensors(ldb.data.find_mnist_dir(args.mnist_dir), "test")
    images, labels = images[: args.images], labels[: args.images]
    constant = float(((images.mean(0, keepdim=True) - images) ** 2).mean())
    runs = [denoise_errors(Path(r), images, labels) for r in args.runs]
    report = {"command": "python benchmarks/denoise_error.py " + " ".join(sys.argv[1:]), "mean_image_mse": constant,
              "runs": runs}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"mean-image MSE (the best constant guess): {constant:.4f}")
    for r in report["runs"]:
        print(f"\n{r['run']} ({r['strategy']}, {r['prediction']}, {r['beta_schedule']})")
        print("| timestep | ᾱ | x̂₀ MSE | null label |\n|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['timestep']} | {row['alpha_bar']:.3g} | {row['mse']:.4f} | {row['mse_null_label']:.4f} |")


if __name__ == "__main__":
    main()
