"""What a block-wise run shows on any Lightning logger: per-group loss points, the run's partition as
hyper-parameters, tables, images and text.

Lightning's ``self.log`` suits one loss: it keeps each key's last value and writes every key on every logging
row (every ``log_every_n_steps`` batches). A group that did not train would repeat a stale value there, and the
steps between two rows would be lost. Per-group points are therefore written straight through each logger's
``log_metrics``, each at its own step, in the step numbering Lightning uses for its own rows
(``_batches_that_stepped``), so they line up with ``train/loss`` and the validation losses.

WandbLogger, TensorBoardLogger and CSVLogger each get what they display best (a ``wandb.Table``, TensorBoard
text, a CSV file); any other logger gets the metrics through ``log_metrics`` and the rest as files in its folder.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor

from lightning_diffusionblocks.memory import GroupMemory
from lightning_diffusionblocks.partition import BlockwiseNetwork
from lightning_diffusionblocks.records import is_plain, record_of
from lightning_diffusionblocks.schedules import Schedule

if TYPE_CHECKING:  # annotations only
    from lightning_diffusionblocks.tasks.base import Task

MIB = 2**20


# ---------------------------------------------------------------------- when and where Lightning logs
def logging_step(trainer: pl.Trainer) -> int:
    """The step Lightning gives the current training batch's logging row (0 for the first batch of a run)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def is_logging_row(trainer: pl.Trainer) -> bool:
    """True when Lightning writes a logging row for the current training batch (``log_every_n_steps``)."""
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def is_last_training_batch(trainer: pl.Trainer) -> bool:
    """True when the current batch ends training (``max_steps``, or the last batch of ``max_epochs``); decided from
    counters alone, so every process agrees. Other ends (``should_stop``, ``max_time``) are seen at ``on_train_end``."""
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.fit_loop.max_epochs
    epoch_ends = trainer.fit_loop.epoch_loop._num_ready_batches_reached()
    return epoch_ends and max_epochs is not None and max_epochs != -1 and trainer.current_epoch + 1 >= max_epochs


def logger_dir(logger: Logger, trainer: pl.Trainer) -> Path:
    """The folder where files for ``logger`` go: its ``log_dir``, else its ``save_dir``, else the Trainer's root."""
    for attr in ("log_dir", "save_dir"):
        value = getattr(logger, attr, None)
        if isinstance(value, (str, Path)) and "://" not in str(value):
            return Path(value)
    return Path(trainer.default_root_dir)


def show_in_progress_bar(trainer: pl.Trainer, key: str, text: str) -> None:
    """Show ``key: text`` in the progress bar until the next reset, without logging it (``self.log`` keeps only
    floats, which the Rich bar prints as ``2.000``)."""
    trainer._logger_connector._progress_bar_metrics[key] = text  # type: ignore[assignment]


def log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """``metrics`` through every logger at ``step`` (default the current batch's logging row), from rank 0."""
    if not metrics or not trainer.is_global_zero:
        return
    step = logging_step(trainer) if step is None else step
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


# ---------------------------------------------------------------------- per-group training loss
def check_group_loss_monitors(trainer: pl.Trainer) -> None:
    """Refuse a callback that monitors ``train/loss_group_{g}`` where processes train different groups (block
    parallel): each process has only its own groups' losses, and callbacks such as ``ModelCheckpoint`` and
    ``EarlyStopping`` decide together across processes, so the ones without the key would wait forever."""
    strategy = trainer.strategy
    if trainer.world_size <= 1 or getattr(strategy, "gradient_group_size", trainer.world_size) >= trainer.world_size:
        return
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        monitor = getattr(callback, "monitor", None)
        if isinstance(monitor, str) and monitor.startswith("train/loss_group_"):
            group = monitor.rsplit("_", 1)[-1]
            raise MisconfigurationException(
                f"{type(callback).__name__}(monitor={monitor!r}) cannot work under block parallel: each process trains"
                " its own groups, so that loss exists on one process only, while callbacks decide together across"
                f" processes. Monitor a loss every process has: monitor='val/loss_group_{group}' (with a validation"
                " loader) or monitor='train/loss'."
            )


