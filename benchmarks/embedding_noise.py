"""How much of a unit-norm target embedding survives noise σ: nearest-neighbour decoding accuracy.

    python benchmarks/embedding_noise.py --vocab 65 --dim 128 --blocks 4

Classification and the language-model tasks noise a unit-norm embedding of the answer, z = e_y + σε. For a
random table of ``--vocab`` unit vectors in ``--dim`` dimensions this measures, by Monte Carlo, how often the
nearest table row to z is still e_y, at a grid of σ and inside each group's σ range (the paper's EDM
partition, equi-probable groups, γ = 0). Writes benchmarks/results/embedding_noise.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

import lightning_diffusionblocks as ldb


def decode_accuracy(table: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> float:
    """Share of z = e_y + σε whose nearest row of ``table`` is e_y (one draw of y and ε per σ entry)."""
    y = torch.randint(0, table.shape[0], sigma.shape, generator=generator)
    z = table[y] + sigma[:, None] * torch.randn(len(sigma), table.shape[1], generator=generator)
    return float((torch.cdist(z, table).argmin(-1) == y).float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "embedding_noise.json"))
    args = p.parse_args()
    gen = torch.Generator().manual_seed(args.seed)
    table = F.normalize(torch.randn(args.vocab, args.dim, generator=gen), dim=-1)
    grid = [0.002, 0.05, 0.09, 0.134, 0.2, 0.3, 0.5, 0.674, 1.0, 2.0, 80.0]
    by_sigma = {s: decode_accuracy(table, torch.full((args.samples,), s), gen) for s in grid}
    noise = ldb.EDM
    bounds = noise.boundaries(args.blocks).tolist()  # ascending; group 0 owns the highest range
    groups = []
    for g in range(args.blocks):
        lo, hi = bounds[args.blocks - 1 - g], bounds[args.blocks - g]
        sigma = noise.sample(args.samples, lo, hi, generator=gen)
        groups.append({"group": g, "sigma_range": [lo, hi], "accuracy": decode_accuracy(table, sigma, gen)})
    report = {
        "command": "python benchmarks/embedding_noise.py "
        + " ".join(
            f"--{k} {v}" for k, v in (("vocab", args.vocab), ("dim", args.dim), ("blocks", args.blocks))
        ),  # fmt: skip
        "chance": 1 / args.vocab,
        "by_sigma": by_sigma,
        "groups": groups,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print("| σ | " + " | ".join(f"{s:g}" for s in grid) + " |")
    print("|---" * (len(grid) + 1) + "|")
    print("| accuracy | " + " | ".join(f"{a:.2f}" for a in by_sigma.values()) + " |")
    for row in groups:
        lo, hi = row["sigma_range"]
        print(f"group {row['group']}: σ ∈ [{lo:.3g}, {hi:.3g}], nearest-neighbour accuracy {row['accuracy']:.3f}")


if __name__ == "__main__":
    main()
