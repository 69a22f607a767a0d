"""`FID`: the Fréchet distance of a model's samples to reference images, in a feature space you choose.

The feature extractor is always named explicitly: a module mapping images to (N, d) features (e.g. the body of a
small classifier trained on the data set, as the parity benchmark does; it runs offline), or ``"inception"``:
torchmetrics' InceptionV3 (the standard FID), which **downloads its weights** and needs ``torch-fidelity``, so it
works online only. Statistics of the reference images are computed once, at the first score, and kept; each
score then encodes only the samples.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

__all__ = ["FID"]


class _Features(nn.Module):
    """A user's feature extractor with the ``num_features`` torchmetrics reads (found by one call)."""

    def __init__(self, body: nn.Module, num_features: int) -> None:
        super().__init__()
        self.body, self.num_features = body, num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).flatten(1)


class FID:
    """Fréchet distance between samples and ``reference`` images in the space of ``features``.

    Args:
        features: a module (images in ``value_range`` → (N, d) features; offline) or ``"inception"``
            (torchmetrics' 2048-d InceptionV3 features; downloads weights, online only, needs torch-fidelity).
        reference: real images (a tensor, or an iterable of tensors or of ``(images, ...)`` batches) in
            ``value_range``, the same range as the samples.
        value_range: the range of reference and sample images (mapped to [0, 1] for Inception).
        batch_size: images per feature call.
    """

    def __init__(
        self,
        features: nn.Module | Literal["inception"],
        reference: Tensor | Iterable[Tensor | tuple | list],
        value_range: tuple[float, float] = (-1.0, 1.0),
        batch_size: int = 256,
    ) -> None:
        if not isinstance(features, nn.Module) and features != "inception":
            raise ValueError(
                "FID needs an explicit feature extractor: a module mapping images to features (offline; e.g. a small"
                " classifier trained on your data) or features='inception' (downloads InceptionV3 weights; online"
                f" only); got {features!r}."
            )
        if features == "inception" and importlib.util.find_spec("torch_fidelity") is None:
            raise ModuleNotFoundError(
                "features='inception' is torchmetrics' InceptionV3, which needs `pip install torch-fidelity` and"
                " downloads its weights on first use (online only). Offline, pass a feature module, e.g. the body of"
                " a small classifier trained on your data."
            )
        self.features, self.reference = features, reference
        self.value_range, self.batch_size = value_range, batch_size
        self._metric: FrechetInceptionDistance | None = None
        #: how many reference images the statistics hold (0 until the first score)
        self.reference_count = 0

    def _prepare(self, images: Tensor) -> Tensor:
        if self.features != "inception":
            return images.float()
        lo, hi = self.value_range
        images = ((images.float() - lo) / (hi - lo)).clamp(0, 1)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def _batches(self) -> Iterable[Tensor]:
        if isinstance(self.reference, Tensor):
            yield from self.reference.split(self.batch_size)
            return
        for batch in self.reference:
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(images, dict):
                images = images["images"]
            yield from images.split(self.batch_size)

    def _build(self, first: Tensor) -> FrechetInceptionDistance:
        if self.features == "inception":
            return FrechetInceptionDistance(feature=2048, normalize=True, reset_real_features=False)
        assert isinstance(self.features, nn.Module)
        self.features.eval()
        with torch.no_grad():
            width = self.features(self._prepare(first[:1])).flatten(1).shape[1]
        metric = FrechetInceptionDistance(feature=_Features(self.features, width), reset_real_features=False)
        return metric.to(self._device)

    @property
    def _device(self) -> torch.device:
        first = next(iter(self.features.parameters()), None) if isinstance(self.features, nn.Module) else None
        return first.device if first is not None else torch.device("cpu")

    @torch.no_grad()
    def reference_statistics(self) -> FrechetInceptionDistance:
        """The metric holding the reference statistics, computed on the first call and kept after."""
        if self._metric is None:
            metric: FrechetInceptionDistance | None = None
            for images in self._batches():
                if metric is None:
                    metric = self._build(images)
                metric.update(self._prepare(images.to(self._device)), real=True)
                self.reference_count += len(images)
            if metric is None or self.reference_count < 2:
                raise ValueError("FID needs at least 2 reference images; pass more in `reference`.")
            self._metric = metric
        return self._metric

    @torch.no_grad()
    def score(self, images: Tensor) -> float:
        """The FID of ``images`` (at least 2, in ``value_range``) against the reference statistics."""
        if len(images) < 2:
            raise ValueError(f"FID needs at least 2 samples to estimate a covariance; got {len(images)}.")
        metric = self.reference_statistics()
        metric.reset()  # forgets the previous samples only (reset_real_features=False)
        for chunk in images.split(self.batch_size):
            metric.update(self._prepare(chunk.to(self._device)), real=False)
        return float(metric.compute())
