"""Data loaders that resume exactly: the shuffle order is a pure function of (seed, epoch)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation each epoch, seeded by ``(seed, epoch)``; Lightning calls ``set_epoch``.

    A generator-driven shuffle depends on how many epochs the generator has already served, which a
    resumed run cannot reproduce; this order can.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = size, seed, 0
        self._yielded = 0
        self._resume_at = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        start, self._resume_at = self._resume_at, 0
        self._yielded = start
        for index in order[start:]:
            self._yielded += 1
            yield index

    # torchdata's StatefulDataLoader saves and restores these for exact mid-epoch resume
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._resume_at = state["epoch"], state["yielded"]

    def __len__(self) -> int:
        return self.size


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A resumable loader (``StatefulDataLoader`` when torchdata is installed) with a (seed, epoch) shuffle."""
    kwargs = {
        "batch_size": batch_size,
        "sampler": EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        "num_workers": num_workers,
        "drop_last": shuffle,
        "persistent_workers": num_workers > 0,
    }
    if importlib.util.find_spec("torchdata") is not None:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(dataset, **kwargs)
    return DataLoader(dataset, **kwargs)
