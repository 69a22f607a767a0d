"""Readers for the IDX files MNIST and Fashion-MNIST ship in (gzip-compressed or plain)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one IDX file (magic 0x00 0x00 0x08 <ndim>, big-endian dims, uint8 payload)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        buf = f.read()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {buf[:4]!r}).")
    ndim = buf[3]
    dims = [int.from_bytes(buf[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(buf) != expected:
        raise ValueError(f"{path} is truncated or corrupt: {len(buf)} bytes, expected {expected} for shape {dims}.")
    return np.frombuffer(buf, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find_idx_file(root: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    return None


def load_split(root: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) uint8) of ``split`` in ``train``/``test`` from ``root``."""
    root = Path(root)
    images_stem, labels_stem = SPLIT_FILES[split]
    images_path, labels_path = find_idx_file(root, images_stem), find_idx_file(root, labels_stem)
    if images_path is None or labels_path is None:
        raise FileNotFoundError(f"{root} lacks {images_stem}[.gz] or {labels_stem}[.gz].")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in the {split} split.")
    return images, labels