class GroupLossLog:
    """Per-group training-loss points: one per step a group trained, none for the groups that did not.

    Each point holds ``train/loss_group_{g}`` and ``train/group_{g}/step`` (the group's own optimizer steps, this one
    included) at the global step (Lightning's row numbering). Points wait for Lightning's next logging row, or the end
    of training, and are then written each at its own step, so ``log_every_n_steps`` sets how often loggers are
    called, never which points exist. With several processes the points are gathered first (under block parallel each
    process trains its own group); processes training the same group at the same step are averaged.

    WandbLogger also gets ``train/group_{g}/loss`` with ``train/group_{g}/step`` as its x axis (``define_metric``);
    TensorBoardLogger gets ``train/group_{g}/loss`` on its step axis = the group's step. CSV and other loggers have
    both columns in each row.
    """

    #: weight of the newest step in the running loss shown in the progress bar (per group)
    RUNNING_LOSS_WEIGHT = 0.1

    def __init__(self, running: dict[int, Tensor] | None = None) -> None:
        self._rows: list[int] = []
        self._groups: list[int] = []
        self._values: list[Tensor] = []  # (group step, loss) of each point, left on the device until a flush
        self._defined: set[tuple[int, int]] = set()  # (id of a wandb run, group) with its group-step axis
        #: each group's running loss (the progress bar's ``loss_g``), carried from one fit to the next
        self.running: dict[int, Tensor] = {} if running is None else running

    def log_step(
        self, trainer: pl.Trainer, log: Callable[..., Any], group: int | None, group_steps: Tensor, loss: Tensor
    ) -> None:
        """Log one optimizer step: ``train/loss`` (every step's loss, whichever group) through the module's ``log``,
        and the group's own point (its step counter ``group_steps[group]``) through :meth:`add`, at this step only.

        Through ``log`` the loggers would get ``train/loss_group_{g}`` of every group on every logging row (inactive
        groups repeating a stale value) and lose the steps between rows, so the loggers' per-group points bypass it.
        Callbacks still see each group's latest loss: it goes through ``log`` with ``logger=False``, so
        ``trainer.callback_metrics`` (what ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read) holds
        ``train/loss_group_{g}`` of every group trained so far. The progress bar shows the active group (a string:
        Rich prints numbers as ``2.000``) and its running loss ``loss_g``.
        """
        loss = loss.detach()
        log("train/loss", loss, prog_bar=group is None)
        if group is None:
            return
        log(f"train/loss_group_{group}", loss, logger=False)
        running = self.running.get(group)
        running = loss.float() if running is None else torch.lerp(running, loss.float(), self.RUNNING_LOSS_WEIGHT)
        self.running[group] = running
        log("loss_g", running, prog_bar=True, logger=False)
        show_in_progress_bar(trainer, "group", str(group))
        self.add(trainer, group, group_steps[group], loss)

    def add(self, trainer: pl.Trainer, group: int, group_step: Tensor, loss: Tensor) -> None:
        """Record the loss of ``group`` at the current training batch; flush on Lightning's logging rows."""
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
        if not trainer.loggers or not every:
            return
        row = logging_step(trainer)
        self._rows.append(row)
        self._groups.append(group)
        self._values.append(torch.stack([group_step.detach().double().reshape(()), loss.detach().double().reshape(())]))
        # counters alone decide, identically on every process (the flush may gather); flushing on the last batch
        # keeps its points before the end-of-training rows (callbacks log there before the module's on_train_end)
        if (row + 1) % every == 0 or is_last_training_batch(trainer):
            self.flush(trainer)

    def flush(self, trainer: pl.Trainer) -> None:
        """Write the waiting points (called on every process: with several, they are gathered)."""
        if not self._rows:
            return
        device = self._values[0].device
        index = torch.tensor([self._rows, self._groups], dtype=torch.float64, device=device).T
        table = torch.cat([index, torch.stack(self._values)], dim=1)  # (n, 4): row, group, group step, loss
        self._rows, self._groups, self._values = [], [], []
        if trainer.world_size > 1:
            table = trainer.strategy.all_gather(table).reshape(-1, 4)
        if not trainer.is_global_zero:
            return
        points: dict[int, dict[int, list[tuple[float, float]]]] = {}
        for row, group, group_step, loss in table.tolist():
            points.setdefault(int(row), {}).setdefault(int(group), []).append((group_step, loss))
        for row in sorted(points):
            metrics: dict[str, float] = {}
            for group, values in sorted(points[row].items()):
                metrics[f"train/loss_group_{group}"] = sum(v for _, v in values) / len(values)
                metrics[f"train/group_{group}/step"] = float(max(s for s, _ in values))
            for logger in trainer.loggers:
                self._write(logger, metrics, row)

    def _write(self, logger: Logger, metrics: dict[str, float], row: int) -> None:
        groups = [int(k.split("_")[-1]) for k in metrics if k.startswith("train/loss_group_")]
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            extra = {}
            for g in groups:
                if (id(run), g) not in self._defined and callable(getattr(run, "define_metric", None)):
                    run.define_metric(f"train/group_{g}/loss", step_metric=f"train/group_{g}/step")
                    self._defined.add((id(run), g))
                extra[f"train/group_{g}/loss"] = metrics[f"train/loss_group_{g}"]
            logger.log_metrics({**metrics, **extra}, step=row)
            return
        logger.log_metrics(metrics, step=row)
        if isinstance(logger, TensorBoardLogger):
            for g in groups:
                step = int(metrics[f"train/group_{g}/step"])
                logger.log_metrics({f"train/group_{g}/loss": metrics[f"train/loss_group_{g}"]}, step=step)


