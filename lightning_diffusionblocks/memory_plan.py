"""A whole-machine memory plan, made before training starts: what each group holds on the device while it trains,
what the offloaded groups hold in host memory and on disk, and whether that fits.

Two parts. The pure core (:class:`NetworkCost`, :class:`PlanOptions`, :func:`plan_memory`, :func:`fitting_options`)
turns the network's tensor sizes, the state precision, an activation estimate and the offload target into bytes; it
runs no model and can be recomputed for other options (more groups, 8-bit moments, checkpointing, disk offload) to
name the ones that would make a refused plan fit. The runtime part (:func:`measure_network`, :func:`capacities`,
:func:`baselines`) reads those inputs from a module set up for training: tensor sizes from its parameters, activations
from a probe of each group's loss on one and two samples of a training batch (bytes saved for backward, per block),
scaled to the batch size, and the machine's capacities.

On the CPU the device and the host are the same memory: the plan's device figure is the process's resident memory
(RSS) while a group trains (its baseline, what the process holds besides the model, included), checked against
``MemAvailable`` plus what the process holds now; nothing is planned in host memory (``BlockOffload`` offloads to disk
there), so the host column is empty and the host check is the device check.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import IterableDataset, default_collate

from lightning_diffusionblocks.memory import (
    SavedTensorMeter,
    checkpointed_activation_bytes,
    peak_rss_bytes,
    proc_kib_field,
)
from lightning_diffusionblocks.partition import split_layers
from lightning_diffusionblocks.precision import StatePrecision

if TYPE_CHECKING:
    from lightning_diffusionblocks.module import DiffusionBlocksModule

OffloadTarget = Literal["none", "cpu", "disk"]
Checkpointing = Literal["every"] | int | None
PlanMode = Literal["check", "print", "off"]

MIB = 2**20
#: torch's Adam keeps a scalar ``step`` tensor (float32) per parameter; it is never offloaded (only tensors with a
#: dimension are), so every trained tensor keeps these bytes on the device
STEP_BYTES = 4
#: the samples of a training batch the activation probe runs (two, to tell the per-sample part from the fixed part)
PROBE_SAMPLES = 2


# ---------------------------------------------------------------------------------------------------- the pure core
@dataclass(frozen=True)
class Activation:
    """Bytes that grow with the batch: ``fixed + per_sample * n`` (never below zero)."""

    fixed: int = 0
    per_sample: int = 0

    def at(self, n: int) -> int:
        return max(0, self.fixed + self.per_sample * n)

    @classmethod
    def fit(cls, measured: Mapping[int, int]) -> Activation:
        """The line through bytes measured at one and two samples (only one: proportional to the samples)."""
        if len(measured) == 1:
            ((n, b),) = measured.items()
            return cls(0, math.ceil(b / n))
        (n1, b1), (n2, b2) = sorted(measured.items())[:2]
        per_sample = max(0, round((b2 - b1) / (n2 - n1)))
        return cls(b1 - per_sample * n1, per_sample)


@dataclass(frozen=True)
class Tensors:
    """The element counts of some parameters: those trained (they have gradients and optimizer state) and frozen."""

    trainable: tuple[int, ...] = ()
    frozen: tuple[int, ...] = ()

    def __add__(self, other: Tensors) -> Tensors:
        return Tensors(self.trainable + other.trainable, self.frozen + other.frozen)

    @property
    def every(self) -> tuple[int, ...]:
        return self.trainable + self.frozen

    @classmethod
    def of(cls, params: Sequence[nn.Parameter]) -> Tensors:
        return cls(
            tuple(p.numel() for p in params if p.requires_grad), tuple(p.numel() for p in params if not p.requires_grad)
        )


@dataclass(frozen=True)
class BlockCost:
    """One block of the stack: its parameters, the bytes autograd saves in its forward, and the bytes of its input
    (what a checkpointed block keeps instead)."""

    tensors: Tensors
    saved: Activation = Activation()
    inputs: Activation = Activation()


@dataclass(frozen=True)
class NetworkCost:
    """What the plan needs of a network, independent of how it is cut into groups.

    ``stem`` is the network's parameters outside the block stack (copied into every group with per-group stems,
    shared by all otherwise); ``stem_saved`` the activations saved outside the blocks in one group's loss (stem, head
    and loss); ``buffers`` the bytes of every buffer of the module (never offloaded).
    """

    blocks: tuple[BlockCost, ...]
    stem: Tensors = Tensors()
    stem_saved: Activation = Activation()
    stem_mode: Literal["per_group", "shared"] = "per_group"
    ema: bool = False
    buffers: int = 0


@dataclass(frozen=True)
class PlanOptions:
    """The choices the plan is made for."""

    groups: tuple[tuple[int, ...], ...]
    batch_size: int
    precision: StatePrecision = StatePrecision()
    checkpointing: Checkpointing = None
    offload: OffloadTarget = "none"
    prefetch: bool = False
    device: Literal["cpu", "cuda"] = "cpu"
    #: the groups this process holds (block parallel: its own); None: every group
    held: tuple[int, ...] | None = None
    #: the groups this process trains; None: every held group
    trained: tuple[int, ...] | None = None

    @property
    def num_blocks(self) -> int:
        return len(self.groups)


@dataclass
class GroupPlan:
    """One group's figures (bytes). ``device`` is the peak while it trains, everything resident included;
    ``step_extra`` what the step needs beyond the saved activations at its peak (the gradients of the largest block's
    activations at backward's start, or the optimizer's temporaries, or an arriving group, whichever is largest)."""

    group: int
    layers: int
    params: int
    grads: int
    optimizer: int
    activations: int
    step_extra: int
    resident: int
    device: int
    host: int
    disk: int


@dataclass
class Limits:
    """What the machine offers (bytes): the compute device, host memory and the offload folder's disk."""

    device: int | None = None
    host: int | None = None
    disk: int | None = None


