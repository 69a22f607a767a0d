"""What a task is: its noise levels, the per-sample loss, its validation metrics and its inference.

A task owns everything formulation-specific. Inference (sampling, class probabilities, text generation,
LM evaluation) is given a :class:`~lightning_diffusionblocks.routing.Router`, so a task never asks how the
model was trained. The module's public calls (``sample``, ``predict_proba``, ``generate``,
``evaluate_batch``) reach the task method of the same name when the task lists it in ``inference``.
Adding a task is one new file: subclass :class:`Task`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_diffusionblocks.levels import NoiseLevels
from lightning_diffusionblocks.noise import EDM
from lightning_diffusionblocks.previews import Preview
from lightning_diffusionblocks.records import RecordsInitArgs
from lightning_diffusionblocks.routing import Router, Runner

__all__ = ["Preview", "Router", "Runner", "Task", "routed_loss"]


class Task(RecordsInitArgs, ABC):
    """One DiffusionBlocks formulation (image generation, classification, language modelling, …)."""

    #: the module's public inference calls this task answers, each a method ``name(router, ...)``
    inference: tuple[str, ...] = ()
    #: validation metrics shown in the progress bar
    progress_metrics: tuple[str, ...] = ()
    #: what this task reads from the network's output; a network that declares what it returns
    #: (``diffusionblocks_outputs``) and returns something else is refused when bound (:meth:`check_network_outputs`)
    reads: str = ""

    def __init__(self, noise: NoiseLevels = EDM) -> None:
        #: the task's noise levels (σ, t, timesteps): what the module partitions, draws and routes
        self.noise: NoiseLevels = noise

    # ------------------------------------------------------------------ conventions
    def bind(self, net: nn.Module) -> None:  # noqa: B027 - optional hook
        """Check that ``net`` suits this task and discover its conventions (called once by the module)."""

    def check_network_outputs(self, net: nn.Module) -> None:
        """Refuse a network that declares it returns something this task does not read (e.g. a classifier's logits
        given to an image task), before a shape error deep in the first step; called by a task's :meth:`bind`."""
        declared = getattr(net, "diffusionblocks_outputs", None)
        if not (isinstance(declared, str) and declared and self.reads) or declared == self.reads:
            return
        readers = sorted({task.__name__ for task in _task_classes() if task.reads == declared})
        call = getattr(self, "expected_call", "")
        how = f": {call}." if call else "."
        fix = f"Train it with {' or '.join(readers)}" if readers else f"Pair it with a task that reads {declared}"
        raise ValueError(
            f"{type(net).__name__} returns {declared} (its `diffusionblocks_outputs`), but the {type(self).__name__}"
            f" task reads {self.reads} from the network{how} {fix}, or give {type(self).__name__} a network made"
            " for it."
        )

    def observe(self, batch: Any) -> None:  # noqa: B027 - optional hook
        """See a training batch (e.g. to learn the shape of a sample); called on every training step."""

    def state(self) -> dict[str, Any]:
        """Plain data this task learned (e.g. the sample shape), kept in checkpoints."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state` returned."""

    # ------------------------------------------------------------------ training
    @abstractmethod
    def batch_size(self, batch: Any) -> int:
        """Number of samples in ``batch``."""

    @abstractmethod
    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sample weighted loss, shape (N,), for noise levels ``sigma`` (N,).

        All randomness comes from ``generator`` so that a step is a pure function of (seed, step).
        """

    # ------------------------------------------------------------------ evaluation and inference
    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Task metrics of one validation batch beyond the per-group losses (means over the batch)."""
        return {}

    def predict_step(self, router: Router, batch: Any, batch_idx: int) -> Any:
        """What ``trainer.predict`` returns for one batch."""
        raise TypeError(f"{type(self).__name__} has no prediction; trainer.predict cannot run it.")

    def prediction_preview(self, prediction: Any, batch: Any) -> Preview | None:
        """How one batch of :meth:`predict_step` output is written to files (``PredictionWriter``), read from its
        form: images ``(N, C, H, W)`` as a grid, a float ``(N, K)`` tensor as a table of K columns per row (e.g.
        class probabilities, with the arg-max), integer ``(N, L)`` ids as lines of tokens, a dict of per-row tensors
        (e.g. per-sequence metrics) as a table with one column each. None: nothing to write. A task whose
        predictions read otherwise overrides this."""
        if isinstance(prediction, dict) and prediction and all(isinstance(v, Tensor) for v in prediction.values()):
            columns = [name for name, v in prediction.items() if v.ndim == 1]
            if not columns:
                return None
            values = torch.stack([prediction[c].detach().float().cpu() for c in columns], dim=1)
            return Preview(table=(["row", *columns], [[i, *row] for i, row in enumerate(values.tolist())]))
        if not isinstance(prediction, Tensor):
            return None
        prediction = prediction.detach().cpu()
        if prediction.ndim == 4 and prediction.is_floating_point():
            n = prediction.shape[0]
            per_row = next(c for c in range(min(n, 8), 0, -1) if n % c == 0)
            value_range = getattr(self, "data_range", None) or (-1.0, 1.0)
            return Preview(images=prediction, rows=n // per_row, value_range=(value_range[0], value_range[1]))
        if prediction.ndim == 2 and prediction.is_floating_point():
            columns = ["row", "argmax", *(str(k) for k in range(prediction.shape[1]))]
            rows = [[i, int(row.argmax()), *row.tolist()] for i, row in enumerate(prediction.float())]
            return Preview(table=(columns, rows))
        if prediction.ndim == 2:
            return Preview(tokens=prediction.tolist())
        return None

    def preview(self, router: Router, batch: Any) -> Preview | None:
        """A look at what the model does now (samples, generated text, a confusion matrix), drawn on ``batch`` (a
        batch of the training data, for labels, prompts or inputs to classify). None: this task shows nothing.
        Tasks add their own keyword options (sampling steps, number of samples, …)."""
        return None

    def unsupported(self, call: str) -> TypeError:
        """The error for a public call this task does not answer."""
        offered = ", ".join(f"{name}()" for name in self.inference) or "none"
        return TypeError(f"{call}() is not offered by the {type(self).__name__} task (it offers: {offered}).")


def _task_classes() -> list[type[Task]]:
    """Every subclass of :class:`Task`, however deep."""
    found: list[type[Task]] = []
    todo = Task.__subclasses__()
    while todo:
        sub = todo.pop()
        found.append(sub)
        todo += sub.__subclasses__()
    return found


def routed_loss(router: Router, levels: Tensor, loss_at: Callable[[Runner, Tensor | slice], Tensor]) -> Tensor:
    """Per-sample loss (N,) at per-sample ``levels``, each row served by the group owning its level;
    ``loss_at(run, rows)`` returns the loss of the rows ``rows`` run by ``run``."""
    loss = torch.empty(levels.shape[0], device=levels.device)
    for rows, run in router.split(levels):
        loss[rows] = loss_at(run, rows).to(loss)
    return loss
