"""`PredictionWriter`: what ``trainer.predict`` returns, written to files a person can open.

The callback knows no task: each batch's prediction is turned into a
:class:`~lightning_diffusionblocks.previews.Preview` by the task (:meth:`Task.prediction_preview`) and its parts
are written: images as a PNG grid, a table (class probabilities, per-sequence language-model metrics) as CSV, token
ids and text as a ``.txt`` file. The command line's ``predict`` adds one by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_diffusionblocks.callbacks.samples import DecodeLatents, decoded_preview
from lightning_diffusionblocks.dashboard import write_csv
from lightning_diffusionblocks.visualize import image_grid

Decode = Callable[[list[int]], str]


class PredictionWriter(BasePredictionWriter):
    """After each predict batch, write the task's reading of the prediction into ``output_dir``.

    Files are named ``predictions_<dataloader>_<batch>`` (``_rank<r>`` added with several processes) with the suffix
    of their content: ``.png`` (a grid of generated images, one image per row of the batch), ``.csv`` (one row per
    sample: class probabilities with the arg-max, or per-sequence metrics), ``.txt`` (decoded token ids).

    Args:
        output_dir: where the files go; default ``<default_root_dir>/predictions``.
        decode: token ids → text; default the datamodule's ``tokenizer.decode`` if it has one, else the ids.
        scale: each image pixel becomes ``scale`` × ``scale`` pixels in the PNG, so small images stay visible.
        decode_latents: for a model trained on latents, latents → images before they are written (a
            :class:`~lightning_diffusionblocks.latents.LatentSpace`, or a callable returning images in
            ``image_range``).
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        decode: Decode | None = None,
        scale: int = 3,
        decode_latents: DecodeLatents | None = None,
        image_range: tuple[float, float] = (-1.0, 1.0),
    ):
        super().__init__(write_interval="batch")
        if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}.")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.decode, self.scale = decode, scale
        if decode_latents is not None and not callable(decode_latents):
            raise ValueError(
                f"decode_latents must map latents to images (a LatentSpace or a callable); got {decode_latents!r}."
            )
        self.decode_latents, self.image_range = decode_latents, image_range
        #: every file written so far (for scripts and tests)
        self.files: list[Path] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if not callable(getattr(getattr(pl_module, "task", None), "prediction_preview", None)):
            raise MisconfigurationException(
                f"PredictionWriter writes the predictions of a DiffusionBlocksModule's task, got"
                f" {type(pl_module).__name__}. Remove the callback or predict with a DiffusionBlocksModule."
            )
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "predictions"

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        preview = pl_module.task.prediction_preview(prediction, batch)  # type: ignore[union-attr, operator]
        if preview is None:
            return
        preview = decoded_preview(preview, self.decode_latents, self.image_range)
        assert self.output_dir is not None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        stem = f"predictions_{dataloader_idx}_{batch_idx:05d}"
        if trainer.world_size > 1:
            stem += f"_rank{trainer.global_rank}"
        if preview.images is not None:
            self.files.append(self._png(preview.images, preview.rows, preview.value_range, stem))
        lines = [self._decoder(trainer)(ids) for ids in preview.tokens or []] + list(preview.text or [])
        if lines:
            path = self.output_dir / f"{stem}.txt"
            path.write_text("\n".join(lines) + "\n")
            self.files.append(path)
        if preview.table is not None:
            columns, rows = preview.table
            self.files.append(write_csv(self.output_dir / f"{stem}.csv", columns, rows))

    def _png(self, images: Any, rows: int, value_range: tuple[float, float], stem: str) -> Path:
        from PIL import Image

        grid = Image.fromarray(image_grid(images, rows, value_range=value_range))
        if self.scale > 1:
            grid = grid.resize((grid.width * self.scale, grid.height * self.scale), Image.Resampling.NEAREST)
        assert self.output_dir is not None
        path = self.output_dir / f"{stem}.png"
        grid.save(path)
        return path

    def _decoder(self, trainer: pl.Trainer) -> Decode:
        if self.decode is not None:
            return self.decode
        decode = getattr(getattr(getattr(trainer, "datamodule", None), "tokenizer", None), "decode", None)
        return decode if callable(decode) else (lambda ids: " ".join(str(i) for i in ids))