@dataclass
class MemoryPlan:
    """The plan: each group's figures, the process baselines and the totals, with the limits they were checked
    against (bytes). :meth:`record` is plain data for loggers and benchmarks."""

    options: PlanOptions
    #: the groups this process trains
    groups: list[GroupPlan]
    #: every group this process holds (their host and disk copies count whichever group trains)
    held: list[GroupPlan] = field(default_factory=list)
    baseline_device: int = 0
    baseline_host: int = 0
    limits: Limits = field(default_factory=Limits)
    #: how the activations were estimated (shown with the table), and whether they were
    activation_note: str = ""
    activations_estimated: bool = True

    @property
    def device_peak(self) -> int:
        """The largest device figure of the trained groups, the baseline included."""
        return self.baseline_device + max((g.device for g in self.groups), default=0)

    @property
    def host_total(self) -> int:
        """Host memory: the baseline (GPU training) plus every offloaded group's pinned copy."""
        if self.options.device == "cpu":
            return 0
        return self.baseline_host + sum(g.host for g in self.held)

    @property
    def disk_total(self) -> int:
        return sum(g.disk for g in self.held)

    def problems(self) -> list[str]:
        """What does not fit, one phrase each (empty: the plan fits)."""
        out = []
        lim = self.limits
        where = "the process's memory (RSS)" if self.options.device == "cpu" else "the device"
        if lim.device is not None and self.device_peak > lim.device:
            out.append(f"{where} needs {_mib(self.device_peak)} MiB of {_mib(lim.device)} MiB")
        if lim.host is not None and self.options.device != "cpu" and self.host_total > lim.host:
            out.append(f"host memory needs {_mib(self.host_total)} MiB of {_mib(lim.host)} MiB")
        if lim.disk is not None and self.disk_total > lim.disk:
            out.append(f"the offload disk needs {_mib(self.disk_total)} MiB of {_mib(lim.disk)} MiB")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()

    def record(self) -> dict[str, Any]:
        """Plain data: the options, each group's bytes, the totals and the limits."""
        opts = self.options
        return {
            "device_type": opts.device,
            "num_blocks": opts.num_blocks,
            "batch_size": opts.batch_size,
            "offload": opts.offload,
            "state_precision": opts.precision.record(),
            "activation_checkpointing": opts.checkpointing,
            "baseline_device": self.baseline_device,
            "baseline_host": self.baseline_host,
            "device_peak": self.device_peak,
            "host_total": self.host_total,
            "disk_total": self.disk_total,
            "limits": asdict(self.limits),
            "fits": self.fits,
            "groups": [asdict(g) for g in self.groups],
        }

    def table(self) -> str:
        """The per-group table (MiB) with the totals and limits, as printed before training."""
        opts = self.options
        cpu = opts.device == "cpu"
        head = ["group", "layers", "params", "grads", "optimizer", "activations", "step extra", "resident",
                "device peak", "host", "disk"]  # fmt: skip
        rows = [head]
        for g in self.groups:
            values = (g.params, g.grads, g.optimizer, g.activations, g.step_extra, g.resident)
            device = self.baseline_device + g.device
            rows.append([str(g.group), str(g.layers), *(f"{_mib(v)}" for v in values), _mib(device),
                         "-" if cpu else _mib(g.host), _mib(g.disk)])  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lim = self.limits
        where = "process RSS (CPU: device = host)" if cpu else "device"
        totals = [
            f"{where}: peak {_mib(self.device_peak)} MiB (baseline {_mib(self.baseline_device)} MiB)" + _of(lim.device),
        ]
        if not cpu:
            totals.append(
                f"host: {_mib(self.host_total)} MiB (baseline {_mib(self.baseline_host)} MiB)" + _of(lim.host)
            )
        if opts.offload == "disk":
            totals.append(f"disk: {_mib(self.disk_total)} MiB" + _of(lim.disk))
        title = (
            f"DiffusionBlocks memory plan (MiB): B={opts.num_blocks}, batch {opts.batch_size}, offload={opts.offload},"
            f" state_precision={opts.precision.weights}/{opts.precision.moments},"
            f" activation_checkpointing={opts.checkpointing!r}"
        )
        note = f"\n{self.activation_note}" if self.activation_note else ""
        return title + "\n" + "\n".join(lines) + "\n" + "; ".join(totals) + note


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


