"""Classify Fashion-MNIST (or MNIST) with a timm ViT trained by DiffusionBlocks, and/or end to end.

    python examples/classification.py                          # both, same model, same layer evaluations
    python examples/classification.py --strategy diffusionblocks
    python examples/classification.py --strategy auto --data mnist
    python examples/classification.py --strategy plain         # the paper's baseline: plain ViT, cross-entropy

The timm backbone is made σ-aware by `ConditioningAdapter` without changing timm. DiffusionBlocks gets
B× the optimizer steps of the end-to-end run (each of its steps runs L/B layers), so both see the same
number of layer evaluations. `--strategy plain` trains the same timm ViT with its own head and plain
cross-entropy (no noise, no label token) for the end-to-end number of steps: the paper's baseline.
Prints the test accuracy of each run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import timm
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.module import warmup_cosine


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="both", choices=["both", "all", "diffusionblocks", "auto", "plain"],
                   help="both = diffusionblocks + auto; all adds plain")  # fmt: skip
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
    p.add_argument(
        "--conditioning",
        default="adaln_zero",
        choices=["adaln_zero", "film"],
        help="how blocks see σ: adaLN-Zero (the paper's ViT) or a gate-less FiLM of the residual stream",
    )
    p.add_argument(
        "--clip", type=float, default=1.0, help="gradient-norm clipping of every run (the paper's 1.0; 0 = off)"
    )
    p.add_argument("--warmup", type=int, default=100, help="warmup steps (DiffusionBlocks: counted per group)")
    p.add_argument(
        "--curve-every",
        type=int,
        default=0,
        help="also measure test accuracy every N end-to-end steps (DiffusionBlocks: every B·N), 0 = off",
    )
    p.add_argument("--curve-images", type=int, default=2000, help="test images of each learning-curve point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seeds", type=int, default=3,
                   help="sampler seeds of the σ-conditioned test accuracy (the first is the reported figure; the "
                        "others measure the evaluator's own noise)")  # fmt: skip
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every run (cpu, gpu, ...)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args()


class PlainClassifier(L.LightningModule):
    """The paper's baseline: the timm backbone with its own linear head, trained with cross-entropy."""

    def __init__(self, backbone: torch.nn.Module, lr: float, warmup: int, steps: int) -> None:
        super().__init__()
        self.backbone, self.lr, self.warmup, self.steps = backbone, lr, warmup, steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.backbone(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self.backbone(x).argmax(-1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr)

        def factor(step: int) -> float:  # the same warmup + cosine to 0.1 as DiffusionBlocksModule
            return warmup_cosine(step, self.warmup, self.steps)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}  # fmt: skip

    def predict_proba(self, x: torch.Tensor, steps: int | None = None, seed: int = 0) -> torch.Tensor:
        training = self.backbone.training
        with torch.no_grad():
            probs = self.backbone.eval()(x).softmax(-1)
        self.backbone.train(training)
        return probs


