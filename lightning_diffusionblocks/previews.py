"""`Preview`: what a model does now, as plain data; tasks make it, callbacks render it.

It lives below both so that neither reaches into the other: a task returns a :class:`Preview` from
:meth:`~lightning_diffusionblocks.tasks.base.Task.preview`, and
:class:`~lightning_diffusionblocks.callbacks.SampleLogger` and
:class:`~lightning_diffusionblocks.callbacks.PredictionWriter` show its parts without knowing any task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["Preview"]


@dataclass
class Preview:
    """What a model does now, as plain data a person can look at; each task decides what that is
    (:meth:`Task.preview`), and :class:`~lightning_diffusionblocks.callbacks.SampleLogger` renders it for each logger.

    Any of the parts may be set: ``images`` (N, C, H, W) in ``value_range``, shown as a grid of ``rows`` rows;
    ``tokens`` (token ids of generated sequences, decoded by ``SampleLogger(decode=...)``; the first ``prompt_length``
    of each are the prompt); ``text`` (ready lines); ``table`` (column names and rows, e.g. a confusion matrix);
    ``scalars`` (logged as metrics, e.g. accuracy after each σ step); ``caption`` says what is shown.
    """

    images: Tensor | None = None
    rows: int = 1
    value_range: tuple[float, float] = (-1.0, 1.0)
    tokens: list[list[int]] | None = None
    prompt_length: int = 0
    text: list[str] | None = None
    table: tuple[list[str], list[list[Any]]] | None = None
    scalars: dict[str, float] = field(default_factory=dict)
    caption: str = ""
