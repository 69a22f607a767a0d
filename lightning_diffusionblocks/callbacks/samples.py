"""`SampleLogger`: what the model does now (samples, generated text, a confusion matrix), shown on every logger.

The callback knows no task: it asks the module's task for a :class:`~lightning_diffusionblocks.previews.Preview`
(:meth:`Task.preview`) and renders whichever parts it holds: images as a grid, token ids as decoded lines, a table,
scalars as metrics.
A model trained on latents has its samples decoded first (``decode_latents``), and ``fid`` scores samples at each
validation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor
from typing_extensions import override

from lightning_diffusionblocks.callbacks.fid import FID
from lightning_diffusionblocks.dashboard import log_image, log_metrics, log_table, log_text, logging_step
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.previews import Preview
from lightning_diffusionblocks.visualize import image_grid

Decode = Callable[[list[int]], str]
DecodeLatents = Callable[[Tensor], Tensor]


class SampleLogger(Callback):
    """Every ``every_n_steps`` optimizer steps, and when training ends, log the task's preview of the model.

    What is shown is the task's choice (:meth:`Task.preview`): a class-conditional sample grid for image generation
    (``ImageGeneration``, ``FlowMatching``, ``DDPM``), generated lines for language models (``MaskedLM``,
    ``AutoregressiveLM``: continuations of prompts taken from the data), a confusion matrix and the accuracy after each
    σ step for ``Classification``. Images go to ``WandbLogger.log_image`` / TensorBoard ``add_image``, text to
    ``log_text`` / ``add_text``, tables to a ``wandb.Table`` / TensorBoard text; loggers that take none of these (CSV,
    others) get PNG, text and CSV files under ``samples/`` in their folder, and a run without a logger gets them in
    ``dirpath``. Keys start with ``key`` (``samples/images``, ``samples/text``, ``samples/table``,
    ``samples/<scalar>``), at the logging step of the batch that triggered them.

    Args:
        every_n_steps: optimizer steps between previews (0: only at the end of training).
        batch: the data a preview draws on (class labels, prompts, inputs to classify); default the first training
            batch of the fit. The same batch and the same noise are used every time, so previews are comparable.
        decode: token ids → text for language models; default the datamodule's ``tokenizer.decode`` if it has one,
            else the ids themselves.
        dirpath: where files go when the Trainer has no logger (default ``<default_root_dir>/samples``).
        key: prefix of the logged keys.
        at_end: also preview when training ends.
        decode_latents: for a model trained on latents, latents → images applied to the preview's images before
            they are shown (and scored): a :class:`~lightning_diffusionblocks.latents.LatentSpace` (its
            ``value_range`` is the images' range) or any callable (images in ``image_range``).
        image_range: the range of images a plain ``decode_latents`` callable returns.
        fid: an :class:`~lightning_diffusionblocks.callbacks.fid.FID` scored at the end of each validation (not
            the sanity check) on a preview made with ``fid_options`` (e.g. ``{"per_row": 50}``: 50 samples per
            class in the batch), from the sampling weights (the EMA copy when the module keeps one), decoded first;
            logged as ``<key>/fid`` with ``pl_module.log`` (a metric ``ModelCheckpoint``/``EarlyStopping`` can
            monitor). The reference statistics are computed once, at the first validation.
        fid_options: passed to the task's ``preview`` for the FID samples (default: ``options``).
        options, **kwargs: passed to the task's ``preview`` (e.g. ``steps=50, guidance=2.0, per_row=10`` for images,
            ``num_samples=8, max_new_tokens=64`` for language models, ``steps=`` for classification); ``options``
            is the same as a dict, for configuration files (LightningCLI: ``init_args: {options: {steps: 50}}``).
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        batch: Any = None,
        decode: Decode | None = None,
        dirpath: str | os.PathLike | None = None,
        key: str = "samples",
        at_end: bool = True,
        options: dict[str, Any] | None = None,
        decode_latents: DecodeLatents | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
        fid: FID | None = None,
        fid_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be an integer >= 0 (0: only at the end), got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.batch = batch
        self.decode = decode
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.key = key
        self.at_end = at_end
        self.options = {**(options or {}), **kwargs}
        if decode_latents is not None and not callable(decode_latents):
            raise ValueError(
                f"decode_latents must map latents to images (a LatentSpace or a callable); got {decode_latents!r}."
            )
        if fid is not None and not isinstance(fid, FID):
            raise ValueError(f"fid must be an FID(features=..., reference=...), got {type(fid).__name__}.")
        self.decode_latents, self.image_range = decode_latents, image_range
        self.fid, self.fid_options = fid, fid_options
        #: (global step, FID) of each validation scored so far
        self.fid_history: list[tuple[int, float]] = []
        #: the last preview and the files written so far (for scripts and tests)
        self.last: Preview | None = None
        self.files: list[Path] = []
        self._batch: Any = None
        self._shown_at: int | None = None
        self._warned = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(pl_module, DiffusionBlocksModule):
            raise MisconfigurationException(
                f"SampleLogger shows the preview of a DiffusionBlocksModule's task, got {type(pl_module).__name__}."
                " Remove the callback or train a DiffusionBlocksModule."
            )
        if self.dirpath is None:
            self.dirpath = Path(trainer.default_root_dir) / "samples"
        self._batch = None if self.batch is None else _to_cpu(self.batch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            self._batch = _to_cpu(batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps: several micro-batches of one accumulated step preview once
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._shown_at:
            self.show(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and self._batch is not None and trainer.global_step != self._shown_at:
            self.show(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fid is None or trainer.sanity_checking or self._batch is None:
            return
        value = self.score(trainer, pl_module, log=False)
        if trainer.world_size > 1:
            value = trainer.strategy.broadcast(value, src=0)
        if value is not None:  # on every process, so ModelCheckpoint(monitor="samples/fid") can use it
            pl_module.log(f"{self.key}/fid", value)

    def score(self, trainer: pl.Trainer, pl_module: Any, log: bool = True) -> float | None:
        """The FID of a preview's samples now (see ``fid``; call it on every process; rank 0 returns it), logged
        as ``<key>/fid`` (after validation, through ``pl_module.log`` instead, so that callbacks can monitor it)."""
        assert self.fid is not None
        options = self.options if self.fid_options is None else self.fid_options
        preview = self._preview(trainer, pl_module, options)
        if preview is None or preview.images is None:
            return None
        value = self.fid.score(preview.images)
        self.fid_history.append((trainer.global_step, value))
        if log:
            log_metrics(trainer, {f"{self.key}/fid": value}, logging_step(trainer))
        return value

    def show(self, trainer: pl.Trainer, pl_module: Any) -> Preview | None:
        """Ask the task for a preview of the model now and send it to every logger (call it on every process)."""
        self._shown_at = trainer.global_step
        preview = self._preview(trainer, pl_module, self.options)
        if preview is None:
            return None
        self.last = preview
        self.files += self.render(trainer, preview)
        return preview

    def _preview(self, trainer: pl.Trainer, pl_module: Any, options: dict[str, Any]) -> Preview | None:
        """The task's preview with the sampling weights (every group in memory), its images decoded from latents;
        None on processes other than rank 0 and for a task without a preview."""
        strategy = trainer.strategy
        gather = getattr(strategy, "gather_groups", None)
        if trainer.world_size > 1 and callable(gather):
            gather()  # block parallel: every group's current weights, on every process (a collective)
        if not trainer.is_global_zero:
            return None
        offloader = getattr(strategy, "offloader", None)
        exposed = offloader.expose_for_checkpoint() if offloader is not None else []  # every group in memory
        try:
            batch = move_data_to_device(self._batch, pl_module.device)
            with pl_module.evaluating() as router:
                preview = pl_module.task.preview(router, batch, **options)
        finally:
            if offloader is not None:
                for group in exposed:
                    offloader.offload(group)
        if preview is None:
            if not self._warned:
                rank_zero_warn(f"{type(pl_module.task).__name__} offers no preview; SampleLogger logs nothing.")
                self._warned = True
            return None
        return decoded_preview(preview, self.decode_latents, self.image_range)

    def render(self, trainer: pl.Trainer, preview: Preview) -> list[Path]:
        """Send each part of ``preview`` to every logger (files where a logger takes no images or text)."""
        step, key, directory = logging_step(trainer), self.key, self.dirpath
        files: list[Path] = []
        if preview.images is not None:
            grid = image_grid(preview.images, preview.rows, value_range=preview.value_range)
            files += log_image(trainer, f"{key}/images", grid, preview.caption, step, directory)
        lines = [self._line(trainer, ids, preview.prompt_length) for ids in preview.tokens or []]
        lines += preview.text or []
        if lines:
            files += log_text(trainer, f"{key}/text", [preview.caption, *lines], step, directory)
        if preview.table is not None:
            columns, rows = preview.table
            name = f"samples/{key.replace('/', '_')}_table_step{step}"
            files += log_table(trainer, f"{key}/table", columns, rows, step, name=name, directory=directory)
        if preview.scalars:
            log_metrics(trainer, {f"{key}/{name}": value for name, value in preview.scalars.items()}, step)
        return files

    def _line(self, trainer: pl.Trainer, ids: list[int], prompt_length: int) -> str:
        decode = self._decoder(trainer)
        if prompt_length:
            return f"{decode(ids[:prompt_length])} | {decode(ids[prompt_length:])}"
        return decode(ids)

    def _decoder(self, trainer: pl.Trainer) -> Decode:
        if self.decode is not None:
            return self.decode
        datamodule = getattr(trainer, "datamodule", None)
        decode = getattr(getattr(datamodule, "tokenizer", None), "decode", None)
        if callable(decode):
            return decode
        return lambda ids: " ".join(str(i) for i in ids)


def decoded_preview(
    preview: Preview, decode_latents: DecodeLatents | None, image_range: tuple[float, float] = (-1.0, 1.0)
) -> Preview:
    """``preview`` with its images decoded from latents (in the decoder's ``value_range``, else ``image_range``)."""
    if decode_latents is None or preview.images is None:
        return preview
    images = decode_latents(preview.images).detach().float().cpu()
    lo, hi = getattr(decode_latents, "value_range", image_range)
    return dataclasses.replace(preview, images=images, value_range=(float(lo), float(hi)))


def _to_cpu(batch: Any) -> Any:
    """A detached CPU copy of a batch (kept across steps; the training batch itself is reused by loaders)."""
    return apply_to_collection(batch, Tensor, lambda t: t.detach().cpu().clone())