class LearningCurve(L.Callback):
    """Test accuracy on fixed images every ``every`` optimizer steps, with the layer evaluations spent so far."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, every: int, layers_per_step: float) -> None:
        self.images, self.labels, self.every, self.layers_per_step = images, labels, every, layers_per_step
        self.points: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step % self.every or (self.points and self.points[-1]["step"] == step):
            return
        images, labels = self.images.to(pl_module.device), self.labels.to(pl_module.device)
        correct = sum(int((pl_module.predict_proba(x).argmax(-1) == y).sum())  # type: ignore[operator]
                      for x, y in zip(images.split(500), labels.split(500)))  # fmt: skip
        self.points.append({"step": step, "layer_evaluations": step * self.layers_per_step,
                            "accuracy": correct / len(self.labels)})  # fmt: skip


def run(args: argparse.Namespace, strategy: str) -> dict[str, float]:
    L.seed_everything(args.seed, verbose=False)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=10 if strategy == "plain" else 0,
                                 img_size=28, patch_size=args.patch, in_chans=1, depth=args.depth,
                                 embed_dim=args.dim, num_heads=args.heads)  # fmt: skip
    if strategy == "plain":
        return fit_and_test(args, PlainClassifier(backbone, args.lr, args.warmup, args.steps), "auto", args.steps)
    net = ldb.models.ConditioningAdapter(backbone, num_classes=10, conditioning=args.conditioning)
    task = ldb.tasks.Classification(10, weighting=args.weighting)
    module = ldb.DiffusionBlocksModule(
        net,
        task,
        num_blocks=args.num_blocks,
        stem="shared",
        lr=args.lr,
        warmup_steps=args.warmup,
        lr_schedule="cosine",
        gradient_clip_val=args.clip or None,
        seed=args.seed,
    )
    steps = args.steps * (args.num_blocks if strategy == "diffusionblocks" else 1)
    return fit_and_test(args, module, strategy, steps)


def fit_and_test(args: argparse.Namespace, module: L.LightningModule, strategy: str, steps: int) -> dict[str, float]:
    """Train ``module`` for ``steps`` steps, then measure test accuracy."""
    data_cls = ldb.data.FashionMNISTDataModule if args.data == "fashion" else ldb.data.MNISTDataModule
    data = data_cls(args.data_dir, batch_size=args.batch_size, seed=args.seed)
    callbacks, curve = [], None
    if args.curve_every:
        data.setup("test")
        images, labels = map(torch.cat, zip(*data.test_dataloader()))
        blockwise = strategy == "diffusionblocks"
        curve = LearningCurve(images[: args.curve_images], labels[: args.curve_images],
                              args.curve_every * (args.num_blocks if blockwise else 1),
                              args.depth / args.num_blocks if blockwise else args.depth)  # fmt: skip
        callbacks.append(curve)
    plain = isinstance(module, PlainClassifier)  # the module optimises manually and clips each group itself
    trainer = L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, limit_val_batches=2, val_check_interval=min(500, steps),
                        check_val_every_n_epoch=None, callbacks=callbacks,
                        gradient_clip_val=(args.clip or None) if plain else None)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy, total = measure_accuracy(module, data, args, seed=0)
    result = {"accuracy": accuracy, "test_images": total, "steps": steps, "train_seconds": seconds,
              "epochs": round(steps * args.batch_size / len(data.train_set), 2)}  # fmt: skip
    if curve is not None:
        result["curve"] = curve.points
    if not plain and args.eval_seeds > 1:  # the plain ViT's prediction is deterministic
        result["accuracy_eval_seeds"] = [accuracy] + [measure_accuracy(module, data, args, seed=s)[0]
                                                      for s in range(1, args.eval_seeds)]  # fmt: skip
    return result


def measure_accuracy(
    module: L.LightningModule, data: L.LightningDataModule, args: argparse.Namespace, seed: int
) -> tuple[float, int]:
    """Test accuracy (and the number of images) with the sampler's noise drawn from ``seed``."""
    data.setup("test")
    correct = total = 0
    for i, (x, y) in enumerate(data.test_dataloader()):
        if args.test_batches is not None and i >= args.test_batches:
            break
        x, y = x.to(module.device), y.to(module.device)
        probs = module.predict_proba(x, steps=args.inference_steps, seed=seed)
        correct += int((probs.argmax(-1) == y).sum())
        total += len(y)
    return correct / total, total


def main() -> None:
    args = parse_args()
    strategies = {"both": ["diffusionblocks", "auto"], "all": ["diffusionblocks", "auto", "plain"]}.get(
        args.strategy, [args.strategy]
    )
    results = {s: run(args, s) for s in strategies}
    for s, r in results.items():
        name = {"diffusionblocks": "DiffusionBlocks", "auto": "end-to-end", "plain": "plain ViT (CE)"}[s]
        print(f"{name:>16}: test accuracy {r['accuracy']:.4f} on {r['test_images']} images"
              f" ({r['steps']} steps, {r['train_seconds']:.0f} s)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    for baseline, label in (("auto", "end-to-end"), ("plain", "plain ViT")):
        if "diffusionblocks" in results and baseline in results:
            ratio = results["diffusionblocks"]["accuracy"] / max(results[baseline]["accuracy"], 1e-9)
            print(f"accuracy ratio DiffusionBlocks / {label}: {ratio:.3f}")


if __name__ == "__main__":
    main()