# ---------------------------------------------------------------------- the run's configuration
class DescribedModule(Protocol):
    """What the configuration and the per-group table read of the module they describe. ``DiffusionBlocksModule``
    has all of it; it is named here because the module imports this file, so this file imports no module."""

    @property
    def network(self) -> BlockwiseNetwork: ...
    @property
    def task(self) -> Task: ...
    @property
    def hparams(self) -> Mapping[str, Any]: ...
    @property
    def num_blocks(self) -> int: ...
    @property
    def blockwise(self) -> bool: ...
    @property
    def boundaries(self) -> Tensor: ...
    @property
    def ranges(self) -> Sequence[tuple[float, float]]: ...
    @property
    def group_steps(self) -> Tensor: ...
    @property
    def step_count(self) -> Tensor: ...
    @property
    def _schedule(self) -> Schedule | None: ...
    def nominal_range(self, group: int) -> tuple[float, float]: ...


def run_config(module: DescribedModule) -> dict[str, Any]:
    """The partition, σ ranges, schedule, task and network of ``module`` as plain data (for ``log_hyperparams``)."""
    network, task, hp = module.network, module.task, module.hparams
    per_group = [_count(network.group_parameters(g)) for g in range(module.num_blocks)]
    shared = _count(network.shared_parameters())
    schedule = module._schedule
    task_record = record_of(task) or {}
    net_record = record_of(network.net) or {}
    return {
        "num_blocks": module.num_blocks,
        "group_sizes": [len(g) for g in network.groups],
        "group_layers": [list(g) for g in network.groups],
        "stem": network.stem_mode,
        "block_path": network.block_path,
        "partition": hp["partition"],
        "gamma": hp["gamma"],
        "boundaries": [float(b) for b in module.boundaries.tolist()],
        "sigma_ranges": [[float(lo), float(hi)] for lo, hi in module.ranges],
        "nominal_sigma_ranges": [list(module.nominal_range(g)) for g in range(module.num_blocks)],
        "schedule": schedule.config() if schedule is not None else {"name": "end_to_end"},
        "trained_blockwise": module.blockwise,
        "task": {
            "class": type(task).__name__,
            "class_path": task_record.get("class_path"),
            "init_args": _plain_or_none(task_record.get("init_args")),
            "noise": type(task.noise).__name__,
            "sigma_min": float(task.noise.sigma_min),
            "sigma_max": float(task.noise.sigma_max),
        },
        "network": {
            "class": type(network.net).__name__,
            "class_path": net_record.get("class_path"),
            "init_args": _plain_or_none(net_record.get("init_args")),
            "parameters": _count(network.parameters()),
            "parameters_per_group": per_group,
            "shared_parameters": shared,
        },
    }