def _of(limit: int | None) -> str:
    return f" of {_mib(limit)} MiB" if limit is not None else ""


def plan_memory(
    network: NetworkCost,
    options: PlanOptions,
    baseline_device: int = 0,
    baseline_host: int = 0,
    limits: Limits | None = None,
) -> MemoryPlan:
    """Each group's device, host and disk bytes for ``options`` (see the module docstring for what each holds).

    While group g trains the device holds, besides the process baseline: the buffers; the shared stem (weights, EMA,
    gradients, moments) when stems are shared; every other held group as stored when nothing is offloaded (else only
    their optimizer ``step`` scalars); and g's own weights (fp32), EMA, moments, then the largest of three phases:
    forward and backward (gradients and activations), the optimizer step (gradients and the step's temporaries:
    torch's AdamW makes one parameter-sized buffer per tensor at once on CUDA, two of the largest tensor on the CPU;
    none for 8-bit moments), and, with a prefetching pinned-memory offload, the next group's copy arriving.
    An offloaded group holds its stored weights, EMA and moments in pinned host memory (``cpu``) or in a file
    (``disk``); the copies of every group stay there (buffers are reused), so both totals count every held group.
    """
    prec = options.precision
    held = list(options.held) if options.held is not None else list(range(options.num_blocks))
    trained = list(options.trained) if options.trained is not None else held
    per_group_stem = network.stem_mode == "per_group"

    def tensors(g: int) -> Tensors:
        own = Tensors()
        for i in options.groups[g]:
            own = own + network.blocks[i].tensors
        return own + network.stem if per_group_stem else own

    def weights(t: Tensors, active: bool) -> int:
        live = sum(prec.weight_bytes(n, active) for n in t.every)
        ema = sum(prec.weight_bytes(n, active) for n in t.every) if network.ema else 0  # switched with the live copy
        return live + ema

    def steps(t: Tensors) -> int:
        return 0 if prec.moments == "8bit" else STEP_BYTES * len(t.trainable)

    def moments(t: Tensors, active: bool) -> int:
        """Moments (as kept while active, or as stored), with the step scalars while active."""
        return sum(prec.moment_bytes(n, active) for n in t.trainable) + (steps(t) if active else 0)

    def grads(t: Tensors) -> int:
        return sum(prec.weight_bytes(n, True) for n in t.trainable)  # the gradients of the fp32 weights that train

    def step_temporaries(t: Tensors) -> int:
        if prec.moments == "8bit" or not t.trainable:
            return 0
        if options.device == "cuda":  # foreach AdamW: sqrt of every second moment at once
            return sum(4 * n for n in t.trainable)
        return 2 * 4 * max(t.trainable)  # single-tensor AdamW: sqrt, then the division, of one tensor at a time

    def stored(g: int) -> int:
        t = tensors(g)
        return weights(t, False) + moments(t, False)

    shared = network.stem if not per_group_stem else Tensors()
    plans: list[GroupPlan] = []
    by_group: dict[int, GroupPlan] = {}
    for g in held:
        t = tensors(g)
        others = [h for h in held if h != g]
        resident_others = sum(steps(tensors(h)) for h in others)  # step scalars are never offloaded
        if options.offload == "none":
            resident_others += sum(stored(h) for h in others)
        every = (
            None
            if options.checkpointing is None
            else 1
            if options.checkpointing == "every"
            else int(options.checkpointing)
        )
        activations = checkpointed_activation_bytes(
            [network.blocks[i].saved.at(options.batch_size) for i in options.groups[g]],
            [network.blocks[i].inputs.at(options.batch_size) for i in options.groups[g]],
            every,
            before=network.stem_saved.at(options.batch_size),
        )
        params, opt, grad = weights(t, True), moments(t, True), grads(t) + grads(shared)
        temporaries = step_temporaries(t + shared)
        prefetch = max((stored(h) for h in others), default=0) if options.offload == "cpu" and options.prefetch else 0
        # backward starts with every saved tensor alive and materialises the gradients of the last block's
        # activations (about as many bytes as it saved); the optimizer's temporaries or an arriving group come later
        backward = max((network.blocks[i].saved.at(options.batch_size) for i in options.groups[g]), default=0)
        step_extra = max(activations + backward, temporaries, prefetch) - activations
        resident = network.buffers + weights(shared, True) + moments(shared, True) + resident_others
        device = resident + params + opt + grad + activations + step_extra
        offloaded = stored(g) if options.offload != "none" else 0
        plan = GroupPlan(
            group=g,
            layers=len(options.groups[g]),
            params=params,
            grads=grad,
            optimizer=opt,
            activations=activations,
            step_extra=step_extra,
            resident=resident,
            device=device,
            host=offloaded if options.offload == "cpu" else 0,
            disk=offloaded if options.offload == "disk" else 0,
        )
        by_group[g] = plan
        if g in trained:
            plans.append(plan)
    return MemoryPlan(options, plans, [by_group[g] for g in held], baseline_device, baseline_host, limits or Limits())


