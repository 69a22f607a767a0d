"""Offline data sets."""

from lightning_diffusionblocks.data.captions import (
    CaptionedImages,
    CaptionedMNISTDataModule,
    CaptionSet,
    SentenceEncoder,
    TextEmbeddings,
    digit_captions,
    encode_cached,
)
from lightning_diffusionblocks.data.fashion_mnist import FashionMNISTDataModule, find_fashion_mnist_dir
from lightning_diffusionblocks.data.idx import read_idx
from lightning_diffusionblocks.data.loaders import EpochShuffleSampler, make_loader
from lightning_diffusionblocks.data.mnist import IDXDataModule, MNISTDataModule, find_mnist_dir
from lightning_diffusionblocks.data.text import (
    CharTokenizer,
    TextDataModule,
    TextWindows,
    find_kjv_file,
    load_kjv,
    read_text_file,
    windows,
)

__all__ = [
    "CaptionedImages",
    "CaptionedMNISTDataModule",
    "CaptionSet",
    "SentenceEncoder",
    "TextEmbeddings",
    "digit_captions",
    "encode_cached",
    "CharTokenizer",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "find_fashion_mnist_dir",
    "IDXDataModule",
    "make_loader",
    "MNISTDataModule",
    "find_mnist_dir",
    "read_idx",
    "find_kjv_file",
    "load_kjv",
    "read_text_file",
    "TextDataModule",
    "TextWindows",
    "windows",
]
