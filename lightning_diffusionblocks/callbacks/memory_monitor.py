"""`BlockMemoryMonitor`: per-group memory peaks, logged to every logger and printed as a table at the end.

With several processes each measures the groups it trains; the figures are gathered so rank 0's loggers and table
show every group (each figure the largest any process measured: a process's peak is what must fit its device).
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_diffusionblocks.dashboard import is_logging_row, log_metrics
from lightning_diffusionblocks.memory import (
    GroupMemory,
    SavedTensorMeter,
    gradient_bytes,
    optimizer_bytes,
    parameter_bytes,
    peak_rss_bytes,
    reset_peak_rss,
)
from lightning_diffusionblocks.planning import GroupPlanning

__all__ = ["BlockMemoryMonitor", "GroupMemory", "current_group", "group_names", "merge_across_processes"]

MIB = 2**20


def merge_across_processes(
    trainer: pl.Trainer, memory: dict[str, GroupMemory], names: list[str]
) -> dict[str, GroupMemory]:
    """Every process's figures for the groups ``names``: each field the largest any process measured, for the groups
    some process measured. Called on every process together (one gather); ``names`` must be the same on each."""
    if trainer.world_size <= 1:
        return memory
    keys = [f.name for f in fields(GroupMemory)]
    table = torch.zeros(len(names), 1 + len(keys), dtype=torch.float64)  # measured?, then each field
    for i, name in enumerate(names):
        m = memory.get(name)
        if m is not None:
            table[i] = torch.tensor([1.0, *(float(getattr(m, k)) for k in keys)], dtype=torch.float64)
    gathered = trainer.strategy.all_gather(table.to(trainer.strategy.root_device))
    merged = gathered.reshape(-1, len(names), 1 + len(keys)).amax(dim=0).cpu()
    return {
        name: GroupMemory(**{k: v if k == "step_time" else int(v) for k, v in zip(keys, row[1:].tolist())})
        for name, row in zip(names, merged)
        if row[0] > 0
    }


def group_names(pl_module: pl.LightningModule) -> list[str]:
    """Every row a monitor can report for ``pl_module``: its groups, and ``all`` (end to end)."""
    return [*(str(g) for g in range(int(getattr(pl_module, "num_blocks", 0)))), "all"]


def current_group(trainer: pl.Trainer) -> str:
    """The row the current training step's figures belong to: the group the strategy trains now, else ``all``."""
    strategy = trainer.strategy
    if isinstance(strategy, GroupPlanning) and strategy.schedule is not None:
        return str(strategy.select_group(trainer.global_step))
    return "all"