def even_groups(num_layers: int, num_blocks: int) -> tuple[tuple[int, ...], ...]:
    """The layers of each of ``num_blocks`` groups in an even split (the module's default)."""
    return tuple(tuple(g) for g in split_layers(num_layers, num_blocks))


@dataclass(frozen=True)
class Suggestion:
    """An option that would make a refused plan fit, and the plan recomputed with it."""

    option: str
    plan: MemoryPlan


def fitting_options(
    network: NetworkCost,
    plan: MemoryPlan,
    can_offload: Sequence[OffloadTarget] = ("disk",),
) -> tuple[list[Suggestion], MemoryPlan | None]:
    """The single changes that make ``plan`` fit, each recomputed: the smallest larger B (even split), 8-bit moments,
    bf16 weights, checkpointing every block, an offload target from ``can_offload``; and all of them together (the
    second value, None when the plan fits already or nothing changes)."""
    opts = plan.options

    def again(options: PlanOptions) -> MemoryPlan:
        return plan_memory(network, options, plan.baseline_device, plan.baseline_host, plan.limits)

    def blocks_changed(b: int) -> PlanOptions:
        # every group of the new cut is held and trained (block parallel's own groups do not carry over)
        return replace(opts, groups=even_groups(len(network.blocks), b), held=None, trained=None)

    found: list[Suggestion] = []
    changes: list[tuple[str, PlanOptions]] = []
    for b in range(opts.num_blocks + 1, len(network.blocks) + 1):
        candidate = again(blocks_changed(b))
        if candidate.fits:
            found.append(Suggestion(f"num_blocks={b}", candidate))
            break
    prec = opts.precision
    if prec.moments != "8bit":
        changes.append(
            ("state_precision=StatePrecision(moments='8bit')", replace(opts, precision=replace(prec, moments="8bit")))
        )
    if prec.weights != "bf16":
        changes.append(
            ("state_precision=StatePrecision(weights='bf16')", replace(opts, precision=replace(prec, weights="bf16")))
        )
    if opts.checkpointing != "every":
        changes.append(("activation_checkpointing='every'", replace(opts, checkpointing="every")))
    for target in can_offload:
        if target != opts.offload:
            changes.append(
                (f"BlockOffload(target={target!r})", replace(opts, offload=target, prefetch=target == "cpu"))
            )
    for option, changed in changes:
        candidate = again(changed)
        if candidate.fits:
            found.append(Suggestion(option, candidate))
    if plan.fits:
        return found, None
    everything = replace(
        opts,
        precision=replace(prec, moments="8bit", weights="bf16"),
        checkpointing="every",
        offload=can_offload[-1] if can_offload else opts.offload,
    )
    combined = again(everything)
    return found, combined if combined.fits else None


