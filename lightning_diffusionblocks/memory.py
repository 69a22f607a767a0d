"""Exact memory accounting: bytes of parameters, gradients, optimizer state and saved activations.

These count what PyTorch holds, not what the allocator reserves, so they are exact and repeatable on
any device; process-level peaks (RSS, CUDA) are read beside them. :class:`GroupMemory` holds one group's figures:
the memory monitor fills it and the dashboard's per-group table reads it, neither importing the other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
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


#: the meters open now, innermost last (a checkpointed block reports its recomputation to the innermost)
_OPEN_METERS: list[SavedTensorMeter] = []


class SavedTensorMeter:
    """Context that sums the bytes autograd saves for backward (activations), excluding parameters.

    Storages are counted once; it measures what the graph keeps alive for the backward pass.

    A block run under non-reentrant activation checkpointing saves its tensors through the checkpoint's own hooks,
    so this meter sees only the block's inputs (which the checkpoint keeps). What such a block holds at its
    backward is what it recomputes: :meth:`recomputation` (entered by the checkpoint inside its hooks) counts it
    (``recomputed``: the largest block's bytes). When that block's backward runs, what was saved after it has been
    freed, so the graph then holds what was saved up to its inputs plus its recomputation. ``held`` is the most the
    graph holds: that, for the worst block, or everything saved (backward's start), whichever is larger.
    """

    def __init__(self, exclude: Iterable[Tensor] | Callable[[], Iterable[Tensor]] = ()) -> None:
        #: the parameters' storages; a callable is read at the first saved tensor, so parameters whose storage is
        #: replaced after the meter starts (a group made active in fp32 by the training step) are still excluded
        self._exclude_from = exclude if callable(exclude) else None
        self.exclude = set() if callable(exclude) else self._storages(exclude)
        self.storages: set[int] = set()
        self.bytes = 0
        #: the most bytes one checkpointed block saves when recomputed (beyond what is counted in ``bytes``)
        self.recomputed = 0
        #: the most the graph holds while a checkpointed block's backward runs (saved up to it + its recomputation)
        self.recompute_peak = 0
        self._ctx: torch.autograd.graph.saved_tensors_hooks | None = None

    @property
    def held(self) -> int:
        """The most bytes the graph holds: all saved tensors, or a checkpointed block's recomputation with what was
        saved before it (its inputs included), whichever is larger."""
        return max(self.bytes, self.recompute_peak)

    @staticmethod
    def _storages(tensors: Iterable[Tensor]) -> set[int]:
        return {t.untyped_storage().data_ptr() for t in tensors if t.numel()}

    def _new_storage(self, t: Tensor, seen: set[int]) -> int:
        if self._exclude_from is not None:
            self.exclude, self._exclude_from = self._storages(self._exclude_from()), None
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in self.exclude or ptr in seen or not storage.nbytes():
            return 0
        seen.add(ptr)
        return storage.nbytes()

    def _pack(self, t: Tensor) -> Tensor:
        self.bytes += self._new_storage(t, self.storages)
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        _OPEN_METERS.append(self)
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._ctx is not None
        if self in _OPEN_METERS:
            _OPEN_METERS.remove(self)
        self._ctx.__exit__(exc_type, exc, tb)
        self._ctx = None

    @staticmethod
    def open_meter() -> SavedTensorMeter | None:
        """The innermost meter open now, if any."""
        return _OPEN_METERS[-1] if _OPEN_METERS else None

    @contextmanager
    def recomputation(self) -> Iterator[None]:
        """Count what the code inside saves through the saved-tensor hooks in force on entry (a checkpoint's, which
        keeps a placeholder and recomputes the tensor at backward) and pass each tensor on to them unchanged.

        Entered by a checkpoint around a block's forward (its ``context_fn``), it measures the bytes that block's
        recomputation will hold at its backward: storages already counted (its inputs) and parameters are not. The
        counted tensors stay alive until the block's forward ends (the memory its recomputation takes at backward),
        so the count is exact. Without hooks in force it measures nothing.
        """
        top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
        hooks = top(False) if top is not None else None
        if hooks is None:
            yield
            return
        inner_pack, inner_unpack = hooks
        seen = set(self.storages)
        before = self.bytes  # saved so far, this block's inputs included
        counted = 0
        # the checkpoint keeps none of them, so a freed one's memory could come back as a "seen" storage: hold them
        # until the block's forward ends (as its recomputation will at backward)
        alive: list[Tensor] = []

        def pack(t: Tensor) -> object:
            nonlocal counted
            new = self._new_storage(t, seen)
            if new:
                counted += new
                alive.append(t.detach())
            return inner_pack(t)

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, inner_unpack):
                yield
        finally:
            alive.clear()
            self.recomputed = max(self.recomputed, counted)
            self.recompute_peak = max(self.recompute_peak, before + counted)


def checkpointed_indices(num_blocks: int, every: int | None) -> list[int]:
    """Positions (0 … ``num_blocks`` - 1, in a running group) of the blocks checkpointed when every ``every``-th
    block is (positions 0, k, 2k, …; ``every=1`` all of them, ``None`` none)."""
    return [] if every is None else list(range(0, num_blocks, every))


def checkpointed_activation_bytes(
    per_block_bytes: Sequence[int], input_bytes: Sequence[int], every: int | None, before: int = 0, after: int = 0
) -> int:
    """Bytes saved for backward that one group holds at its peak, with every ``every``-th block checkpointed.

    The model: block i saves ``per_block_bytes[i]`` for backward when run plainly (its activations, counting its
    input when it saves it, as pre-norm and post-norm transformer blocks do); ``input_bytes[i]`` are the bytes of
    its tensor inputs not saved before it (a conditioning vector every block takes counts in the first block
    only). ``before`` / ``after``: what the network saves before its blocks (stem) and after them (head, loss).
    A checkpointed block (positions 0, k, 2k, … of the group, :func:`checkpointed_indices`) keeps only its inputs,
    h_i = input[i], instead of h_i = per_block[i]; at its backward it recomputes its activations while what was
    saved after it has been freed. So the peak is the larger of backward's start and the worst recomputation:

        max(before + sum(h) + after,  before + max(sum(h[:j]) + per_block[j], j checkpointed))

    (``every=None``: ``before + sum(per_block) + after``). :class:`SavedTensorMeter`'s ``held`` measures the same.
    The memory plan scales a probe's one-sample figures by the batch size before calling it.
    """
    if len(per_block_bytes) != len(input_bytes):
        raise ValueError(
            f"per_block_bytes has {len(per_block_bytes)} entries but input_bytes {len(input_bytes)}: give one of each"
            " per block of the group."
        )
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be None or a positive int, got {every!r}.")
    checkpointed = set(checkpointed_indices(len(per_block_bytes), every))
    kept = [input_bytes[i] if i in checkpointed else b for i, b in enumerate(per_block_bytes)]
    recompute = max((sum(kept[:j]) + per_block_bytes[j] for j in checkpointed), default=0)
    return before + max(sum(kept) + after, recompute)


def release_freed_memory() -> bool:
    """Hand memory the C allocator keeps after large frees back to the system (glibc's ``malloc_trim``), so a process
    that frees a group's tensors also shrinks; False where unsupported (another C library, another system)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


def reset_peak_rss() -> bool:
    """Reset the process's peak resident set size (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def proc_kib_field(path: str, key: str) -> int | None:
    """Bytes of a ``key: N kB`` line of a Linux ``/proc`` file (``/proc/self/status``'s ``VmRSS``, ``/proc/meminfo``'s
    ``MemAvailable``); None where the file or the line is missing."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set size since start or the last :func:`reset_peak_rss`."""
    peak_now = proc_kib_field("/proc/self/status", "VmHWM")
    if peak_now is not None:
        return peak_now
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
    #: mean seconds of one training step (forward, backward, optimizer step); not a peak
    step_time: float = 0.0

    def update(self, other: GroupMemory) -> None:
        self.steps += 1
        for f in fields(self):
            if f.name == "step_time":  # a running mean over the steps
                self.step_time += (other.step_time - self.step_time) / self.steps
            elif f.name != "steps":
                setattr(self, f.name, max(getattr(self, f.name), getattr(other, f.name)))
