"""Gradient accumulation (a module option: Lightning accumulates only automatic optimisation) and the learning
rates an LR monitor reads."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.data import make_loader
from lightning_diffusionblocks.tasks import ImageGeneration
from tests.conftest import fit, image_loader, tiny_dit, trainer_kwargs


class PerSampleGeneration(ImageGeneration):
    """EDM generation whose loss draws nothing: each sample's σ and ε are functions of the sample itself, so a
    batch's loss is the mean of per-sample terms that do not depend on how the data is cut into batches."""

    def loss(self, run: Any, batch: Any, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        images, labels = self.split(batch)
        sigma = 0.3 + 0.5 * images.flatten(1).mean(1).abs()
        eps = images.flip(-1).flip(-2)
        z = images + sigma.view(-1, 1, 1, 1) * eps
        per_sample = (self.denoise(run, z, sigma, labels) - images).pow(2).flatten(1).mean(1)
        return self.noise.loss_weight(sigma) * per_sample


def make(**kwargs: Any) -> ldb.DiffusionBlocksModule:
    kwargs = {"num_blocks": 3, "lr": 1e-2, "warmup_steps": 2, "lr_schedule": "cosine", "ema_decay": 0.9,
              "gradient_clip_val": 0.5, **kwargs}  # fmt: skip
    return ldb.DiffusionBlocksModule(tiny_dit(), PerSampleGeneration(label_dropout=0.0), **kwargs)


def in_pairs() -> ldb.DiffusionBlocksStrategy:
    """The groups in order, two optimizer steps each."""
    return ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)


def test_accumulating_two_micro_batches_equals_one_batch_twice_as_large(tmp_path):
    """4 + 4 accumulated = one batch of 8: same weights, EMA, step counts, LR schedule (in optimizer steps)."""
    large, accumulated = make(), make(accumulate_grad_batches=2)
    t_large = fit(large, tmp_path / "a", steps=6, strategy=in_pairs(), loader=image_loader(n=96, batch_size=8))
    t_acc = fit(accumulated, tmp_path / "b", steps=6, strategy=in_pairs(), loader=image_loader(n=96, batch_size=4))
    assert t_large.global_step == t_acc.global_step == 6  # max_steps counts optimizer steps
    assert accumulated.group_steps.tolist() == large.group_steps.tolist() == [2, 2, 2]
    assert int(accumulated.step_count) == 6
    for (name, a), b in zip(large.state_dict().items(), accumulated.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    lr = [pg["lr"] for pg in t_large.optimizers[0].param_groups]
    assert [pg["lr"] for pg in t_acc.optimizers[0].param_groups] == pytest.approx(lr)
    # and it is not the same as not accumulating (batches of 4, one step each)
    plain = make()
    fit(plain, tmp_path / "c", steps=6, strategy=in_pairs(), loader=image_loader(n=96, batch_size=4))
    assert any(not torch.allclose(a, b) for a, b in zip(plain.network.parameters(), accumulated.network.parameters()))


def test_every_micro_batch_trains_the_same_group_with_its_own_noise(tmp_path):
    groups, seeds = [], []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            groups.append(pl_module.group_at())

    module = ldb.DiffusionBlocksModule(tiny_dit(), ImageGeneration(), num_blocks=3, accumulate_grad_batches=3)
    real = module._generator

    def spy(step: int, salt: int = 0) -> torch.Generator:
        seeds.append((step, salt))
        return real(step, salt)

    module._generator = spy
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=4, callbacks=[Spy()], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader(n=96, batch_size=4))
    assert len(groups) == 12
    assert all(len(set(groups[i : i + 3])) == 1 for i in range(0, 12, 3))  # one group per optimizer step
    assert seeds == [(s, j * ldb.module.MICRO_SALT) for s in range(4) for j in range(3)]
    assert int(module.step_count) == 4


def test_resume_from_an_accumulated_step_boundary_is_exact(tmp_path):
    """A checkpoint written at an optimizer step (ModelCheckpoint counts those) resumes bit-identically, mid-epoch
    (the package's resumable loader)."""

    def run(module: ldb.DiffusionBlocksModule, root, ckpt_path=None, callbacks=()) -> None:  # noqa: ANN001
        strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
        trainer = L.Trainer(strategy=strategy, max_steps=6, callbacks=list(callbacks),
                            **trainer_kwargs(root, enable_checkpointing=bool(callbacks)))  # fmt: skip
        data = image_loader(n=96).dataset
        trainer.fit(module, make_loader(data, batch_size=4, shuffle=True, seed=1), ckpt_path=ckpt_path)

    whole = make(accumulate_grad_batches=2)
    run(whole, tmp_path / "whole", callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3,
                                                              save_top_k=-1)])  # fmt: skip
    resumed = make(accumulate_grad_batches=2)
    run(resumed, tmp_path / "again", ckpt_path=tmp_path / "ck" / "epoch=0-step=3.ckpt")
    assert int(resumed.step_count) == 6
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_lr_monitor_reads_the_rate_the_step_uses(tmp_path):
    """What an LR monitor reads before a step (on_train_batch_start) is the rate the optimizer step uses."""
    before, used = [], []

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
            before.append([pg["lr"] for pg in trainer.optimizers[0].param_groups])

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
            used.append([pg["lr"] for pg in optimizer.param_groups])

    module = make()
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    trainer = L.Trainer(strategy=strategy, max_steps=6, callbacks=[Spy()], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader(n=96, batch_size=8))
    assert before == used
    assert before[0] == pytest.approx([1e-2 * 1 / 2] * 3)  # every group's first warmup step, not the base rate


def test_trainer_accumulation_and_clipping_name_the_module_options(tmp_path):
    for kw, option in (({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2"),
                       ({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0")):  # fmt: skip
        trainer = L.Trainer(strategy="diffusionblocks", max_steps=1, **trainer_kwargs(tmp_path, **kw))
        with pytest.raises(MisconfigurationException, match=f"DiffusionBlocksModule\\(..., {option}\\)"):
            trainer.fit(make(), image_loader())
    for bad, error in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="accumulate_grad_batches must be a positive integer"):
            make(accumulate_grad_batches=bad)
