"""The strategy: registration, devices, schedules, what changes in a step, and refused combinations."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.schedules import RandomSchedule, SequentialSchedule
from tests.conftest import image_loader, make_module, tiny_dit, trainer_kwargs


def snapshot(module: ldb.DiffusionBlocksModule) -> dict[int, list[torch.Tensor]]:
    return {g: [p.detach().clone() for p in module.network.group_parameters(g)] for g in range(module.num_blocks)}


class StepRecorder(Callback):
    """Records, for every step, the group trained and which groups' parameters changed."""

    def __init__(self) -> None:
        self.records: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self.before = snapshot(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        after = snapshot(pl_module)
        changed = [g for g in after if any(not torch.equal(a, b) for a, b in zip(self.before[g], after[g]))]
        self.records.append((trainer.strategy.select_group(trainer.global_step - 1), changed))


def test_registered_by_import():
    assert "diffusionblocks" in StrategyRegistry
    assert StrategyRegistry["diffusionblocks_sequential"]["init_params"] == {"schedule": "sequential"}
    trainer = L.Trainer(strategy="diffusionblocks", accelerator="cpu", devices=1, logger=False)
    assert isinstance(trainer.strategy, ldb.DiffusionBlocksStrategy)
    assert trainer.strategy.root_device == torch.device("cpu")


def test_gpu_accelerator_gets_a_cuda_root_device(monkeypatch):
    """The single-device `parallel_devices` pitfall: a string-built strategy must not stay on the CPU."""
    import lightning.fabric.accelerators.cuda as fabric_cuda
    import lightning.pytorch.accelerators.cuda as pl_cuda

    monkeypatch.setattr(fabric_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(pl_cuda, "num_cuda_devices", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trainer = L.Trainer(strategy="diffusionblocks", accelerator="gpu", devices=[1], logger=False)
    assert trainer.strategy.root_device == torch.device("cuda", 1)
    two = L.Trainer(strategy="diffusionblocks", accelerator="gpu", devices=2, logger=False).strategy
    assert [d.index for d in two.parallel_devices] == [0, 1]  # data parallel over both


def test_schedules_are_pure_functions_of_step():
    a, b = RandomSchedule(3, seed=7), RandomSchedule(3, seed=7)
    seq = [a.group_at(s) for s in range(3000)]
    assert seq == [b.group_at(s) for s in range(3000)]
    assert seq != [RandomSchedule(3, seed=8).group_at(s) for s in range(3000)]
    counts = torch.tensor(seq).bincount(minlength=3)
    assert (counts > 900).all()  # uniform: ~1000 each
    phased = SequentialSchedule(3, steps_per_phase=5)
    assert [phased.group_at(s) for s in range(16)] == [0] * 5 + [1] * 5 + [2] * 6
    subset = RandomSchedule(4, seed=0, groups=[1, 3])
    assert {subset.group_at(s) for s in range(100)} == {1, 3}
    with pytest.raises(ValueError, match="outside"):
        RandomSchedule(3, groups=[3])


@pytest.mark.parametrize(
    ("stem", "schedule", "weight_decay"),
    [("per_group", "random", 0.1), ("shared", "random", 0.1), ("per_group", "sequential", 0.0)],
)
def test_each_schedule_changes_only_the_active_group(tmp_path, stem, schedule, weight_decay):
    module = make_module(depth=6, stem=stem, weight_decay=weight_decay)
    recorder = StepRecorder()
    strategy = ldb.DiffusionBlocksStrategy(schedule=schedule, steps_per_phase=3)
    trainer = L.Trainer(strategy=strategy, max_steps=9, callbacks=[recorder], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    assert len(recorder.records) == 9
    for group, changed in recorder.records:
        assert changed == [group], f"group {group} trained but {changed} changed"
    trained = [g for g, _ in recorder.records]
    assert module.group_steps.tolist() == [trained.count(g) for g in range(3)]
    if schedule == "sequential":
        assert trained == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_end_to_end_with_auto_trains_every_group(tmp_path):
    module = make_module(depth=6)
    trainer = L.Trainer(strategy="auto", max_steps=4, **trainer_kwargs(tmp_path))
    before = snapshot(module)
    trainer.fit(module, image_loader())
    after = snapshot(module)
    assert module.group_steps.tolist() == [4, 4, 4]
    assert not bool(module.trained_blockwise)
    for g in range(3):
        assert any(not torch.equal(a, b) for a, b in zip(before[g], after[g]))


class SpyNoise(ldb.NoiseSchedule):
    """The EDM schedule, recording every σ it draws for training."""

    drawn: list[tuple[float, float]] = []

    def sample(self, n, lo=None, hi=None, generator=None, device="cpu"):  # noqa: ANN001, ANN201
        out = super().sample(n, lo, hi, generator=generator, device=device)
        SpyNoise.drawn.append((float(out.min()), float(out.max())))
        return out


def test_each_step_draws_sigma_from_its_group_range(tmp_path):
    SpyNoise.drawn.clear()
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(noise=SpyNoise()), num_blocks=3)
    recorder = StepRecorder()
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=12, callbacks=[recorder], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    assert len(SpyNoise.drawn) == 12
    for (group, _), (lo, hi) in zip(recorder.records, SpyNoise.drawn):
        rlo, rhi = module.ranges[group]
        assert rlo * (1 - 1e-6) <= lo
        assert hi <= rhi * (1 + 1e-6)


def test_shared_stem_with_phases_is_refused(tmp_path):
    trainer = L.Trainer(strategy="diffusionblocks_sequential", max_steps=6, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="stem='per_group'"):
        trainer.fit(make_module(depth=6, stem="shared"), image_loader())
    strategy = ldb.DiffusionBlocksStrategy(groups_to_train=[0])
    trainer = L.Trainer(strategy=strategy, max_steps=6, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="stem='per_group'"):
        trainer.fit(make_module(depth=6, stem="shared"), image_loader())


def test_sequential_without_phase_length_is_refused(tmp_path):
    trainer = L.Trainer(strategy="diffusionblocks_sequential", max_epochs=1, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="steps_per_phase"):
        trainer.fit(make_module(depth=6), image_loader())


def test_strategy_refuses_a_plain_lightning_module(tmp_path):
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match="DiffusionBlocksModule\\(net"):
        trainer.fit(BoringModel())


def test_module_argument_errors():
    with pytest.raises(ValueError, match="larger than the network's 6 layers"):
        make_module(depth=6, num_blocks=7)
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        make_module(depth=6, num_blocks=0)
    with pytest.raises(ValueError, match="sum to 5"):
        make_module(depth=6, group_sizes=[1, 2, 2])
    with pytest.raises(TypeError, match="Task"):
        ldb.DiffusionBlocksModule(tiny_dit(), task="image")


class PoisonAt(Callback):
    """Turns the batch into NaNs at one step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    module = make_module(depth=6)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    kwargs = trainer_kwargs(tmp_path, enable_checkpointing=True)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=10, callbacks=[ckpt, PoisonAt(4)], **kwargs)
    with pytest.raises(ldb.NonFiniteLossError, match=r"at step 4 while training group \d on sigma in \["):
        trainer.fit(module, image_loader(n=320, batch_size=16))
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files[-1] == "epoch=0-step=4.ckpt"
    state = torch.load(tmp_path / "ckpt" / files[-1], weights_only=False)
    assert state["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_checkpoint_with_another_partition_is_refused(tmp_path):
    module = make_module(depth=6)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    other = make_module(depth=6, num_blocks=2)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=4, **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match="num_blocks=3"):
        trainer.fit(other, image_loader(), ckpt_path=path)
    # the same partition resumes
    again = make_module(depth=6)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=4, **trainer_kwargs(tmp_path))
    trainer.fit(again, image_loader(), ckpt_path=path)
    assert trainer.global_step == 4
    assert int(again.group_steps.sum()) == 4


def test_learning_rate_schedule_counts_each_group_own_steps(tmp_path):
    module = make_module(depth=6, lr=1e-2, warmup_steps=4, lr_schedule="cosine", min_lr_ratio=0.1)
    seen: dict[int, list[float]] = {0: [], 1: [], 2: []}

    class LRSpy(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001
            group = pl_module.group_at()
            seen[group].append(optimizer.param_groups[group]["lr"])

    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=10)
    trainer = L.Trainer(strategy=strategy, max_steps=30, callbacks=[LRSpy()], **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader(n=160))
    for group in range(3):  # every group warms up from its own first step, then decays over its own phase
        lrs = seen[group]
        assert len(lrs) == 10
        assert lrs[:4] == pytest.approx([1e-2 * (i + 1) / 4 for i in range(4)])
        assert lrs[4] == pytest.approx(1e-2)
        assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
        assert lrs[-1] > 1e-3


def test_allow_changed_survives_the_switch_to_data_parallel():
    """A `DiffusionBlocksStrategy` instance given two devices: the Trainer trains with the data-parallel class built
    with the same options (the resume override included); the instance itself is left as it was."""
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=3, allow_changed=("world_size",))
    trainer = L.Trainer(strategy=strategy, accelerator="cpu", devices=2, logger=False)
    parallel = trainer.strategy
    assert type(parallel) is ldb.DiffusionBlocksDDPStrategy
    assert (parallel.schedule_spec, parallel.steps_per_phase, parallel.world_size) == ("sequential", 3, 2)
    assert tuple(parallel.allow_changed) == ("world_size",)
    assert type(strategy) is ldb.DiffusionBlocksStrategy
    assert strategy.parallel_devices is None


def test_several_devices_build_the_data_parallel_class_from_the_start(monkeypatch):
    """The accelerator connector builds `DiffusionBlocksDDPStrategy` itself for `strategy="diffusionblocks",
    devices=2`: no single-device strategy is made on the way, and nothing in the package assigns `__class__`."""
    package = Path(ldb.__file__).parent
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
            assert not any(isinstance(t, ast.Attribute) and t.attr == "__class__" for t in targets), path
            assert not (isinstance(node, ast.Constant) and node.value == "__class__"), path  # setattr(x, "__class__")

    def never(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a single-device strategy was built for two devices")

    with monkeypatch.context() as patch:
        patch.setattr(ldb.DiffusionBlocksStrategy, "__init__", never)
        trainer = L.Trainer(strategy="diffusionblocks", accelerator="cpu", devices=2, logger=False)
    assert type(trainer.strategy) is ldb.DiffusionBlocksDDPStrategy
    assert trainer._accelerator_connector.strategy is trainer.strategy
    assert trainer.strategy.parallel_devices == [torch.device("cpu")] * 2
    # any other strategy goes through Lightning's choice untouched
    assert type(L.Trainer(strategy="ddp", accelerator="cpu", devices=2, logger=False).strategy) is DDPStrategy


def test_several_devices_are_refused_where_the_class_cannot_be_chosen():
    """A subclass (whose overrides the data-parallel class lacks) or a strategy already set up is never turned into
    data parallel: several devices or nodes are refused, naming what works."""

    class Custom(ldb.DiffusionBlocksStrategy):
        pass

    with pytest.raises(MisconfigurationException, match=r"Custom trains in one process.*DiffusionBlocksDDPStrategy\("):
        L.Trainer(strategy=Custom(), accelerator="cpu", devices=2, logger=False)
    strategy = ldb.DiffusionBlocksStrategy()
    L.Trainer(strategy=strategy, accelerator="cpu", devices=1, logger=False).strategy.setup_environment()
    with pytest.raises(MisconfigurationException, match="cannot change its devices once set up"):
        strategy.parallel_devices = [torch.device("cpu")] * 2
    with pytest.raises(MisconfigurationException, match="cannot change its devices once set up"):
        strategy.num_nodes = 2
