"""Classify Fashion-MNIST (or MNIST) with a timm ViT trained by DiffusionBlocks, and/or end to end.

    python examples/classification.py                          # both, same model, same layer evaluations
    python examples/classification.py --strategy diffusionblocks
    python examples/classification.py --strategy auto --data mnist

The timm backbone is made σ-aware by `ConditioningAdapter` without changing timm. DiffusionBlocks gets
B× the optimizer steps of the end-to-end run (each of its steps runs L/B layers), so both see the same
number of layer evaluations. Prints the test accuracy of each run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import timm

import lightning_diffusionblocks as ldb


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="both", choices=["both", "diffusionblocks", "auto"])
    p.add_argument("--data", default="fashion", choices=["fashion", "mnist"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="vit_tiny_patch16_224", help="any timm vit_*/deit_* name")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--dim", type=int, default=96)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000, help="end-to-end steps; DiffusionBlocks gets B× as many")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--inference-steps", type=int, default=None, help="σ steps at prediction (default B)")
    p.add_argument("--test-batches", type=int, default=None, help="limit the test set (default: all 10,000)")
    p.add_argument("--weighting", default="per_sample", choices=["per_sample", "batch_mean", "none"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args()


def run(args: argparse.Namespace, strategy: str) -> dict[str, float]:
    L.seed_everything(args.seed, verbose=False)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=28, patch_size=args.patch,
                                 in_chans=1, depth=args.depth, embed_dim=args.dim, num_heads=args.heads)  # fmt: skip
    net = ldb.models.ConditioningAdapter(backbone, num_classes=10)
    task = ldb.tasks.Classification(10, weighting=args.weighting)
    module = ldb.DiffusionBlocksModule(
        net,
        task,
        num_blocks=args.num_blocks,
        stem="shared",
        lr=args.lr,
        warmup_steps=100,
        lr_schedule="cosine",
        seed=args.seed,
    )
    data_cls = ldb.data.FashionMNISTDataModule if args.data == "fashion" else ldb.data.MNISTDataModule
    data = data_cls(args.data_dir, batch_size=args.batch_size, seed=args.seed)
    steps = args.steps * (args.num_blocks if strategy == "diffusionblocks" else 1)
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, limit_val_batches=2, val_check_interval=min(500, steps),
                        check_val_every_n_epoch=None)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    data.setup("test")
    correct = total = 0
    for i, (x, y) in enumerate(data.test_dataloader()):
        if args.test_batches is not None and i >= args.test_batches:
            break
        probs = module.predict_proba(x, steps=args.inference_steps)
        correct += int((probs.argmax(-1) == y).sum())
        total += len(y)
    return {"accuracy": correct / total, "test_images": total, "steps": steps, "train_seconds": seconds}


def main() -> None:
    args = parse_args()
    strategies = ["diffusionblocks", "auto"] if args.strategy == "both" else [args.strategy]
    results = {s: run(args, s) for s in strategies}
    for s, r in results.items():
        name = "DiffusionBlocks" if s == "diffusionblocks" else "end-to-end"
        print(f"{name:>16}: test accuracy {r['accuracy']:.4f} on {r['test_images']} images"
              f" ({r['steps']} steps, {r['train_seconds']:.0f} s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if len(results) == 2:
        ratio = results["diffusionblocks"]["accuracy"] / max(results["auto"]["accuracy"], 1e-9)
        print(f"accuracy ratio DiffusionBlocks / end-to-end: {ratio:.3f}")


if __name__ == "__main__":
    main()
