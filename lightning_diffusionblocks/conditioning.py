"""Conditioning beyond class labels: the keyword tensors a network takes, carried per sample from a dict batch.

A batch ``{"images": x, "encoder_hidden_states": h, "pooled_projections": p, ...}`` gives the network
``forward(x, level, labels, encoder_hidden_states=h, pooled_projections=p, ...)``: every key but ``images`` (and
``labels``, passed in the labels slot to a network that takes labels) is one of the network's own keyword
arguments, with the sample as first dimension (nested dicts such as ``added_cond_kwargs`` too). The image tasks keep
it in a :class:`Conditioning` so routing (rows served by different groups), dropout for classifier-free guidance
(rows replaced by a null conditioning) and guidance at sampling (conditional and null halves in one batch) treat it
as one thing, as they treat class labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

#: keys that are not dropped for classifier-free guidance (unless a null value is given for them): they describe the
#: sample or the call, not what the sample shows (Flux's distilled guidance value and token positions, PixArt's
#: resolution and aspect ratio)
KEPT_ON_DROPOUT = ("guidance", "txt_ids", "img_ids", "added_cond_kwargs")


def _map(value: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: _map(v, fn) for k, v in value.items()}
    return value


def _map2(a: Any, b: Any, fn: Callable[[Tensor, Tensor], Tensor]) -> Any:
    if isinstance(a, Tensor):
        return fn(a, b)
    if isinstance(a, Mapping):
        return {k: _map2(v, b[k], fn) for k, v in a.items()}
    return a


def _tensors(value: Any, name: str) -> list[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        return [(name, value)]
    if isinstance(value, Mapping):
        return [t for k, v in value.items() for t in _tensors(v, f"{name}.{k}")]
    return []


class Conditioning:
    """Per-sample conditioning: optional class ``labels`` (N,) and the network's keyword ``values``, each a tensor
    with the sample as first dimension (or a dict of such, or None). Indexing selects rows of everything."""

    def __init__(self, labels: Tensor | None, values: Mapping[str, Any]) -> None:
        self.labels = labels
        self.values = dict(values)

    def __repr__(self) -> str:
        shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__ for k, v in self.values.items()}
        return f"Conditioning(labels={None if self.labels is None else tuple(self.labels.shape)}, values={shapes})"

    @property
    def num_rows(self) -> int:
        """The number of samples."""
        if self.labels is not None:
            return int(self.labels.shape[0])
        found = _tensors(self.values, "")
        return int(found[0][1].shape[0]) if found else 0

    def check_rows(self, count: int, where: str) -> None:
        """Refuse a value whose first dimension is not one row per sample (``count``)."""
        for name, tensor in _tensors(self.values, ""):
            if tensor.ndim == 0 or tensor.shape[0] != count:
                raise ValueError(
                    f"The conditioning `{name.lstrip('.')}` in {where} has shape {tuple(tensor.shape)}, but every"
                    f" conditioning tensor needs one row per sample ({count} rows first), e.g. (N, tokens, width)"
                    " text states, (N, width) pooled states, (N, tokens) masks."
                )

    def __getitem__(self, rows: Tensor | slice) -> Conditioning:
        return Conditioning(None if self.labels is None else self.labels[rows], _map(self.values, lambda t: t[rows]))

    def cat(self, other: Conditioning) -> Conditioning:
        """These rows, then ``other``'s (same keys)."""
        labels = None
        if self.labels is not None and other.labels is not None:
            labels = torch.cat([self.labels, other.labels])
        return Conditioning(labels, _map2(self.values, other.values, lambda a, b: torch.cat([a, b.to(a)])))

    def where(self, drop: Tensor, null: Conditioning) -> Conditioning:
        """Rows where ``drop`` (N,) is True taken from ``null``, the others kept."""
        labels = self.labels
        if labels is not None and null.labels is not None:
            labels = torch.where(drop.to(labels.device), null.labels, labels)

        def pick(a: Tensor, b: Tensor) -> Tensor:
            mask = drop.to(a.device).view(-1, *([1] * (a.ndim - 1)))
            return torch.where(mask, b.to(a), a)

        return Conditioning(labels, _map2(self.values, null.values, pick))

    def to(self, device: torch.device | str) -> Conditioning:
        labels = None if self.labels is None else self.labels.to(device)
        return Conditioning(labels, _map(self.values, lambda t: t.to(device)))

    def repeat_interleave(self, repeats: int) -> Conditioning:
        labels = None if self.labels is None else self.labels.repeat_interleave(repeats)
        return Conditioning(labels, _map(self.values, lambda t: t.repeat_interleave(repeats, dim=0)))

    def null(self, null_label: int | None, null_values: Mapping[str, Tensor]) -> Conditioning:
        """The null conditioning for these rows: labels → ``null_label`` (kept when None: labels the network does not
        take are data); each value → the user's null for that key (one row, broadcast to every sample), else zeros;
        keys of :data:`KEPT_ON_DROPOUT` without a given null are kept."""
        labels = self.labels
        if labels is not None and null_label is not None:
            labels = torch.full_like(labels, null_label)
        values: dict[str, Any] = {}
        for key, value in self.values.items():
            if key in null_values:
                values[key] = broadcast_null(key, null_values[key], value)
            elif key in KEPT_ON_DROPOUT:
                values[key] = value
            else:
                values[key] = _map(value, torch.zeros_like)
        return Conditioning(labels, values)


def broadcast_null(key: str, null: Tensor, like: Any) -> Tensor:
    """A user-given null value (one sample's shape, with or without a leading 1) repeated for every row of ``like``."""
    if not isinstance(like, Tensor):
        raise ValueError(f"The null conditioning gives `{key}`, but the batches' `{key}` is not a tensor.")
    one = null if null.ndim == like.ndim else null.unsqueeze(0)
    if one.ndim != like.ndim or one.shape[0] != 1 or one.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"The null conditioning's `{key}` has shape {tuple(null.shape)}, but the batches' `{key}` rows have shape"
            f" {tuple(like.shape[1:])}: give one row of that shape (e.g. the empty prompt's embeddings padded like the"
            " prompts)."
        )
    return one.to(like).expand_as(like)


def check_null_conditioning(null: Mapping[str, Any] | None) -> dict[str, Tensor]:
    """A task's ``null_conditioning`` option as tensors (a checkpoint records them as nested lists)."""
    if null is None:
        return {}
    if not isinstance(null, Mapping) or not all(isinstance(k, str) for k in null):
        raise TypeError(
            f"null_conditioning must map the network's keyword names to one sample's value, e.g."
            f" {{'encoder_hidden_states': empty_prompt_states}}; got {type(null).__name__}."
        )
    return {k: v.detach().cpu() if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in null.items()}


def with_null(labels: Any, null_label: Any) -> Any:
    """The conditional rows followed by their null rows (classifier-free guidance in one batch): class ids and
    ``null_label`` (an int), or a :class:`Conditioning` and its null (``null_label`` is then that null)."""
    if isinstance(labels, Conditioning):
        return labels.cat(null_label)
    return torch.cat([labels, torch.full_like(labels, null_label)])


__all__ = ["KEPT_ON_DROPOUT", "Conditioning", "broadcast_null", "check_null_conditioning", "with_null"]
