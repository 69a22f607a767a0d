"""Exact memory accounting: bytes of parameters, gradients, optimizer state and saved activations.

These count what PyTorch holds, not what the allocator reserves, so they are exact and repeatable on
any device; process-level peaks (RSS, CUDA) are read beside them. :class:`GroupMemory` holds one group's figures:
the memory monitor fills it and the dashboard's per-group table reads it, neither importing the other.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, fields
from types import TracebackType

import torch
from torch import Tensor


def tensor_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _on(t: Tensor, device: torch.device | None) -> bool:
    return device is None or t.device.type == device.type


def parameter_bytes(params: Iterable[Tensor], device: torch.device | None = None) -> int:
    """Bytes of the given parameters that live on ``device`` (all devices if None)."""
    seen, total = set(), 0
    for p in params:
        if id(p) not in seen and _on(p, device):
            seen.add(id(p))
            total += tensor_bytes(p)
    return total


def gradient_bytes(params: Iterable[Tensor], device: torch.device | None = None) -> int:
    return sum(tensor_bytes(p.grad) for p in set(params) if p.grad is not None and _on(p.grad, device))


def optimizer_bytes(optimizer: torch.optim.Optimizer, device: torch.device | None = None) -> int:
    """Bytes of optimizer state (e.g. Adam's moments) on ``device``; a tensor several parameters' states hold (the
    quantization maps of bitsandbytes' 8-bit optimizers, one pair per optimizer) is counted once."""
    total, seen = 0, set()
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and _on(value, device):
                key = (value.device, value.data_ptr())
                if value.numel() and key in seen:
                    continue
                seen.add(key)
                total += tensor_bytes(value)
    return total


class SavedTensorMeter:
    """Context that sums the bytes autograd saves for backward (activations), excluding parameters.

    Storages are counted once; it measures what the graph keeps alive for the backward pass.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude if t.numel()}
        self.storages: set[int] = set()
        self.bytes = 0
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.storages and storage.nbytes():
            self.storages.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._ctx is not None
        self._ctx.__exit__(exc_type, exc, tb)
        self._ctx = None


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start or the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


@dataclass
class GroupMemory:
    """Peak bytes seen while one group trained (end-to-end runs report one row, ``all``)."""

    steps: int = 0
    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    total: int = 0
    peak_rss: int = 0
    cuda_peak: int = 0

    def update(self, other: GroupMemory) -> None:
        self.steps += 1
        for f in fields(self):
            if f.name != "steps":
                setattr(self, f.name, max(getattr(self, f.name), getattr(other, f.name)))
