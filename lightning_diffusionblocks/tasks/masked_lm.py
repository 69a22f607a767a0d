"""Masked-diffusion language modelling (absorbing state, MD4's linear schedule) trained block-wise.

At time t every token is replaced by the mask token with probability 1 − α(t) = t. The loss is the
continuous-time ELBO: (1/t) × the cross-entropy summed over masked positions, per token of the sequence.
Groups own equal drops of α (t_b = b/B), each t is routed to its group in training, evaluation and
sampling alike. The ELBO's integral over [0, 1] is the sum of the groups' integrals, so the bound
reported here is a real bound on the block-wise model's negative log-likelihood.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_diffusionblocks.levels import append_dims
from lightning_diffusionblocks.masking import LINEAR_MASKING, MaskingSchedule
from lightning_diffusionblocks.routing import Router, Runner
from lightning_diffusionblocks.sampling import check_integer
from lightning_diffusionblocks.tasks.base import Preview, Task


def token_batch(batch: Any, vocab_size: int) -> Tensor:
    """The (N, L) token ids of a batch (a tensor, or a tuple/list whose first item is one), checked."""
    tokens = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype not in (torch.int64, torch.int32):
        shape = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"Language-model batches must be (N, L) integer token ids, got {shape}.")
    if tokens.numel():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"Token ids must be in [0, {vocab_size}); the batch has ids in [{lo}, {hi}]."
                " Build the task and the model with the tokenizer's vocab_size."
            )
    return tokens.long()


def check_language_model(net: nn.Module, vocab_size: int, objective: str) -> None:
    """Refuse a network that is not a DiffusionBlocks language model of this objective and vocabulary."""
    declared = getattr(net, "objective", None)
    if declared is not None and declared != objective:
        raise ValueError(
            f"The network was built with objective={declared!r} but the task trains objective={objective!r};"
            f" build it with objective={objective!r}."
        )
    size = getattr(net, "vocab_size", None)
    if isinstance(size, int) and size != vocab_size:
        raise ValueError(f"The network reads out {size} tokens but the task has vocab_size={vocab_size}; use one.")


class MaskedLM(Task):
    """Batches are (N, L) token ids in [0, vocab_size); the network is called ``net(tokens, level=t)``
    with masked positions holding id ``vocab_size`` and returns logits (N, L, vocab_size)."""

    inference = ("evaluate_batch", "generate")
    progress_metrics = ("bits_per_token",)

    def __init__(self, vocab_size: int, noise: MaskingSchedule = LINEAR_MASKING) -> None:
        super().__init__(noise)
        self.noise: MaskingSchedule = noise
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}.")
        self.vocab_size = vocab_size
        self.context_length: int | None = None

    def bind(self, net: nn.Module) -> None:
        check_language_model(net, self.vocab_size, "masked")
        self.context_length = getattr(net, "context_length", None)

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def batch_size(self, batch: Any) -> int:
        return token_batch(batch, self.vocab_size).shape[0]

    def corrupt(self, tokens: Tensor, t: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(noisy tokens, mask): each token masked independently with probability t of its sequence."""
        u = torch.rand(tokens.shape, generator=generator, device=generator.device).to(tokens.device)
        masked = u < append_dims(t, u.ndim).to(u)
        return torch.where(masked, torch.full_like(tokens, self.mask_id), tokens), masked

    def elbo_terms(self, run: Runner, tokens: Tensor, t: Tensor, generator: torch.Generator) -> Tensor:
        """Per-sequence ELBO integrand at t, in nats per token: (1/t)·Σ_masked CE / L."""
        noisy, masked = self.corrupt(tokens, t, generator)
        logits = run(noisy, level=t)
        ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")
        return self.noise.loss_weight(t.to(ce.device)) * (ce * masked).sum(1) / tokens.shape[1]

    def loss(self, run: Runner, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
        return self.elbo_terms(run, token_batch(batch, self.vocab_size), sigma, generator)

    @torch.no_grad()
    def evaluate_batch(
        self, router: Router, batch: Any, samples: int | None = None, seed: int = 0
    ) -> dict[str, Tensor]:
        """Negative ELBO per sequence (nats/token) and bits per token, from ``samples`` stratified t per
        sequence (slice k of [t_min, 1] in round k; default 2·B), each routed to the group that owns it."""
        samples = 2 * router.num_groups if samples is None else samples
        if samples < 1:
            raise ValueError(f"The ELBO estimate needs at least 1 masking time per sequence, got samples={samples}.")
        tokens = token_batch(batch, self.vocab_size)
        n = tokens.shape[0]
        gen = torch.Generator(device=tokens.device).manual_seed(seed)
        lo = self.noise.level_min
        total = torch.zeros(n, device=tokens.device)
        for k in range(samples):
            u = torch.rand(n, generator=gen, device=tokens.device)
            t = lo + (k + u) / samples * (1.0 - lo)
            for rows, run in router.split(t):
                total[rows] += self.elbo_terms(run, tokens[rows], t[rows], gen)
        nelbo = total / samples
        return {"nelbo": nelbo, "bits_per_token": nelbo / math.log(2)}

    def validation_metrics(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return {name: value.mean() for name, value in self.evaluate_batch(router, batch, seed=batch_idx).items()}

    def predict_step(self, router: Router, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Per-sequence ELBO metrics of a batch of token ids (see :meth:`evaluate_batch`)."""
        return self.evaluate_batch(router, batch, seed=batch_idx)

    def preview(
        self,
        router: Router,
        batch: Any,
        num_samples: int = 4,
        length: int | None = None,
        steps: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> Preview:
        """``num_samples`` unconditional sequences as long as ``batch``'s (or ``length``), by ancestral unmasking."""
        length = token_batch(batch, self.vocab_size).shape[1] if length is None else length
        if self.context_length is not None:
            length = min(length, self.context_length)
        steps = 4 * router.num_groups if steps is None else steps
        ids = self.generate(
            router, num_samples=num_samples, length=length, steps=steps, temperature=temperature, seed=seed
        )
        caption = f"MaskedLM: unconditional samples, {length} tokens, {steps} unmasking steps"
        return Preview(tokens=ids.tolist(), caption=caption)

    @torch.no_grad()
    def generate(
        self,
        router: Router,
        prompt: Tensor | None = None,
        num_samples: int = 1,
        length: int | None = None,
        steps: int | None = None,
        temperature: float = 1.0,
        seed: int = 0,
    ) -> Tensor:
        """Ancestral unmasking: from all-masked at t=1 to t=0 in ``steps`` model calls; each call goes to
        the group that owns its t, and every masked token is revealed with probability (t − s)/t.

        ``prompt`` (1-D ids) fixes the first tokens; ``length`` defaults to the network's context length,
        ``steps`` to 4·B; ``temperature`` 0 takes the most likely token.
        """
        steps = 4 * router.num_groups if steps is None else steps
        length = self.context_length if length is None else length
        if length is None:
            raise ValueError("Pass length=<number of tokens>: the network declares no context_length.")
        device = router.device
        check_integer(steps, "steps", "generate")
        check_integer(seed, "seed", "generate")
        check_integer(num_samples, "num_samples", "generate")
        check_integer(length, "length", "generate")
        if steps < 1:
            raise ValueError(f"Generation needs at least 1 step, got steps={steps}.")
        if num_samples < 1 or length < 1:
            raise ValueError(f"num_samples and length must be >= 1, got {num_samples} and {length}.")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}.")
        x = torch.full((num_samples, length), self.mask_id, dtype=torch.long, device=device)
        if prompt is not None:
            if torch.as_tensor(prompt).numel() == 0:
                raise ValueError("The prompt is empty; pass prompt=None for unconditional generation.")
            prompt = token_batch(torch.as_tensor(prompt).view(1, -1), self.vocab_size)[0]
            if prompt.numel() > length:
                raise ValueError(f"The prompt has {prompt.numel()} tokens, more than length={length}.")
            x[:, : prompt.numel()] = prompt.to(device)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        grid = self.noise.grid(steps).tolist()
        for t, s in zip(grid[:-1], grid[1:]):
            level = torch.full((num_samples,), t, device=device)
            logits = router.at(t)(x, level=level).float()
            if temperature == 0:
                proposal = logits.argmax(-1)
            else:
                probs = (logits / temperature).softmax(-1).cpu()
                proposal = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=gen).view(x.shape)
            reveal = torch.rand(x.shape, generator=gen) < (t - s) / t
            masked = x == self.mask_id
            x = torch.where(masked & reveal.to(device), proposal.to(device), x)
        return x