def log_run_config(trainer: pl.Trainer, module: DescribedModule) -> None:
    """``run_config`` under the key ``diffusionblocks`` in every logger's hyper-parameters (wandb: the run config)."""
    if not trainer.loggers or not trainer.is_global_zero:
        return
    config = {"diffusionblocks": run_config(module)}
    for logger in trainer.loggers:
        logger.log_hyperparams(config)


def _count(params: Any) -> int:
    return sum(p.numel() for p in params)


def _plain_or_none(value: Any) -> Any:
    return value if is_plain(value) else None


# ---------------------------------------------------------------------- the per-group table
MEMORY_COLUMNS = ("params", "grads", "optimizer", "activations", "total")


@runtime_checkable
class GroupMemoryReport(Protocol):
    """A callback that measures each group's training memory (``BlockMemoryMonitor`` is one). The per-group table
    finds it among ``trainer.callbacks`` by this method, so the dashboard, below the callbacks, imports none."""

    def group_memory(self) -> Mapping[str, GroupMemory]:
        """Each group's peak figures over the fit, by row name (``"0"``, ``"1"``, …, or ``"all"`` end to end)."""
        ...


def group_table(
    module: DescribedModule, memory: Mapping[str, GroupMemory] | None = None
) -> tuple[list[str], list[list[Any]]]:
    """One row per group (one row ``all`` for an end-to-end model): its layers, σ ranges, steps, parameters and,
    when ``memory`` (:meth:`GroupMemoryReport.group_memory`) is given, its peak training memory in MiB and its mean
    step time in seconds (activation checkpointing trades one for the other)."""
    columns = ["group", "layers", "sigma_min", "sigma_max", "nominal_sigma_min", "nominal_sigma_max", "steps"]
    columns.append("parameters")
    rows: list[list[Any]] = []
    if module.blockwise:
        for g in range(module.num_blocks):
            lo, hi = module.ranges[g]
            nominal = module.nominal_range(g)
            layers = ",".join(str(i) for i in module.network.groups[g])
            params = _count(module.network.group_parameters(g)) + _count(module.network.shared_parameters())
            rows.append([str(g), layers, lo, hi, *nominal, int(module.group_steps[g]), params])
    else:
        noise = module.task.noise
        lo, hi = float(noise.sigma_min), float(noise.sigma_max)
        layers = ",".join(str(i) for g in module.network.groups for i in g)
        params = _count(module.network.parameters())
        rows.append(["all", layers, lo, hi, lo, hi, int(module.step_count), params])
    if memory:
        cuda = any(m.cuda_peak for m in memory.values())
        peak = "cuda_peak" if cuda else "peak_rss"
        columns += [f"{name}_mib" for name in (*MEMORY_COLUMNS, peak)]
        for row in rows:
            m = memory.get(row[0])
            values = [getattr(m, name) if m is not None else None for name in (*MEMORY_COLUMNS, peak)]
            row += [round(v / MIB, 3) if v is not None else None for v in values]
            row.append(round(m.step_time, 6) if m is not None else None)
        columns.append("step_time_s")
    return columns, rows


