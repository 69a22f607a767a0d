"""Offline sample-quality figures for generated text (no judge model can be downloaded here).

- :class:`CharNGramJudge`: an interpolated character n-gram model fitted on the training text; the
  cross-entropy it assigns to generated text (bits per character) is a small-scale stand-in for the
  "generative perplexity" of the paper (which scores samples with GPT-2 XL / Llama-2-7B). Lower = the
  samples look more like the corpus. It rewards repetitive text too, so read it next to ``distinct_ngrams``.
- :func:`word_validity`: the share of generated words that occur in the training text.
- :func:`distinct_ngrams`: the share of distinct character n-grams (diversity; collapse shows up as ~0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

_WORD = re.compile(r"[A-Za-z]+")


class CharNGramJudge:
    """Interpolated (Witten–Bell) character n-gram model over token ids in [0, vocab_size)."""

    def __init__(self, ids: np.ndarray, vocab_size: int, order: int = 4) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}.")
        if vocab_size**order > 2**31:
            raise ValueError(f"vocab_size**order = {vocab_size}**{order} is too large; lower the order.")
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size <= order:
            raise ValueError(f"Need more than {order} tokens to fit an order-{order} model, got {ids.size}.")
        self.vocab_size, self.order = vocab_size, order
        self.counts: list[np.ndarray] = []  # counts[k]: (V^k contexts, V) for k = 0 … order-1
        for k in range(order):
            index = np.zeros(ids.size - k, dtype=np.int64)
            for j in range(k + 1):
                index = index * vocab_size + ids[j : ids.size - k + j]
            self.counts.append(np.bincount(index, minlength=vocab_size ** (k + 1)).reshape(-1, vocab_size))

    def _prob(self, context: list[int], token: int) -> float:
        v = self.vocab_size
        p = 1.0 / v
        for k in range(self.order):  # from the empty context up to the longest
            if k > len(context):
                break
            ctx = 0
            for c in context[len(context) - k :]:
                ctx = ctx * v + c
            row = self.counts[k][ctx]
            total, types = int(row.sum()), int((row > 0).sum())
            if total:
                lam = total / (total + types)
                p = lam * row[token] / total + (1 - lam) * p
        return p

    def bits_per_char(self, ids: Iterable[int]) -> float:
        """Cross-entropy (bits per token) the judge assigns to ``ids``, context from within ``ids``."""
        seq = [int(i) for i in ids]
        if not seq:
            raise ValueError("Cannot score an empty sequence.")
        total = 0.0
        for i, token in enumerate(seq):
            total -= math.log2(self._prob(seq[max(0, i - self.order + 1) : i], token))
        return total / len(seq)


def word_validity(generated: str, reference_words: set[str]) -> float:
    """Share of the words (letter runs) of ``generated`` that occur in ``reference_words`` (lower-cased)."""
    words = [w.lower() for w in _WORD.findall(generated)]
    if not words:
        return 0.0
    return sum(w in reference_words for w in words) / len(words)


def vocabulary(text: str) -> set[str]:
    """The lower-cased words of ``text``."""
    return {w.lower() for w in _WORD.findall(text)}


def distinct_ngrams(text: str, n: int = 4) -> float:
    """Distinct character n-grams / all character n-grams of ``text`` (1.0 = no repetition)."""
    grams = [text[i : i + n] for i in range(len(text) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
