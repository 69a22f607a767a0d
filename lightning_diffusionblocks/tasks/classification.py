"""Discrete targets: image classification as denoising of L2-normalised label embeddings.

Training (paper App. C; official ViT code): the clean target is y = normalize(E[label]); the group sees
z = y + σε with σ from its range and reads out class logits; the loss is the per-sample σ-weighted
cross-entropy. Prediction walks an equi-probable σ grid from σ_max: at each step the owning group gives
logits, their expectation softmax(logits)·Ê (the *same* normalised embeddings as in training) is the
denoised estimate for the Euler step, and the last step's softmax is the class distribution.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.levels import append_dims
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import check_integer, embedding_chain
from lightning_diffusionblocks.tasks.base import Preview, Task


class Classification(Task):
    """Batches are ``(inputs, labels)``; the network is a :class:`ConditioningAdapter`-like module:
    ``net(inputs, z, sigma)`` → logits and ``net(mode="embeddings")`` → normalised label embeddings.

    ``weighting``: ``"per_sample"`` multiplies each sample's cross-entropy by w(σ) (the paper's formula);
    ``"batch_mean"`` multiplies the batch's mean cross-entropy by the batch's mean w(σ) (what the official
    code computes, through a broadcast); ``"none"`` is plain cross-entropy. With per-sample weights the
    lowest-σ samples, whose noisy target already reveals the label, carry weights up to ~2.5e5 and drown
    the image-dependent signal of the others; ``"batch_mean"`` keeps every sample's share equal.
    """

    inference = ("predict_proba",)
    progress_metrics = ("acc",)
    reads = "class logits"

    def __init__(
        self,
        num_classes: int,
        noise: NoiseSchedule = EDM,
        weighting: Literal["per_sample", "batch_mean", "none"] = "per_sample",
    ) -> None:
        super().__init__(noise)
        self.noise: NoiseSchedule = noise
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        if weighting not in ("per_sample", "batch_mean", "none"):
            raise ValueError(f"weighting must be 'per_sample', 'batch_mean' or 'none', got {weighting!r}.")
        self.num_classes = num_classes
        self.weighting = weighting

    def split(self, batch: Any) -> tuple[Tensor, Tensor]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("Classification expects batches of `(inputs, labels)`.")
        inputs, labels = batch
        if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or labels.ndim != 1:
            one_hot = labels.ndim == 2 and labels.shape[-1] == self.num_classes
            raise ValueError(
                f"Labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}."
                + (" For one-hot labels pass labels.argmax(-1)." if one_hot else "")
            )
        bad = (labels < 0) | (labels >= self.num_classes)
        if bool(bad.any()):
            raise ValueError(
                f"Labels must be in [0, {self.num_classes}); got {labels[bad][:5].tolist()}."
                " Check num_classes or the data set's label mapping."
            )
        return inputs, labels.long()

    def batch_size(self, batch: Any) -> int:
        return self.split(batch)[0].shape[0]

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        inputs, labels = self.split(batch)
        targets = run(mode="embeddings")[labels]
        eps = torch.randn(targets.shape, generator=generator, device=generator.device).to(targets)
        z = targets + append_dims(sigma, targets.ndim).to(targets) * eps
        logits = run(inputs, z, sigma, sigma_data=self.noise.sigma_data)
        ce = F.cross_entropy(logits.float(), labels, reduction="none")
        if self.weighting == "per_sample":
            return self.noise.loss_weight(sigma) * ce
        if self.weighting == "batch_mean":
            return self.noise.loss_weight(sigma).mean() * ce
        return ce

    # ------------------------------------------------------------------ conventions
    def bind(self, net: nn.Module) -> None:
        self.check_network_outputs(net)
        try:
            table = net(mode="embeddings")
        except Exception as err:  # noqa: BLE001 - any failure means the network is not a classifier of this kind
            raise ValueError(
                f"Classification needs a network that reads out class logits as net(inputs, z, sigma) and returns its"
                f" label embeddings as net(mode='embeddings'); {type(net).__name__} does not ({type(err).__name__}:"
                f" {err}). Wrap a plain backbone: ConditioningAdapter(backbone, num_classes={self.num_classes})."
                " An image denoiser (e.g. DiT) belongs to ImageGeneration."
            ) from err
        if not isinstance(table, Tensor) or table.ndim != 2:
            raise ValueError(f"{type(net).__name__}(mode='embeddings') must return a (classes, dim) tensor.")
        if table.shape[0] != self.num_classes:
            raise ValueError(
                f"The network embeds {table.shape[0]} classes but Classification(num_classes={self.num_classes})."
                f" Build both with the data set's number of classes."
            )

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict_proba(self, router: Router, inputs: Tensor, steps: int | None = None, seed: int = 0) -> Tensor:
        """Class probabilities (N, C) after ``steps`` σ steps (chosen now; default B, one per group).

        Each step the owning group gives logits; their expectation softmax(logits)·Ê under the same normalised
        embeddings as in training is the denoised estimate for the Euler step (the classification bridge).
        """
        return self.probability_chain(router, inputs, steps, seed)[-1][1]

    @torch.no_grad()
    def probability_chain(
        self, router: Router, inputs: Tensor, steps: int | None = None, seed: int = 0
    ) -> list[tuple[float, Tensor]]:
        """(σ, class probabilities) after each of the ``steps`` σ steps of :meth:`predict_proba` (the last is its
        answer), to see what each group's step adds."""
        steps = router.num_groups if steps is None else check_integer(steps, "steps", "predict_proba")
        check_integer(seed, "seed", "predict_proba")
        if steps < 1:
            raise ValueError(f"Prediction needs at least 1 inference step, got steps={steps}.")
        sigmas = self.noise.equiprobable_grid(steps).tolist()
        dim = router.at(sigmas[0])(mode="embeddings").shape[1]
        sd = self.noise.sigma_data

        def logits_at(run: Runner, z: Tensor, sigma: Tensor) -> Tensor:
            return run(inputs, z, sigma, sigma_data=sd)

        chain = embedding_chain(router.at, logits_at, (inputs.shape[0], dim), sigmas, seed, inputs.device)
        return [(sigma, logits.softmax(-1)) for sigma, logits in chain]

    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs, labels = self.split(batch)
        probs = self.predict_proba(router, inputs, seed=batch_idx)
        return {"acc": (probs.argmax(-1) == labels).float().mean()}

    def preview(self, router: Router, batch: Any, steps: int | None = None, seed: int = 0) -> Preview:
        """The confusion matrix of ``batch``'s predictions (rows: true class, columns: predicted) and the accuracy
        after each σ step (``accuracy_step_{i}``; default B steps, one per group)."""
        inputs, labels = self.split(batch)
        chain = self.probability_chain(router, inputs, steps, seed)
        accuracy = [float((probs.argmax(-1) == labels).float().mean()) for _, probs in chain]
        predicted = chain[-1][1].argmax(-1)
        matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        matrix.index_put_((labels.cpu(), predicted.cpu()), torch.ones_like(labels.cpu()), accumulate=True)
        columns = ["true/predicted", *(str(c) for c in range(self.num_classes))]
        rows = [[str(c), *matrix[c].tolist()] for c in range(self.num_classes)]
        sigmas = [sigma for sigma, _ in chain]
        text = [f"step {i}: sigma {s:.4g}, accuracy {a:.3f}" for i, (s, a) in enumerate(zip(sigmas, accuracy))]
        return Preview(
            table=(columns, rows),
            text=text,
            scalars={f"accuracy_step_{i}": acc for i, acc in enumerate(accuracy)},
            caption=f"Classification: {len(labels)} inputs, {len(chain)} sigma steps",
        )

    def predict_step(self, router: Router, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities of ``inputs`` or ``(inputs, labels)`` batches (labels are not used)."""
        if isinstance(batch, Tensor):
            inputs = batch
        elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2) and isinstance(batch[0], Tensor):
            inputs = batch[0]
        else:
            raise ValueError("Classification's predict_step takes batches of `inputs` or `(inputs, labels)`.")
        if not inputs.is_floating_point():
            raise ValueError(
                f"Classification's predict_step got an integer tensor of shape {tuple(inputs.shape)}: a predict"
                " batch holds the inputs to classify (e.g. images), not labels."
            )
        return self.predict_proba(router, inputs, seed=batch_idx)
