"""Activation checkpointing inside the running group: same gradients, only the group's blocks run, hooks once, and
the memory monitor's activation term falls (with its step time kept per group)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor
from lightning_diffusionblocks.dashboard import group_table
from lightning_diffusionblocks.memory import (
    GroupMemory,
    SavedTensorMeter,
    checkpointed_activation_bytes,
)
from tests.conftest import fit, image_loader, make_module, tiny_dit, trainer_kwargs
from tests.fakes import unzero_linears
from tests.test_adapter import build as build_backbone
from tests.test_diffusers_models import latent_loader, needs_diffusers, wrapped
from tests.test_language import V, needs_hf, token_loader
from tests.test_language import own as own_lm

try:
    import transformers
except ImportError:
    transformers = None


def _vit(conditioning: str) -> tuple[nn.Module, ldb.tasks.Task]:
    family = "vit" if conditioning == "film" else "eva02"
    backbone = build_backbone(family, depth=3, proj_drop_rate=0.2, attn_drop_rate=0.2)  # dropout must be replayed
    net = ldb.models.ConditioningAdapter(backbone, num_classes=4, learn_embedding=False, conditioning=conditioning)
    return unzero_linears(net), ldb.tasks.Classification(4)  # leave zero initialisation: conditioning paths matter


def _gpt2() -> tuple[nn.Module, ldb.tasks.Task]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=V + 1, n_positions=32, n_embd=32, n_layer=3, n_head=2,
        resid_pdrop=0.2, embd_pdrop=0.0, attn_pdrop=0.2, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return ldb.models.DecoderAdapter(transformers.GPT2Model(config), V, "masked"), ldb.tasks.MaskedLM(V)


def _classification_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)


FAMILIES = {
    "dit": (lambda: (tiny_dit(depth=3), ldb.tasks.ImageGeneration()), lambda: next(iter(image_loader(n=8)))),
    "transformer-lm": (lambda: (own_lm("masked"), ldb.tasks.MaskedLM(V)), lambda: next(iter(token_loader(n=8)))),
    "adapter-film-dropout": (lambda: _vit("film"), _classification_batch),
    "adapter-adaln-dropout": (lambda: _vit("adaln_zero"), _classification_batch),
    "hf-gpt2-dropout": (_gpt2, lambda: next(iter(token_loader(n=8)))),
    "diffusers-dit": (lambda: (wrapped("dit"), ldb.tasks.ImageGeneration()), lambda: next(iter(latent_loader("dit")))),
    "diffusers-flux-seam": (lambda: (wrapped("flux"), ldb.tasks.FlowMatching()),
                            lambda: next(iter(latent_loader("flux")))),
}  # fmt: skip
MARKS = {"hf-gpt2-dropout": needs_hf, "diffusers-dit": needs_diffusers, "diffusers-flux-seam": needs_diffusers}


def _gradients(module: ldb.DiffusionBlocksModule, batch: Any, group: int, every: int | None) -> list[Tensor]:
    module.network.checkpoint_every = every
    module.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the dropout masks: the same stream for every option
    module.group_loss(module.network, batch, group, module._generator(0)).backward()
    return [p.grad.clone() for p in module.network.group_parameters(group) if p.grad is not None]


@pytest.mark.parametrize("family", [pytest.param(f, marks=MARKS.get(f, ())) for f in FAMILIES])
def test_gradients_equal_those_without_checkpointing(family: str) -> None:
    """Every family, dropout replayed: checkpointing every block or every 2nd gives the plain gradients; the group
    of two blocks has one checkpointed and one plain with every=2. Only the running group's blocks run."""
    make, batch = FAMILIES[family]
    net, task = make()
    module = ldb.DiffusionBlocksModule(net, task, num_blocks=2).train()
    data = batch()
    task.observe(data)
    blocks = list(module.network.stack._modules.values())
    events: list[tuple[int, int]] = []  # (block, sublayer) of every sublayer call: they run in the recomputation too
    for index, block in enumerate(blocks):
        for name, sub in block.named_modules():
            if name and not name.startswith("noise_modulation") and not list(sub.children()):
                sub.register_forward_hook(lambda m, *_, i=index: events.append((i, id(m))))
    plain = _gradients(module, data, 0, None)
    assert plain
    assert any(g.abs().sum() > 0 for g in plain)
    assert {i for i, _ in events} == {0, 1}, "only group 0's blocks run"
    first = {i: next(m for j, m in events if j == i) for i in (0, 1)}  # each block's first sublayer to run

    def calls() -> dict[int, int]:
        return {i: sum(1 for event in events if event == (i, first[i])) for i in (0, 1)}

    once = calls()
    for every, recomputed in ((1, {0, 1}), (2, {0})):
        events.clear()
        grads = _gradients(module, data, 0, every)
        assert {i for i, _ in events} == {0, 1}, "only group 0's blocks run, in the recomputation too"
        now = calls()  # a recomputation runs the block again, up to its last saved tensor (early stop)
        assert all(once[i] < now[i] <= 2 * once[i] if i in recomputed else now[i] == once[i] for i in (0, 1)), every
        assert len(grads) == len(plain)
        for got, want in zip(grads, plain):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert all("forward" not in block.__dict__ for block in blocks), "blocks are left as they were"


