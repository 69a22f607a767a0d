"""What the benchmark scripts share: the model, synthetic data, a quiet Trainer and machine facts."""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb


def add_model_arguments(parser: argparse.ArgumentParser, dim: int, depth: int, heads: int) -> None:
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--model", default="dit", choices=["dit", "lm", "gpt2"],
                        help="dit: image DiT; lm: our decoder LM (autoregressive, clean‖noisy layout);"
                        " gpt2: a Hugging Face GPT-2 through DecoderAdapter")  # fmt: skip
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (lm, gpt2)")
    parser.add_argument("--vocab", type=int, default=256, help="vocabulary size (lm, gpt2)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--batch-size", type=int, default=32)


def build_module(
    args: argparse.Namespace,
    num_blocks: int,
    lora: ldb.GroupLoRA | None = None,
    state_precision: ldb.StatePrecision | None = None,
    activation_checkpointing: str | int | None = None,
) -> ldb.DiffusionBlocksModule:
    """The benchmark model wrapped for ``num_blocks`` groups: a DiT (3-channel images, 10 classes) or a
    decoder LM (autoregressive objective) of the same width and depth; fine-tuned with ``lora`` if given, with the
    given per-group state precision and activation checkpointing."""
    torch.manual_seed(0)
    model = getattr(args, "model", "dit")
    if model == "dit":
        net = ldb.presets.demo_dit(image_size=args.image_size, channels=3, patch=args.patch, dim=args.dim,
                                   depth=args.depth, heads=args.heads)  # fmt: skip
        task: ldb.tasks.Task = ldb.tasks.ImageGeneration()
    else:
        if model == "lm":
            net = ldb.models.TransformerLM(args.vocab, "autoregressive", dim=args.dim, depth=args.depth,
                                           heads=args.heads, context_length=args.seq_len)  # fmt: skip
        else:
            import transformers

            config = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq_len, n_embd=args.dim,
                                             n_layer=args.depth, n_head=args.heads, bos_token_id=0, eos_token_id=0,
                                             attn_implementation="sdpa")  # fmt: skip
            net = ldb.models.DecoderAdapter(transformers.GPT2Model(config), args.vocab, "autoregressive")
        task = ldb.tasks.AutoregressiveLM(args.vocab)
    return ldb.DiffusionBlocksModule(net, task, num_blocks=num_blocks, stem="per_group", lora=lora,
                                     state_precision=state_precision,
                                     activation_checkpointing=activation_checkpointing)  # fmt: skip


def synthetic_loader(args: argparse.Namespace, batches: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if getattr(args, "model", "dit") != "dit":
        tokens = torch.randint(0, args.vocab, (args.batch_size * batches, args.seq_len), generator=g)
        return DataLoader(tokens, batch_size=args.batch_size)
    n, size = args.batch_size * batches, args.image_size
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return DataLoader(TensorDataset(images, torch.randint(0, 10, (n,), generator=g)), batch_size=args.batch_size)


def quiet_trainer(args: argparse.Namespace, strategy: Any, steps: int, callbacks: Sequence[Callback]) -> L.Trainer:
    return L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=1, max_steps=steps, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=list(callbacks), num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip


def machine(command: str, cuda: bool) -> dict[str, Any]:
    meta = {
        "command": command,
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        meta["gpu"] = torch.cuda.get_device_name(0)
    return meta


RESULTS = Path(__file__).resolve().parent / "results"


def write_report(out: str | None, default_name: str, payload: dict[str, Any], table: str) -> Path:
    """Write ``payload`` as JSON (to ``out`` or benchmarks/results/``default_name``) and print ``table``."""
    path = Path(out) if out else RESULTS / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(table)
    print(f"\nwritten {path}")
    return path