class BlockMemoryMonitor(Callback):
    """Measures, for every training step, what the compute device holds and the process's peak.

    Exact accounting (any device): parameters, gradients and optimizer state resident on the compute
    device, and the bytes autograd saved for backward. Peaks: on CUDA ``max_memory_allocated`` (reset
    at each step, so each group's peak is its own); on the CPU the process's peak RSS (reset at each
    step on Linux). The activation term is what the graph holds at most: with activation checkpointing, the
    checkpointed blocks' inputs and the largest one's recomputation (measured while its forward runs) instead of
    their activations. Each group's step time (forward, backward and optimizer step, mean seconds) is kept beside
    its peaks. On every logging row (``log_every_n_steps``) each group that trained since the previous row is
    logged as ``memory/group_{k}/<kind>_mib`` and ``memory/group_{k}/step_time_s``, the peak (the mean time) over
    those steps (a group that did not train has no point
    there, rather than a repeated one); ``groups`` keeps each group's peak over all its steps, printed as a table at
    the end of fit and added to the per-group table the module logs. With several processes (data or block
    parallel) both are gathered from every process, so rank 0 reports every group.

    Args:
        log: send the figures to the loggers; with ``False`` they are only kept (``groups``, ``last``) and printed.
    """

    def __init__(self, log: bool = True) -> None:
        # not ``self.log``: Lightning binds every callback's ``log`` to the module's ``log`` when fit starts
        self.log_to_loggers = log
        self.groups: dict[str, GroupMemory] = {}
        #: each group's measurement at its most recent step on this process
        self.last: dict[str, GroupMemory] = {}
        self._since_row: dict[str, GroupMemory] = {}  # peaks of the groups trained since the last logging row
        self._meter: SavedTensorMeter | None = None
        self._step = GroupMemory()
        self._group = "all"
        self._started = 0.0

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._group = current_group(trainer)
        self._step = GroupMemory()
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            reset_peak_rss()
        self._meter = SavedTensorMeter(exclude=pl_module.parameters)  # read when the step saves its first tensor
        self._meter.__enter__()
        self._started = time.perf_counter()

    def _close_meter(self) -> None:
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._step.activations = self._meter.held
            self._meter = None

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._close_meter()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._step.grads = gradient_bytes(pl_module.parameters(), trainer.strategy.root_device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close_meter()
        device = trainer.strategy.root_device
        step = self._step
        step.step_time = time.perf_counter() - self._started
        step.params = parameter_bytes(pl_module.parameters(), device)
        step.optimizer = sum(optimizer_bytes(opt, device) for opt in trainer.optimizers)
        step.total = step.params + step.grads + step.optimizer + step.activations
        if device.type == "cuda":
            step.cuda_peak = torch.cuda.max_memory_allocated(device)
        else:
            step.peak_rss = peak_rss_bytes()
        self.groups.setdefault(self._group, GroupMemory()).update(step)
        self.last[self._group] = step
        self._since_row.setdefault(self._group, GroupMemory()).update(step)
        if is_logging_row(trainer):  # decided from counters: every process agrees (the merge gathers)
            since_row, self._since_row = self._since_row, {}
            if self.log_to_loggers:
                since_row = merge_across_processes(trainer, since_row, group_names(pl_module))
                skip = {"steps", "step_time", "peak_rss" if device.type == "cuda" else "cuda_peak"}
                metrics = {
                    f"memory/group_{name}/{f.name}_mib": getattr(peak, f.name) / MIB
                    for name, peak in since_row.items()
                    for f in fields(peak)
                    if f.name not in skip
                }
                metrics.update({f"memory/group_{name}/step_time_s": p.step_time for name, p in since_row.items()})
                log_metrics(trainer, metrics)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # every process's groups, before the module's own on_train_end logs the per-group table
        self.groups = merge_across_processes(trainer, self.groups, group_names(pl_module))

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close_meter()

    def group_memory(self) -> dict[str, GroupMemory]:
        """Each group's peaks over all its steps (``groups``): what the module's per-group table shows
        (:class:`~lightning_diffusionblocks.dashboard.GroupMemoryReport`)."""
        return self.groups

    def table(self) -> str:
        """Per-group peaks as a fixed-width table (MiB)."""
        cuda = any(g.cuda_peak for g in self.groups.values())
        peak_name = "CUDA peak" if cuda else "peak RSS"
        header = ["group", "steps", "params", "grads", "optimizer", "activations", "total", peak_name, "step s"]
        rows = [header]
        for name in sorted(self.groups, key=lambda k: (k == "all", k.zfill(4))):
            g = self.groups[name]
            peak = g.cuda_peak if cuda else g.peak_rss
            values = (g.params, g.grads, g.optimizer, g.activations, g.total, peak)
            rows.append([name, str(g.steps)] + [f"{v / MIB:.2f}" for v in values] + [f"{g.step_time:.4f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "Per-group training memory (MiB, peak per step) and mean step time (s)\n" + "\n".join(lines)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.groups and trainer.is_global_zero:
            rank_zero_info(self.table())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {name: vars(g).copy() for name, g in self.groups.items()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.groups = {name: GroupMemory(**values) for name, values in state_dict.items()}