def refusal(plan: MemoryPlan, suggestions: Sequence[Suggestion], combined: MemoryPlan | None) -> str:
    """The message of a refused plan: what does not fit, and each option that would (with its recomputed peak)."""
    text = "The memory plan does not fit: " + "; ".join(plan.problems()) + "."
    if suggestions:
        named = []
        for s in suggestions:
            where = f"{s.option} (device peak {_mib(s.plan.device_peak)} MiB"
            if s.plan.options.device != "cpu":
                where += f", host {_mib(s.plan.host_total)} MiB"
            if s.plan.options.offload == "disk":
                where += f", disk {_mib(s.plan.disk_total)} MiB"
            named.append(where + ")")
        text += " Each of these would make it fit: " + "; ".join(named) + "."
    elif combined is not None:
        text += (
            " No single option makes it fit; together state_precision=StatePrecision(weights='bf16', moments='8bit'),"
            f" activation_checkpointing='every' and offload={combined.options.offload!r} would (device peak"
            f" {_mib(combined.device_peak)} MiB)."
        )
    else:
        text += " No option of the package makes it fit on this machine: use a smaller model or batch."
    text += (
        " num_blocks, state_precision and activation_checkpointing are DiffusionBlocksModule(...) options, BlockOffload"
        " a callback. To train anyway give the strategy memory_plan='print' (or explicit memory_limits={...})."
    )
    return text


# ---------------------------------------------------------------------------------------------------- the runtime part
class _ProbeMeter(SavedTensorMeter):
    """A :class:`SavedTensorMeter` for a forward that is never followed by a backward.

    Autograd keeps what the pack hook returns; the tensor itself would make a reference cycle through its own graph
    (a saved output refers to its ``grad_fn``, which holds it) that Python cannot collect, and the forward's graph,
    parameters included, would outlive the probe. Only the storage is kept (so a freed address is never counted
    twice), and it is released with the meter.
    """

    def __init__(self, exclude: Iterable[Tensor] = ()) -> None:
        super().__init__(exclude)
        self.kept: list[Any] = []

    def _pack(self, t: Tensor) -> Any:
        super()._pack(t)
        self.kept.append(t.untyped_storage())
        return None

    @staticmethod
    def _unpack(_: Any) -> Tensor:
        raise RuntimeError("The memory plan's probe runs no backward pass.")

    def __enter__(self) -> _ProbeMeter:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self


