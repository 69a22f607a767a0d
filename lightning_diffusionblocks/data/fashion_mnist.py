"""Fashion-MNIST from the standard IDX files, offline.

Found in ``data_dir``, in ``$LDB_FASHION_MNIST_DIR``, or where Debian's package ``dataset-fashion-mnist``
installs it (``/usr/share/datasets/fashion-mnist``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning_diffusionblocks.data.idx import find_idx_file
from lightning_diffusionblocks.data.mnist import IDXDataModule

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
HELP = (
    "Fashion-MNIST files not found{where}. Install them offline with `apt-get install dataset-fashion-mnist`"
    " (Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist), or put train-images-idx3-ubyte.gz,"
    " train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz in a directory and"
    " pass data_dir=<it> (or set LDB_FASHION_MNIST_DIR)."
)


def find_fashion_mnist_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        root = Path(data_dir)
    elif os.environ.get("LDB_FASHION_MNIST_DIR"):
        root = Path(os.environ["LDB_FASHION_MNIST_DIR"])
    else:
        root = DEBIAN_DIR
    if find_idx_file(root, "train-images-idx3-ubyte") and find_idx_file(root, "t10k-labels-idx1-ubyte"):
        return root
    raise FileNotFoundError(HELP.format(where=f" in {root}"))


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST images in [-1, 1] with labels 0–9 (see :data:`CLASSES`)."""

    def locate(self) -> Path:
        return find_fashion_mnist_dir(self.data_dir)
