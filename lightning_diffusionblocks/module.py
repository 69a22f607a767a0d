"""`DiffusionBlocksModule`: a LightningModule that trains a stacked-block network group by group.

Trained with ``strategy="diffusionblocks"`` each step trains the one group the strategy picked, on its
own slice of noise levels. Trained with any other strategy (``"auto"``) the same module is the
end-to-end baseline: every layer, the full noise range. One switch, same model, same data.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks.noise import Partition
from lightning_diffusionblocks.partition import BlockwiseNetwork, StemMode
from lightning_diffusionblocks.sampling import euler_sample
from lightning_diffusionblocks.schedules import step_seed
from lightning_diffusionblocks.tasks.autoregressive_lm import AutoregressiveLM
from lightning_diffusionblocks.tasks.base import Task
from lightning_diffusionblocks.tasks.classification import Classification
from lightning_diffusionblocks.tasks.image_generation import ImageGeneration
from lightning_diffusionblocks.tasks.masked_lm import MaskedLM

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops before the bad step touches any weight."""


class DiffusionBlocksModule(L.LightningModule):
    """Wrap ``net`` (a model with a block stack) and a :class:`~lightning_diffusionblocks.tasks.Task`.

    Args:
        net: the network; its block stack is found at ``block_path`` or a well-known attribute.
        task: what to learn (e.g. ``ImageGeneration()``).
        num_blocks: B, the number of groups the stack is cut into.
        group_sizes: explicit layers per group (first = highest noise); default an even split.
        stem: ``"per_group"`` (each group owns its stem/head; safe for any schedule) or ``"shared"``
            (the official code's choice; random schedule only).
        partition: how noise levels are cut: ``"equiprobable"`` (paper), ``"uniform_log"``, ``"linear"``.
        gamma: overlap of neighbouring noise ranges (paper default 0.05).
        lr, weight_decay, betas: AdamW settings (ignored when ``optimizer`` is given).
        warmup_steps, lr_schedule, min_lr_ratio: learning rate per group, counted in that group's own steps.
        gradient_clip_val: clip each group's gradient norm separately (Trainer-level clipping does not
            apply, the module optimises manually).
        ema_decay: keep an exponential moving average of the weights, used for sampling and validation.
        optimizer: ``factory(param_groups) -> Optimizer`` to replace AdamW.
        seed: seeds the noise of every step (a step is a pure function of ``(seed, global_step)``).
    """

    def __init__(
        self,
        net: nn.Module,
        task: Task,
        num_blocks: int = 3,
        group_sizes: Sequence[int] | None = None,
        block_path: str | None = None,
        stem: StemMode = "per_group",
        partition: Partition = "equiprobable",
        gamma: float = 0.05,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        min_lr_ratio: float = 0.1,
        gradient_clip_val: float | None = None,
        ema_decay: float | None = None,
        optimizer: OptimizerFactory | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(task, Task):
            raise TypeError(
                f"task must be a lightning_diffusionblocks Task (e.g. ImageGeneration()), got {type(task)}."
            )
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}.")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}.")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be positive or None, got {gradient_clip_val}.")
        self.save_hyperparameters(ignore=["net", "task", "optimizer"])
        self.automatic_optimization = False
        self.task = task
        if stem == "per_group" and getattr(net, "learn_target_embedding", False):
            raise ValueError(
                "With stem='per_group' every group owns a copy of the target embedding, so learned copies would"
                " drift into incompatible target spaces. Use stem='shared' or learn_target_embedding=False."
            )
        if isinstance(task, Classification) and stem == "per_group" and getattr(net, "learn_embedding", False):
            raise ValueError(
                "With stem='per_group' every group owns a copy of the label embedding, so learned copies would drift"
                " into incompatible target spaces. Use stem='shared' (the official code) or"
                " ConditioningAdapter(..., learn_embedding=False)."
            )
        self.network = BlockwiseNetwork(net, num_blocks, group_sizes, block_path, stem)
        self.boundaries = task.noise.boundaries(num_blocks, partition)
        self.ranges = [task.noise.group_range(self.boundaries, g, gamma) for g in range(num_blocks)]
        self.ema_network = copy.deepcopy(self.network).requires_grad_(False) if ema_decay else None
        self.optimizer_factory = optimizer
        self.register_buffer("group_steps", torch.zeros(num_blocks, dtype=torch.long))
        self.register_buffer("trained_blockwise", torch.tensor(True))
        #: group trained at the current step (set by the DiffusionBlocks strategy); None = end-to-end
        self.active_group: int | None = None
        #: the group the last training step trained (None: end-to-end), for callbacks after the step
        self.last_group: int | None = None
        self._decay_steps: list[float] = [1.0] * (num_blocks + 1)
        if isinstance(task, Classification):
            from torchmetrics.classification import MulticlassAccuracy

            self.val_accuracy = MulticlassAccuracy(num_classes=task.num_classes, average="micro")

    # ------------------------------------------------------------------ properties
    @property
    def num_blocks(self) -> int:
        return self.network.num_groups

    @property
    def blockwise(self) -> bool:
        """True while trained by a DiffusionBlocks strategy (False: end-to-end baseline)."""
        trainer = self._trainer
        if trainer is None:
            return bool(self.trained_blockwise)
        from lightning_diffusionblocks.strategy import DiffusionBlocksStrategy

        return isinstance(trainer.strategy, DiffusionBlocksStrategy)

    @property
    def sampling_network(self) -> BlockwiseNetwork:
        return self.ema_network if self.ema_network is not None else self.network

    # ------------------------------------------------------------------ optimisation
    def param_groups(self) -> list[dict[str, Any]]:
        """One optimizer param group per block group (plus the shared stem), named for LR monitors."""
        groups = [{"params": self.network.group_parameters(g), "name": f"group_{g}"} for g in range(self.num_blocks)]
        shared = self.network.shared_parameters()
        if shared:
            groups.append({"params": shared, "name": "shared"})
        return groups

    @override
    def configure_optimizers(self) -> Optimizer:
        groups = self.param_groups()
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(groups)
        else:
            hp = self.hparams
            opt = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        for group in opt.param_groups:
            group.setdefault("base_lr", group["lr"])
        return opt

    @override
    def on_fit_start(self) -> None:
        self.trained_blockwise.fill_(self.blockwise)
        if self.trainer.precision == "16-mixed" and self.hparams.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val with precision='16-mixed' is not supported; use precision='bf16-mixed'."
            )
        total = float(self.trainer.estimated_stepping_batches)
        per_group = total
        if self.blockwise:
            per_group = self.trainer.strategy.expected_steps_per_group(int(total))
        self._decay_steps = [max(per_group, 1.0)] * self.num_blocks + [max(total, 1.0)]

    def lr_factor(self, step: int, horizon: float) -> float:
        """Linear warmup, then constant or cosine decay to ``min_lr_ratio``, in a group's own steps."""
        hp = self.hparams
        if hp.warmup_steps and step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        if hp.lr_schedule == "constant":
            return 1.0
        span = max(horizon - hp.warmup_steps, 1.0)
        progress = min(max(step - hp.warmup_steps, 0) / span, 1.0)
        return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def _prepare_groups(self, opt: Optimizer, trained: Iterable[int]) -> None:
        steps = self.group_steps.tolist()
        for g in trained:
            pg = opt.param_groups[g]
            pg["lr"] = pg["base_lr"] * self.lr_factor(steps[g], self._decay_steps[g])
        if len(opt.param_groups) > self.num_blocks:  # shared stem: trained every step
            pg = opt.param_groups[self.num_blocks]
            pg["lr"] = pg["base_lr"] * self.lr_factor(self.global_step, self._decay_steps[-1])

    def _clip(self, opt: Optimizer, trained: Iterable[int]) -> None:
        clip = self.hparams.gradient_clip_val
        if not clip:
            return
        indices = list(trained) + list(range(self.num_blocks, len(opt.param_groups)))
        for i in indices:
            params = [p for p in opt.param_groups[i]["params"] if p.grad is not None]
            if params:
                torch.nn.utils.clip_grad_norm_(params, clip)

    @torch.no_grad()
    def _update_ema(self, trained: Sequence[int]) -> None:
        if self.ema_network is None:
            return
        steps = self.group_steps.tolist()
        for g in trained:
            decay = min(self.hparams.ema_decay, (1 + steps[g]) / (10 + steps[g]))
            ema, live = self.ema_network.group_parameters(g), self.network.group_parameters(g)
            torch._foreach_lerp_(ema, [p.detach() for p in live], 1.0 - decay)
        shared_ema, shared = self.ema_network.shared_parameters(), self.network.shared_parameters()
        if shared:
            decay = min(self.hparams.ema_decay, (1 + self.global_step) / (10 + self.global_step))
            torch._foreach_lerp_(shared_ema, [p.detach() for p in shared], 1.0 - decay)
        for ema_b, live_b in zip(self.ema_network.buffers(), self.network.buffers()):
            ema_b.copy_(live_b)

    # ------------------------------------------------------------------ steps
    def _generator(self, step: int, salt: int = 0) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(step_seed(self.hparams.seed + salt, step))
        return gen

    def sigma_range(self, group: int | None) -> tuple[float, float]:
        noise = self.task.noise
        return (noise.sigma_min, noise.sigma_max) if group is None else self.ranges[group]

    def group_loss(
        self,
        network: BlockwiseNetwork,
        batch: Any,
        group: int | None,
        generator: torch.Generator,
        sigma_range: tuple[float, float] | None = None,
    ) -> Tensor:
        """Mean weighted loss of ``group`` (None: whole network) on σ drawn from its range."""
        lo, hi = sigma_range or self.sigma_range(group)
        n = self.task.batch_size(batch)
        sigma = self.task.noise.sample(n, lo, hi, generator=generator, device=self.device)
        return self.task.loss(partial(network, group=group), batch, sigma, generator).mean()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        group = self.active_group
        if self.blockwise and group is None:
            raise RuntimeError("The DiffusionBlocks strategy did not pick a group for this step.")
        step = self.global_step
        opt = self.optimizers()
        loss = self.group_loss(self.network, batch, group, self._generator(step))
        if not torch.isfinite(loss):
            lo, hi = self.sigma_range(group)
            which = "the whole network (end-to-end)" if group is None else f"group {group}"
            raise NonFiniteLossError(
                f"Loss is {loss.item()} at step {step} while training {which} on sigma in [{lo:.4g}, {hi:.4g}]."
                " Training stopped before this step changed any weight; the last saved checkpoint is intact."
                " Lower `lr`, set `gradient_clip_val`, or check the data for NaNs."
            )
        trained = list(range(self.num_blocks)) if group is None else [group]
        self.last_group = group
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self._clip(opt.optimizer, trained)
        self._prepare_groups(opt.optimizer, trained)
        opt.step()
        self.group_steps[trained] += 1
        self._update_ema(trained)
        self.log("train/loss", loss.detach(), prog_bar=True)
        if group is not None:
            self.log(f"train/loss_group_{group}", loss.detach())
            self.log("group", float(group), prog_bar=True)
        return loss.detach()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Loss in each group's nominal noise range, for blockwise and end-to-end models alike."""
        losses = []
        for g in range(self.num_blocks):
            rng = (float(self.boundaries[self.num_blocks - 1 - g]), float(self.boundaries[self.num_blocks - g]))
            network_group = g if self.blockwise else None
            gen = self._generator(batch_idx, salt=1000 + g)
            loss = self.group_loss(self.sampling_network, batch, network_group, gen, sigma_range=rng)
            self.log(f"val/loss_group_{g}", loss)
            losses.append(loss)
        total = torch.stack(losses).mean()
        self.log("val/loss", total, prog_bar=True)
        if isinstance(self.task, Classification):
            inputs, labels = self.task.split(batch)
            self.val_accuracy(self.predict_proba(inputs), labels)
            self.log("val/acc", self.val_accuracy, prog_bar=True)
        if isinstance(self.task, (MaskedLM, AutoregressiveLM)):
            for name, value in self.evaluate_batch(batch, seed=batch_idx).items():
                self.log(f"val/{name}", value.mean(), prog_bar=name in ("bits_per_token", "ce_chain"))
        return total

    # ------------------------------------------------------------------ sampling
    def route(self, sigma: float) -> int | None:
        """The group that owns ``sigma`` (None when the model was trained end-to-end)."""
        groups = self.groups_of(torch.tensor([sigma], dtype=torch.float64))
        return None if groups is None else int(groups[0])

    def groups_of(self, levels: Tensor) -> Tensor | None:
        """The group owning each noise level (None when the model was trained end-to-end)."""
        if not bool(self.trained_blockwise):
            return None
        return self.task.noise.group_of(levels, self.boundaries)

    def _run_group(self, group: int | None) -> Callable[..., Any]:
        return partial(self.sampling_network, group=group)

    @torch.no_grad()
    def evaluate_batch(self, batch: Any, samples: int | None = None, steps: int | None = None, seed: int = 0) -> dict:
        """Per-sequence language-model metrics of one batch, every noise level routed to its group.

        :class:`MaskedLM`: ``nelbo`` (nats/token) and ``bits_per_token`` from ``samples`` masking times per
        sequence (default 2·B). :class:`AutoregressiveLM`: teacher-forced ``ce_sigma_max``, ``ce_chain``
        (nats/token, not perplexities) and ``accuracy_chain`` after ``steps`` σ steps (default B).
        """
        network = self.sampling_network
        was_training = network.training
        network.eval()
        try:
            if isinstance(self.task, MaskedLM):
                samples = 2 * self.num_blocks if samples is None else samples
                return self.task.evaluate(self._run_group, self.groups_of, batch, samples, seed)
            if isinstance(self.task, AutoregressiveLM):
                steps = self.num_blocks if steps is None else steps
                return self.task.evaluate(self._run_group, self.groups_of, batch, steps, seed)
            raise TypeError(f"evaluate_batch() evaluates language models; the task is {type(self.task).__name__}.")
        finally:
            network.train(was_training)

    @torch.no_grad()
    def generate(self, prompt: Tensor | Sequence[int] | None = None, steps: int | None = None, **kwargs: Any) -> Tensor:
        """Generate token ids with a language-model task; every diffusion step calls only its group.

        :class:`AutoregressiveLM`: ``generate(prompt, max_new_tokens=…, steps=B, temperature=0.0, seed=0)``
        continues ``prompt``. :class:`MaskedLM`: ``generate(prompt=None, num_samples=…, length=…, steps=…,
        temperature=1.0, seed=0)`` unmasks ``length`` tokens (the prompt, if any, fixed at the start).
        """
        network = self.sampling_network
        was_training = network.training
        network.eval()
        try:
            if isinstance(self.task, AutoregressiveLM):
                if prompt is None:
                    raise ValueError("Autoregressive generation needs a prompt of at least one token.")
                context = getattr(network.net, "context_length", None)
                if context is None:
                    raise ValueError("The network has no `context_length`; use a DiffusionLM network.")
                return self.task.generate(
                    self._run_group, self.groups_of, torch.as_tensor(prompt, device=self.device),
                    steps=self.num_blocks if steps is None else steps, context_length=context, **kwargs,
                )  # fmt: skip
            if isinstance(self.task, MaskedLM):
                if prompt is not None:
                    prompt = torch.as_tensor(prompt)
                return self.task.generate(
                    self._run_group, self.groups_of, prompt=prompt,
                    steps=4 * self.num_blocks if steps is None else steps, device=self.device, **kwargs,
                )  # fmt: skip
            raise TypeError(f"generate() generates text; the task is {type(self.task).__name__}. Use sample().")
        finally:
            network.train(was_training)

    @torch.no_grad()
    def sample(
        self,
        labels: Tensor | Sequence[int] | None = None,
        num_samples: int | None = None,
        steps: int = 50,
        guidance: float = 1.0,
        seed: int = 0,
        shape: Sequence[int] | None = None,
    ) -> Tensor:
        """Generate with group-routed Euler: each σ step calls only the group that owns it.

        ``steps`` is chosen here, independent of B and never stored. ``guidance`` > 1 turns on
        classifier-free guidance (needs ``labels``). ``shape`` is one sample's shape; by default it is
        read from the network (``channels``, ``image_size``).
        """
        if not isinstance(self.task, ImageGeneration):
            raise TypeError(f"sample() generates images; the task is {type(self.task).__name__}.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
            num_samples = labels.shape[0]
        elif guidance != 1.0:
            raise ValueError("Classifier-free guidance needs `labels`; pass labels or guidance=1.0.")
        if not num_samples:
            raise ValueError("Pass `labels` or `num_samples` to sample().")
        if shape is None:
            net = self.network.net
            if not hasattr(net, "channels") or not hasattr(net, "image_size"):
                raise ValueError("Pass `shape=(C, H, W)`: the network has no `channels`/`image_size` attributes.")
            shape = (net.channels, net.image_size, net.image_size)
        network = self.sampling_network
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sigmas = self.task.noise.inference_sigmas(steps)
        z = (torch.randn((num_samples, *shape), generator=gen) * sigmas[0].item()).to(self.device)

        def denoise(z: Tensor, sigma: Tensor, group: int | None) -> Tensor:
            return self.task.guided_denoise(partial(network, group=group), z, sigma, labels, guidance)

        was_training = network.training
        network.eval()
        try:
            return euler_sample(denoise, z, sigmas, self.route)
        finally:
            network.train(was_training)

    @torch.no_grad()
    def predict_proba(self, inputs: Tensor, steps: int | None = None, seed: int = 0) -> Tensor:
        """Class probabilities for a :class:`Classification` task; ``steps`` defaults to B (one per group)."""
        if not isinstance(self.task, Classification):
            raise TypeError(f"predict_proba() classifies; the task is {type(self.task).__name__}.")
        network = self.sampling_network
        was_training = network.training
        network.eval()
        try:
            steps = self.num_blocks if steps is None else steps
            return self.task.predict(lambda group: partial(network, group=group), self.route, inputs, steps, seed)
        finally:
            network.train(was_training)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        if isinstance(self.task, Classification):
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            return self.predict_proba(inputs, seed=batch_idx)
        labels = batch[1] if isinstance(batch, (tuple, list)) else batch
        return self.sample(labels=labels, seed=batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def partition_info(self) -> dict[str, Any]:
        return {
            "groups": self.network.groups,
            "stem": self.network.stem_mode,
            "block_path": self.network.block_path,
            "boundaries": self.boundaries.tolist(),
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diffusionblocks"] = self.partition_info()

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("diffusionblocks")
        if saved is None:
            rank_zero_warn("The checkpoint has no DiffusionBlocks partition record; loading it as is.")
            return
        mine = self.partition_info()
        for key in ("groups", "stem", "block_path"):
            if saved[key] != mine[key]:
                raise ValueError(
                    f"The checkpoint was made with {key}={saved[key]!r} but this module has {key}={mine[key]!r}."
                    f" Build the module with the checkpoint's partition (num_blocks={len(saved['groups'])},"
                    f" group_sizes={[len(g) for g in saved['groups']]}, stem={saved['stem']!r}) to resume from it."
                )
        if not torch.allclose(torch.tensor(saved["boundaries"], dtype=torch.float64), self.boundaries, rtol=1e-6):
            raise ValueError(
                f"The checkpoint's noise boundaries {saved['boundaries']} differ from this module's"
                f" {self.boundaries.tolist()}; use the same `partition` and noise schedule to resume."
            )