def _storage_bytes(args: Sequence[Any]) -> int:
    first = next((a for a in args if isinstance(a, Tensor)), None)
    return 0 if first is None else first.numel() * first.element_size()


@contextmanager
def _block_meters(
    module: DiffusionBlocksModule, meter: SavedTensorMeter, into: dict[int, dict[str, int]]
) -> Iterator[None]:
    """Record, per block of the stack, the bytes ``meter`` counted during its forward and the bytes of its input."""
    handles = []
    modules = list(module.network.stack._modules.values())
    for i, block in enumerate(modules):

        def before(_: nn.Module, args: tuple[Any, ...], i: int = i) -> None:
            into.setdefault(i, {})["start"] = meter.bytes
            into[i]["inputs"] = _storage_bytes(args)

        def after(_: nn.Module, args: tuple[Any, ...], output: Any, i: int = i) -> None:
            into[i]["saved"] = meter.bytes - into[i]["start"]

        handles.append(block.register_forward_pre_hook(before))
        handles.append(block.register_forward_hook(after))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def slice_batch(batch: Any, n: int, total: int) -> Any:
    """The first ``n`` samples of ``batch``: every tensor and list whose first dimension is ``total``, at any depth."""
    if isinstance(batch, Tensor):
        return batch[:n] if batch.dim() and batch.shape[0] == total else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: slice_batch(v, n, total) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(v, n, total) for v in batch))
    if isinstance(batch, (list, tuple)):
        if len(batch) == total and not any(isinstance(v, Tensor) for v in batch):
            return type(batch)(batch[:n])
        return type(batch)(slice_batch(v, n, total) for v in batch)
    return batch


def sample_batch(loader: Any) -> tuple[Any, int] | None:
    """Up to two samples of ``loader``'s data, collated as it collates them, and its batch size; None if unknown.

    The samples are read from the data set itself (its first items), never through the loader's sampler or an
    iterator of the loader, so the run's data order and a resumable loader's state are untouched.
    """
    dataset = getattr(loader, "dataset", None)
    collate = getattr(loader, "collate_fn", None) or default_collate
    size = getattr(loader, "batch_size", None) or getattr(getattr(loader, "batch_sampler", None), "batch_size", None)
    if dataset is None:
        return None
    if isinstance(dataset, IterableDataset):
        items = iter(dataset)
        if size is None:  # the data set yields whole batches
            return next(items, None), 0
        samples = [s for _, s in zip(range(PROBE_SAMPLES), items)]
    elif hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        if size is None:
            return None
        samples = [dataset[i] for i in range(min(PROBE_SAMPLES, len(dataset)))]
    else:
        return None
    return (collate(samples), int(size)) if samples else None


def probe_activations(
    module: DiffusionBlocksModule,
    batch: Any,
    groups: Sequence[int],
    to_device: Callable[[Any], Any] = lambda b: b,
    context: Callable[[], Any] = torch.enable_grad,
) -> tuple[dict[int, Activation], dict[int, Activation], Activation]:
    """Bytes saved for backward by each block and outside the blocks in the task's loss of each group in
    ``groups``, on one and on two samples of ``batch`` (no backward; the graph is freed at once), as lines in the
    batch size. Returns (saved per block, input per block, outside the blocks: the largest over the groups).

    The random state and the module's buffers (e.g. batch-norm statistics) are restored afterwards, so a run with
    the plan trains exactly as one without.
    """
    task, network = module.task, module.network
    total = task.batch_size(batch)
    sizes = sorted({min(n, total) for n in (1, PROBE_SAMPLES)})
    saved: dict[int, dict[int, int]] = {}
    inputs: dict[int, dict[int, int]] = {}
    outside: dict[int, int] = {}
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [module.device] if module.device.type == "cuda" else []
    # every block measured as it runs plainly: under activation checkpointing a block saves only its inputs, and what
    # it recomputes at backward is the plan's to add (memory.checkpointed_activation_bytes)
    every, network.checkpoint_every = getattr(network, "checkpoint_every", None), None
    with torch.random.fork_rng(devices=devices):
        try:
            for n in sizes:
                part = to_device(slice_batch(batch, n, total))
                if task.batch_size(part) != n:
                    raise ValueError(f"the batch could not be cut to {n} sample(s)")
                for g in groups:
                    meter = _ProbeMeter(exclude=module.parameters())
                    per_block: dict[int, dict[str, int]] = {}
                    with context(), _block_meters(module, meter, per_block), meter:
                        gen = torch.Generator(device=module.device).manual_seed(0)
                        lo, hi = module.sigma_range(g)  # a level inside the group's range; what it saves does not
                        sigma = torch.full((n,), (lo + hi) / 2, device=module.device)  # depend on which
                        loss = task.loss(partial(network, group=g), part, sigma, gen)
                    del loss
                    meter.kept.clear()
                    for i, rec in per_block.items():
                        saved.setdefault(i, {})[n] = rec.get("saved", 0)
                        inputs.setdefault(i, {})[n] = rec.get("inputs", 0)
                    outside[n] = max(
                        outside.get(n, 0), meter.bytes - sum(r.get("saved", 0) for r in per_block.values())
                    )
        finally:
            network.checkpoint_every = every
            with torch.no_grad():
                for b, copy in buffers:
                    b.copy_(copy)
    return (
        {i: Activation.fit(v) for i, v in saved.items()},
        {i: Activation.fit(v) for i, v in inputs.items()},
        Activation.fit(outside) if outside else Activation(),
    )


