"""Autoregressive language modelling with DiffusionBlocks: each next token is denoised in B steps.

Training (paper §5.4, App. B): the target of position i is the L2-normalised embedding e(x_i), noised to
z_i = e(x_i) + σε; the network sees the clean tokens and all noisy targets at once (clean‖noisy layout,
a noisy token attends to the clean tokens before it) and reads out logits; the loss is the σ-weighted
cross-entropy. Generation: for every new token, start from z ~ N(0, σ_max²), walk the σ grid (default B
steps, one per group) with Euler steps toward softmax(logits)·E, and decode the last step's logits
greedily or with a temperature.

Evaluation reports teacher-forced cross-entropies: at σ_max (the first group's prediction from the
context alone) and after the whole sampling chain (the distribution the sampler draws from). Neither is
a perplexity: the model defines no likelihood, and the chain's distribution depends on its noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.levels import append_dims
from lightning_diffusionblocks.noise import EDM, NoiseSchedule
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import LogitsAt, check_integer, embedding_chain
from lightning_diffusionblocks.tasks.base import Preview, Task
from lightning_diffusionblocks.tasks.masked_lm import check_language_model, token_batch

Weighting = Literal["per_sample", "batch_mean", "none"]


class AutoregressiveLM(Task):
    """Batches are (N, L) token ids; the network is a
    :class:`~lightning_diffusionblocks.models.diffusion_lm.DiffusionLM` with ``objective="autoregressive"``.

    ``weighting`` as in :class:`~lightning_diffusionblocks.tasks.Classification`: ``"per_sample"`` is the
    paper's w(σ)·CE.
    """

    inference = ("evaluate_batch", "generate")
    progress_metrics = ("ce_chain",)

    def __init__(self, vocab_size: int, noise: NoiseSchedule = EDM, weighting: Weighting = "per_sample") -> None:
        super().__init__(noise)
        self.noise: NoiseSchedule = noise
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
        if weighting not in ("per_sample", "batch_mean", "none"):
            raise ValueError(f"weighting must be 'per_sample', 'batch_mean' or 'none', got {weighting!r}.")
        self.vocab_size, self.weighting = vocab_size, weighting
        self.context_length: int | None = None

    def bind(self, net: nn.Module) -> None:
        check_language_model(net, self.vocab_size, "autoregressive")
        self.context_length = getattr(net, "context_length", None)

    def batch_size(self, batch: Any) -> int:
        return token_batch(batch, self.vocab_size).shape[0]

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        tokens = token_batch(batch, self.vocab_size)
        targets = run(mode="embeddings")[tokens]
        eps = torch.randn(targets.shape, generator=generator, device=generator.device).to(targets)
        z = targets + append_dims(sigma, targets.ndim).to(targets) * eps
        logits = run(tokens, z, level=sigma, sigma_data=self.noise.sigma_data)
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none").mean(1)
        if self.weighting == "per_sample":
            return self.noise.loss_weight(sigma).to(ce.device) * ce
        if self.weighting == "batch_mean":
            return self.noise.loss_weight(sigma).mean().to(ce.device) * ce
        return ce

    def _denoise_chain(
        self, router: Router, logits_at: LogitsAt, shape: tuple[int, ...], steps: int, seed: int
    ) -> Iterator[tuple[float, Tensor]]:
        """The label-embedding chain (:func:`~lightning_diffusionblocks.sampling.embedding_chain`) for noisy
        targets of ``shape`` (…, D) over ``steps`` σ steps; yields every step's (σ, logits)."""
        check_integer(steps, "steps", "generate")
        check_integer(seed, "seed", "generate")
        if steps < 1:
            raise ValueError(f"Generation needs at least 1 diffusion step per token, got steps={steps}.")
        sigmas = self.noise.equiprobable_grid(steps).tolist()
        return embedding_chain(router.at, logits_at, shape, sigmas, seed, router.device)

    @torch.no_grad()
    def evaluate_batch(self, router: Router, batch: Any, steps: int | None = None, seed: int = 0) -> dict[str, Tensor]:
        """Teacher-forced per-sequence cross-entropy (nats/token) at σ_max and after the ``steps``-step
        chain (default B), the chain's greedy next-token accuracy, and that accuracy after each step i
        (``accuracy_step_{i}``: how far along the chain the prediction settles). Every position is denoised in
        parallel; position i is predicted from tokens[:, :i], so position 0 from no context."""
        steps = router.num_groups if steps is None else steps
        tokens = token_batch(batch, self.vocab_size)
        dim = router.at(self.noise.sigma_max)(mode="embeddings").shape[1]
        sd = self.noise.sigma_data

        def call(run: Runner, z: Tensor, sigma: Tensor) -> Tensor:
            return run(tokens, z, level=sigma, sigma_data=sd)

        shape = (*tokens.shape, dim)
        accuracy = lambda logits: (logits.argmax(-1) == tokens).float().mean(1)  # noqa: E731
        per_step, first, last = [], None, torch.empty(0)
        for _, last in self._denoise_chain(router, call, shape, steps, seed):
            first = last if first is None else first
            per_step.append(accuracy(last))
        assert first is not None
        ce = lambda logits: F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)  # noqa: E731
        metrics = {"ce_sigma_max": ce(first), "ce_chain": ce(last), "accuracy_chain": accuracy(last)}
        return metrics | {f"accuracy_step_{i}": value for i, value in enumerate(per_step)}

    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return {name: value.mean() for name, value in self.evaluate_batch(router, batch, seed=batch_idx).items()}

    def predict_step(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per-sequence teacher-forced metrics of a batch of token ids (see :meth:`evaluate_batch`)."""
        return self.evaluate_batch(router, batch, seed=batch_idx)

    def preview(
        self,
        router: Router,
        batch: Any,
        num_samples: int = 4,
        prompt_length: int = 16,
        max_new_tokens: int = 48,
        steps: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Preview:
        """Continuations of the first ``prompt_length`` tokens of ``batch``'s first ``num_samples`` sequences."""
        tokens = token_batch(batch, self.vocab_size)[:num_samples]
        limit = tokens.shape[1] if self.context_length is None else min(tokens.shape[1], self.context_length - 1)
        prompt_length = max(1, min(prompt_length, limit))
        steps = router.num_groups if steps is None else steps
        ids = self.generate(
            router, tokens[:, :prompt_length], max_new_tokens=max_new_tokens, steps=steps, temperature=temperature,
            seed=seed,
        )  # fmt: skip
        caption = f"AutoregressiveLM: prompt of {prompt_length} tokens | {max_new_tokens} generated, {steps} steps each"
        return Preview(tokens=ids.tolist(), prompt_length=prompt_length, caption=caption)

    @torch.no_grad()
    def generate(
        self,
        router: Router,
        prompt: Tensor | None = None,
        max_new_tokens: int = 32,
        steps: int | None = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Tensor:
        """Continue ``prompt`` ((L,) or (N, L) ids) by ``max_new_tokens`` tokens, each denoised in ``steps``
        σ steps (default B) by the groups that own them. ``temperature`` 0 decodes greedily (the paper)."""
        if prompt is None:
            raise ValueError("Autoregressive generation needs a prompt of at least one token.")
        check_integer(seed, "seed", "generate")  # before it seeds anything: torch's own error names no argument
        context_length = self.context_length
        if context_length is None:
            raise ValueError("The network has no `context_length`; use a DiffusionLM network.")
        steps = router.num_groups if steps is None else steps
        prompt = torch.as_tensor(prompt, device=router.device)
        if prompt.ndim == 1:
            prompt = prompt[None]
        if prompt.ndim != 2 or prompt.shape[1] == 0:
            raise ValueError("The prompt is empty; generation needs at least one token to condition on.")
        x = token_batch(prompt, self.vocab_size)
        if x.shape[1] >= context_length:
            raise ValueError(
                f"The prompt has {x.shape[1]} tokens but the model's context holds {context_length} positions"
                " (prompt + the token being generated). Shorten the prompt."
            )
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dim = router.at(self.noise.sigma_max)(mode="embeddings").shape[1]
        sd = self.noise.sigma_data
        for i in range(max_new_tokens):
            context = x[:, -(context_length - 1) :]

            def call(run: Runner, z: Tensor, sigma: Tensor, context: Tensor = context) -> Tensor:
                return run(context, z, level=sigma, sigma_data=sd, mode="next")

            *_, (_, logits) = self._denoise_chain(router, call, (x.shape[0], 1, dim), steps, seed * 1_000_003 + i)
            logits = logits[:, 0]
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1).cpu(), 1, generator=gen)[:, 0]
            x = torch.cat([x, nxt.view(-1, 1).to(x.device)], dim=1)
        return x