def log_group_summary(trainer: pl.Trainer, module: DescribedModule) -> list[Path]:
    """The per-group table (:func:`group_table`, with the peaks of a :class:`GroupMemoryReport` callback such as
    ``BlockMemoryMonitor`` when one is attached) through every logger under ``diffusionblocks/groups``; returns the
    files written."""
    if not trainer.loggers or not trainer.is_global_zero:
        return []
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    report = next((cb for cb in callbacks if isinstance(cb, GroupMemoryReport)), None)
    columns, rows = group_table(module, report.group_memory() if report is not None else None)
    return log_table(trainer, "diffusionblocks/groups", columns, rows)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-style markdown table (TensorBoard's text tab renders it)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------- tables, images and text for each logger
def _file(logger: Logger, trainer: pl.Trainer, name: str) -> Path:
    path = logger_dir(logger, trainer) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def log_table(
    trainer: pl.Trainer,
    key: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    step: int | None = None,
    name: str | None = None,
    directory: Path | None = None,
) -> list[Path]:
    """A table through every logger: a ``wandb.Table``, TensorBoard markdown text, or a CSV file (CSVLogger) /
    markdown file (other loggers) called ``name`` (default: ``key``) in the logger's folder, or a CSV file in
    ``directory`` when there is no logger. Returns the files written."""
    if not trainer.is_global_zero:
        return []
    step = logging_step(trainer) if step is None else step
    name = key.replace("/", "_") if name is None else name
    written = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_table(key=key, columns=list(columns), data=[list(r) for r in rows], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, markdown_table(columns, rows), global_step=step)
        elif isinstance(logger, CSVLogger):
            written.append(write_csv(_file(logger, trainer, f"{name}.csv"), columns, rows))
        else:
            path = _file(logger, trainer, f"{name}.md")
            path.write_text(markdown_table(columns, rows) + "\n")
            written.append(path)
    if not trainer.loggers and directory is not None:
        written.append(write_csv(directory / f"{Path(name).name}.csv", columns, rows))
    return written


def log_image(
    trainer: pl.Trainer,
    key: str,
    image: np.ndarray,
    caption: str,
    step: int | None = None,
    directory: Path | None = None,
) -> list[Path]:
    """A uint8 image ((H, W) or (H, W, C)) through every logger: ``WandbLogger.log_image``, TensorBoard
    ``add_image``, else a PNG in the logger's folder (or in ``directory`` when there is no logger)."""
    if not trainer.is_global_zero:
        return []
    step = logging_step(trainer) if step is None else step
    name = f"{key.replace('/', '_')}_step{step}.png"
    written = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step, caption=[caption])
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=step, dataformats="HW" if image.ndim == 2 else "HWC")
        else:
            written.append(_save_png(image, _file(logger, trainer, f"samples/{name}")))
    if not trainer.loggers and directory is not None:
        written.append(_save_png(image, directory / name))
    return written


def log_text(
    trainer: pl.Trainer, key: str, lines: Sequence[str], step: int | None = None, directory: Path | None = None
) -> list[Path]:
    """Lines of text through every logger: a one-column ``wandb.Table``, TensorBoard text, else a ``.txt`` file in
    the logger's folder (or in ``directory`` when there is no logger)."""
    if not trainer.is_global_zero:
        return []
    step = logging_step(trainer) if step is None else step
    name = f"{key.replace('/', '_')}_step{step}.txt"
    written = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_text(key=key, columns=["text"], data=[[line] for line in lines], step=step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text(key, "\n".join(f"    {line}" for line in lines), global_step=step)  # code block
        else:
            path = _file(logger, trainer, f"samples/{name}")
            path.write_text("\n".join(lines) + "\n")
            written.append(path)
    if not trainer.loggers and directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text("\n".join(lines) + "\n")
        written.append(directory / name)
    return written


def _save_png(image: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