def measure_network(
    module: DiffusionBlocksModule,
    saved: Mapping[int, Activation] | None = None,
    inputs: Mapping[int, Activation] | None = None,
    outside: Activation | None = None,
) -> NetworkCost:
    """The module's :class:`NetworkCost`: parameter sizes per block and of the stem, buffers, and the activations
    measured by :func:`probe_activations` (zero where not given)."""
    network = module.network
    blocks = []
    for i, block in enumerate(network.stack._modules.values()):
        blocks.append(
            BlockCost(
                Tensors.of(list(block.parameters())),
                (saved or {}).get(i, Activation()),
                (inputs or {}).get(i, Activation()),
            )
        )
    buffers = sum(b.numel() * b.element_size() for b in module.buffers())
    return NetworkCost(
        tuple(blocks),
        Tensors.of(network.stem_parameters(0)),
        outside or Activation(),
        network.stem_mode,
        module.ema_network is not None,
        buffers,
    )


def module_tensor_bytes(module: nn.Module, device_type: str) -> int:
    """Bytes of the module's parameters and buffers on devices of ``device_type`` (each storage once)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type == device_type and t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
    return total


def resident_bytes() -> int:
    """The process's current resident set size (``VmRSS``); its peak where the current size is not available."""
    now = proc_kib_field("/proc/self/status", "VmRSS")
    return now if now is not None else peak_rss_bytes()


def available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (None where there is none)."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


def baselines(module: nn.Module, device: torch.device, optimizer_bytes: int = 0) -> tuple[int, int]:
    """(device, host) bytes the process holds besides the model and its optimizer state.

    CPU: the resident size now minus the module's tensors and the optimizer state (host: 0, it is the same memory).
    CUDA: allocated bytes minus the module's tensors there; the host baseline is the resident size minus the module's
    tensors still in host memory.
    """
    rss = resident_bytes()
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        return max(0, allocated - module_tensor_bytes(module, "cuda") - optimizer_bytes), max(
            0, rss - module_tensor_bytes(module, "cpu")
        )
    return max(0, rss - module_tensor_bytes(module, "cpu") - optimizer_bytes), 0


def capacities(device: torch.device, offload_directory: str | os.PathLike | None) -> Limits:
    """What this machine offers: CUDA free memory plus what torch already holds there; host ``MemAvailable`` plus
    what the process holds (on the CPU that is also the device); free disk where the offload folder is."""
    rss = resident_bytes()
    available = available_bytes()
    host = None if available is None else available + rss
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        dev: int | None = int(free) + torch.cuda.memory_reserved(device)
    else:
        dev = host
    disk = None
    if offload_directory is not None:
        try:
            disk = shutil.disk_usage(Path(offload_directory)).free
        except OSError:
            disk = None
    return Limits(dev, host, disk)


