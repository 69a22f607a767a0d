"""The module's front door of inference: every call goes to the task with the sampling network's router.

``DiffusionBlocksModule`` takes these methods from :class:`Inference`; the task documents each call's arguments
(one place), and a call the task does not answer is refused naming what it does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor

from lightning_diffusionblocks.partition import BlockwiseNetwork
from lightning_diffusionblocks.routing import Router


class Inference:
    """Routing, evaluation mode and the public inference calls of a block-wise module."""

    task: Any
    boundaries: Tensor
    device: torch.device
    network: BlockwiseNetwork
    ema_network: BlockwiseNetwork | None
    trained_blockwise: Tensor

    @property
    def blockwise(self) -> bool:
        """True when each noise level is served by its own group (the model was, or is being, trained block-wise)."""
        return bool(self.trained_blockwise)

    @property
    def sampling_network(self) -> BlockwiseNetwork:
        """The network inference runs: the EMA copy if the module keeps one."""
        return self.ema_network if self.ema_network is not None else self.network

    def _uniform_weights(self) -> None:
        raise NotImplementedError

    def router(self, network: BlockwiseNetwork | None = None) -> Router:
        """Noise level → the runner of its group (one entry for an end-to-end model)."""
        network = self.sampling_network if network is None else network
        boundaries = self.boundaries if self.blockwise else None
        return Router(lambda group: partial(network, group=group), self.task.noise, boundaries, self.device)

    @contextmanager
    def evaluating(self) -> Iterator[Router]:
        """Eval mode and no gradients for the sampling network (EMA if any); yields its router."""
        self._uniform_weights()
        network = self.sampling_network
        was_training = network.training
        network.eval()
        try:
            with torch.no_grad():
                yield self.router(network)
        finally:
            network.train(was_training)

    def _infer(self, call: str, *args: Any, **kwargs: Any) -> Any:
        """The task's method ``call`` with the sampling network's router, in eval mode without gradients."""
        if call not in self.task.inference:
            raise self.task.unsupported(call)
        with self.evaluating() as router:
            return getattr(self.task, call)(router, *args, **kwargs)

    def sample(self, *args: Any, **kwargs: Any) -> Tensor:
        """Generate images, each level served by its group: the task's ``sample`` (:meth:`ImageGeneration.sample`)."""
        return self._infer("sample", *args, **kwargs)

    def predict_proba(self, *args: Any, **kwargs: Any) -> Tensor:
        """Class probabilities: the task's ``predict_proba`` (:meth:`Classification.predict_proba`)."""
        return self._infer("predict_proba", *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Tensor:
        """Token ids from a language-model task's ``generate`` (:meth:`AutoregressiveLM.generate`,
        :meth:`MaskedLM.generate`); every diffusion step calls only its group."""
        return self._infer("generate", *args, **kwargs)

    def evaluate_batch(self, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        """Per-sequence metrics of one batch from a language-model task's ``evaluate_batch``
        (:meth:`AutoregressiveLM.evaluate_batch`, :meth:`MaskedLM.evaluate_batch`); a keyword left None is the task's
        default."""
        return self._infer("evaluate_batch", *args, **{k: v for k, v in kwargs.items() if v is not None})