def test_hooks_run_once_and_only_training_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward hooks run once per block call (never in the recomputation); without gradients (evaluation,
    sampling) no checkpoint is made."""
    from lightning_diffusionblocks import activation_checkpointing

    made: list[int] = []
    real = activation_checkpointing.checkpoint
    monkeypatch.setattr(activation_checkpointing, "checkpoint", lambda *a, **k: made.append(1) or real(*a, **k))
    module = make_module(depth=4, num_blocks=2, activation_checkpointing="every")
    blocks = list(module.network.stack._modules.values())
    called: Counter[int] = Counter()
    for index, block in enumerate(blocks):
        block.register_forward_hook(lambda *_, i=index: called.update([i]))
    module.group_loss(module.network, next(iter(image_loader(n=4))), 1, module._generator(0)).backward()
    assert dict(called) == {2: 1, 3: 1}, "hooks run once per block call, never in the recomputation"
    assert len(made) == 2
    with torch.no_grad():
        module.network(torch.zeros(2, 1, 8, 8), torch.zeros(2), torch.zeros(2, dtype=torch.long), group=0)
    assert len(made) == 2, "no checkpoint without gradients"
    assert dict(called) == {0: 1, 1: 1, 2: 1, 3: 1}


@pytest.mark.parametrize("bad", ["all", 0, -2, True, 1.5, "2"])
def test_bad_checkpointing_options_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"activation_checkpointing=.*\"every\".*positive int"):
        make_module(activation_checkpointing=bad)


def _saved_per_block(module: ldb.DiffusionBlocksModule, batch: Any, group: int) -> tuple[list[int], list[int], int]:
    """(bytes each block of ``group`` saves, bytes of its tensor inputs, bytes saved before the blocks) in a plain
    forward, each storage counted where it is first seen (the conditioning every block takes: in the first block)."""
    module.network.checkpoint_every = None
    params = list(module.parameters())
    per_block: list[int] = []
    inputs: list[int] = []
    meters: list[SavedTensorMeter] = []
    seen: set[int] = set()
    before: list[int] = []

    def enter(_: nn.Module, args: tuple) -> None:
        if not per_block:
            before.append(outer.bytes)
        now = seen | outer.storages
        new = {a.untyped_storage().data_ptr(): a.untyped_storage().nbytes() for a in args if isinstance(a, Tensor)}
        inputs.append(sum(n for ptr, n in new.items() if ptr not in now))
        meter = SavedTensorMeter(exclude=params)
        meter.storages = set(now)
        meters.append(meter.__enter__())

    def leave(*_: Any) -> None:
        meter = meters.pop()
        meter.__exit__(None, None, None)
        per_block.append(meter.bytes)
        seen.update(meter.storages)

    handles = [h for b in module.network.block_modules(group)
               for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]  # fmt: skip
    with SavedTensorMeter(exclude=params) as outer:
        module.group_loss(module.network, batch, group, module._generator(0))
    for h in handles:
        h.remove()
    return per_block, inputs, before[0]


def test_meter_counts_checkpoint_inputs_and_the_largest_recomputation() -> None:
    """What the meter sees under a checkpoint, and the plan's formula against it: a plain meter sees only the
    checkpointed blocks' inputs; ``held`` adds the largest block's recomputation; both equal the formula."""
    module = make_module(depth=6, num_blocks=2)
    batch = next(iter(image_loader(n=16)))
    per_block, inputs, before = _saved_per_block(module, batch, 1)
    assert len(per_block) == 3
    assert min(per_block) > max(inputs) > 0
    held: dict[int | None, int] = {}
    after = 0
    for every in (None, 2, 1):
        module.network.checkpoint_every = every
        with SavedTensorMeter(exclude=module.parameters()) as meter:
            module.group_loss(module.network, batch, 1, module._generator(0))
        held[every] = meter.held
        if every is None:
            after = meter.bytes - before - sum(per_block)  # the head and the loss
        assert meter.held == checkpointed_activation_bytes(per_block, inputs, every, before, after), every
        if every == 1:  # the saved-tensor hooks alone see the inputs the checkpoint keeps, not the activations
            assert meter.bytes == before + sum(inputs) + after
            assert meter.recomputed == max(per_block) - inputs[0]
    assert held[1] < held[2] < held[None]
    # the formula by hand: blocks 0 and 2 checkpointed with every=2
    a, x = [100, 90, 80], [10, 10, 10]
    assert checkpointed_activation_bytes(a, x, None) == 270
    assert checkpointed_activation_bytes(a, x, 2) == 10 + 90 + 80  # block 2's recomputation after blocks 0, 1
    assert checkpointed_activation_bytes(a, x, 1) == 100
    assert checkpointed_activation_bytes(a, x, 1, before=5, after=75) == 5 + 30 + 75  # backward's start is larger
    assert checkpointed_activation_bytes(a, x, 1, before=5, after=7) == 5 + 100
    with pytest.raises(ValueError, match="one of each"):
        checkpointed_activation_bytes(a, x[:2], 1)


def test_monitor_shows_activations_falling_and_keeps_step_time(tmp_path: Path) -> None:
    """Same model and batches: the monitor's activation term per group is smaller with every block checkpointed
    than with every 2nd, smaller than without; each group's mean step time is recorded and shown in the table;
    the option survives a checkpoint and a resumed fit."""
    activations: dict[Any, list[int]] = {}
    extra: set[int] = set()
    for option in (None, 2, "every"):
        module = make_module(depth=6, num_blocks=2, activation_checkpointing=option)
        monitor = BlockMemoryMonitor(log=False)
        fit(module, tmp_path, steps=2, strategy="diffusionblocks_sequential", callbacks=[monitor])  # a step each
        activations[option] = [monitor.groups[str(g)].activations for g in range(2)]
        for g in range(2):  # what the graph holds: the checkpointed blocks' inputs and the largest recomputation
            with SavedTensorMeter(exclude=module.parameters()) as meter:
                module.group_loss(module.network, next(iter(image_loader())), g, module._generator(0))
            extra.add(activations[option][g] - meter.held)  # the step's own few bytes (its loss scaling) at most
        assert all(monitor.groups[str(g)].step_time > 0 for g in range(2))
    assert all(0 <= e < 64 for e in extra), extra  # (none where a recomputation, before the loss, is the peak)
    for g in range(2):
        assert activations["every"][g] < activations[2][g] < activations[None][g], activations
    columns, rows = group_table(module, monitor.group_memory())
    times = [row[columns.index("step_time_s")] for row in rows]
    assert times == [pytest.approx(monitor.groups[str(g)].step_time, abs=1e-6) for g in range(2)]
    assert "step s" in monitor.table()
    # an old monitor state (no step time) still loads
    old = {name: {k: v for k, v in vars(m).items() if k != "step_time"} for name, m in monitor.groups.items()}
    monitor.load_state_dict(old)
    assert monitor.groups["0"] == GroupMemory(**old["0"])
    # the option is plain data in hparams, rebuilt by load_from_checkpoint, and a second fit resumes with it
    trainer = fit(make_module(depth=6, num_blocks=2, activation_checkpointing="every"), tmp_path, steps=2)
    path = tmp_path / "every.ckpt"
    trainer.save_checkpoint(path)
    loaded = ldb.DiffusionBlocksModule.load_from_checkpoint(path)
    assert loaded.hparams.activation_checkpointing == "every"
    assert loaded.network.checkpoint_every == 1
    resumed = L.Trainer(strategy="diffusionblocks", max_steps=3, **trainer_kwargs(tmp_path))
    resumed.fit(loaded, image_loader(), ckpt_path=path)
    assert int(loaded.step_count) == 3