@dataclass(frozen=True)
class Placement:
    """Where an offloading callback keeps inactive groups: ``target`` ("cpu" pinned host memory or "disk"), whether
    it prefetches the next group onto the device, and the folder of its files."""

    target: OffloadTarget = "none"
    prefetch: bool = False
    directory: str | os.PathLike | None = None


LIMIT_KEYS = ("device", "host", "disk")


def check_plan_options(mode: str, limits: Mapping[str, int] | None) -> None:
    """Refuse a ``memory_plan`` mode or ``memory_limits`` the strategy cannot use, naming the accepted values."""
    if mode not in ("check", "print", "off"):
        raise ValueError(f"memory_plan must be 'check', 'print' or 'off', got {mode!r}.")
    if limits is None:
        return
    if not isinstance(limits, Mapping) or set(limits) - set(LIMIT_KEYS):
        raise ValueError(
            f"memory_limits must be a dict with keys among {list(LIMIT_KEYS)} (bytes), e.g."
            f" memory_limits={{'device': 16 * 2**30, 'host': 64 * 2**30}}; got {limits!r}."
        )
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"memory_limits[{key!r}] must be a positive number of bytes, got {value!r}.")


def train_loader(trainer: Any) -> Any:
    """The training data loader the fit will use, without iterating it (None when it cannot be had)."""
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is None or not source.is_defined():
        return None
    return source.dataloader()


def plan_for_fit(
    module: DiffusionBlocksModule,
    trainer: Any,
    placement: Placement,
    held: Sequence[int] | None,
    trained: Sequence[int] | None,
    given: Mapping[str, int] | None,
    to_device: Callable[[Any], Any],
    context: Callable[[], Any],
) -> tuple[MemoryPlan, NetworkCost]:
    """The plan of the fit about to start: the module's tensors, activations probed on two samples of the training
    data (scaled to its batch size), the module's options, the offload ``placement``, the process's baselines and
    the machine's capacities (``given`` limits replace them)."""
    device = module.device
    groups = tuple(tuple(g) for g in module.network.groups)
    probe_groups = list(trained) if trained is not None else list(held if held is not None else range(len(groups)))
    note = ""
    saved = inputs = None
    outside = None
    batch_size = 0
    try:
        loader = train_loader(trainer)
        sample = sample_batch(loader) if loader is not None else None
        if sample is None:
            raise ValueError("the training data set's samples and batch size could not be read")
        batch, batch_size = sample
        batch_size = batch_size or module.task.batch_size(batch)
        saved, inputs, outside = probe_activations(module, batch, probe_groups, to_device, context)
        note = (
            f"activations: saved tensors of each group's loss on 1 and {PROBE_SAMPLES} samples, scaled to the batch"
            f" of {batch_size}"
        )
    except Exception as err:  # noqa: BLE001 - the plan must never stop a run it cannot estimate
        note = f"activations not estimated ({type(err).__name__}: {err}): the device figures leave them out"
    network = measure_network(module, saved, inputs, outside)
    opt_bytes = sum(
        t.numel() * t.element_size()
        for opt in trainer.optimizers
        for state in opt.state.values()
        for t in state.values()
        if isinstance(t, Tensor)
    )
    base_device, base_host = baselines(module, device, opt_bytes)
    limits = capacities(device, placement.directory)
    for key, value in (given or {}).items():
        setattr(limits, key, value)
    raw_checkpointing = module.hparams.get("activation_checkpointing")
    options = PlanOptions(
        groups=groups,
        batch_size=batch_size,
        precision=StatePrecision.of(module.hparams.get("state_precision")),
        checkpointing=raw_checkpointing,
        offload=placement.target,
        prefetch=placement.prefetch,
        device="cuda" if device.type == "cuda" else "cpu",
        held=None if held is None else tuple(held),
        trained=None if trained is None else tuple(trained),
    )
    plan = plan_memory(network, options, base_device, base_host, limits)
    plan.activation_note, plan.activations_estimated = note, saved is not None
    return plan, network
