"""Offloading inactive groups and per-group memory accounting."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks import BlockMemoryMonitor, BlockOffload, OffloadError
from lightning_diffusionblocks.memory import SavedTensorMeter, parameter_bytes
from tests.conftest import fit, image_loader, make_module

MEMORY_MODULE = {"depth": 6, "weight_decay": 0.05}  # the tiny DiT of six blocks in three groups, with weight decay


class ResidentCheck(Callback):
    """After offload has run for a step, only the active group may hold parameter memory."""

    def __init__(self) -> None:
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        active = trainer.strategy.select_group(trainer.global_step)
        for g in range(pl_module.num_blocks):
            sizes = [p.numel() for p in pl_module.network.group_parameters(g)]
            assert all(sizes) if g == active else not any(sizes), (g, active)
        self.checked += 1


@pytest.mark.parametrize("schedule", ["random", "sequential"])
def test_disk_offload_trains_bit_identically(tmp_path, schedule):
    reference = make_module(**MEMORY_MODULE, ema_decay=0.9)
    fit(
        reference,
        tmp_path / "a",
        steps=9,
        strategy=ldb.DiffusionBlocksStrategy(schedule=schedule),
        loader=image_loader(n=96),
    )
    offloaded = make_module(**MEMORY_MODULE, ema_decay=0.9)
    offload, check = BlockOffload(directory=tmp_path / "off"), ResidentCheck()
    fit(
        offloaded,
        tmp_path / "b",
        steps=9,
        strategy=ldb.DiffusionBlocksStrategy(schedule=schedule),
        callbacks=[offload, check],
        loader=image_loader(n=96),
    )
    assert check.checked == 9
    for (name, a), b in zip(reference.state_dict().items(), offloaded.state_dict().values()):
        assert torch.equal(a, b), name
    if schedule == "sequential":
        assert offload.stats["offloads"] == 2 + 2  # initial two, then one per phase change
    assert not any((tmp_path / "off").rglob("*.tmp"))


def test_offload_checkpoint_holds_every_group(tmp_path):
    module = make_module(**MEMORY_MODULE)
    trainer = fit(
        module, tmp_path, steps=4, callbacks=[BlockOffload(directory=tmp_path / "off")], loader=image_loader(n=96)
    )
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    state = torch.load(tmp_path / "end.ckpt", weights_only=False)
    for name, value in module.state_dict().items():
        assert torch.equal(state["state_dict"][name], value), name
    # mid-training checkpoints too: every parameter full-size, and optimizer state for trained groups
    mid = make_module(**MEMORY_MODULE)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1)
    fit(
        mid,
        tmp_path / "m",
        steps=6,
        callbacks=[BlockOffload(directory=tmp_path / "off2"), ckpt],
        loader=image_loader(n=96),
        enable_checkpointing=True,
    )
    state = torch.load(tmp_path / "ck" / "epoch=0-step=3.ckpt", weights_only=False)
    assert all(v.numel() > 0 for v in state["state_dict"].values())
    opt_state = state["optimizer_states"][0]["state"]
    assert opt_state
    assert all(s["exp_avg"].numel() > 0 for s in opt_state.values())


def test_offload_refuses_unwritable_directory_and_end_to_end(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(MisconfigurationException, match="cannot write to"):
        fit(
            make_module(**MEMORY_MODULE),
            tmp_path,
            steps=2,
            callbacks=[BlockOffload(directory=blocker / "sub")],
            loader=image_loader(n=96),
        )
    with pytest.raises(MisconfigurationException, match="strategy='diffusionblocks'"):
        fit(
            make_module(**MEMORY_MODULE),
            tmp_path,
            steps=2,
            strategy="auto",
            callbacks=[BlockOffload(directory=tmp_path / "o")],
            loader=image_loader(n=96),
        )
    with pytest.raises(ValueError, match="'auto', 'cpu' or 'disk'"):
        BlockOffload(target="nvme")


def test_disk_full_stops_cleanly_without_losing_the_group(tmp_path, monkeypatch):
    module = make_module(**MEMORY_MODULE)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OffloadError, match="No space left on device.*still in memory"):
        fit(module, tmp_path, steps=30, callbacks=[BlockOffload(directory=tmp_path / "off")], loader=image_loader(n=96))
    monkeypatch.setattr(torch, "save", real_save)
    # teardown brought every group back: the model is whole and finite
    for g in range(3):
        assert all(p.numel() > 0 and torch.isfinite(p).all() for p in module.network.group_parameters(g))


def test_saved_tensor_meter_counts_activations_not_parameters():
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(32, 64)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = torch.relu(layer(x)).sum()
    assert meter.bytes >= 32 * 64 * 4  # the input saved for the weight gradient (and relu output)
    assert meter.bytes < 32 * 64 * 4 * 3 + 64 * 64 * 4
    y.backward()


def test_memory_monitor_logs_per_group_and_prints_table(tmp_path, capsys):
    monitor = BlockMemoryMonitor()
    logger = CSVLogger(tmp_path, name="csv")
    module = make_module(**MEMORY_MODULE)
    fit(
        module,
        tmp_path,
        steps=12,
        callbacks=[BlockOffload(directory=tmp_path / "off"), monitor],
        loader=image_loader(n=96),
        logger=logger,
        log_every_n_steps=1,
    )
    assert set(monitor.groups) == {"0", "1", "2"}
    group_bytes = [parameter_bytes(module.network.group_parameters(g)) for g in range(3)]
    for g, stats in monitor.groups.items():
        assert stats.params == group_bytes[int(g)]  # only the active group is resident
        assert stats.grads == group_bytes[int(g)]
        n_params = len(list(module.network.parameters()))
        # Adam's two moments, plus the scalar step counters (which stay put, 4 bytes each)
        assert 2 * group_bytes[int(g)] <= stats.optimizer <= 2 * group_bytes[int(g)] + 8 * n_params
        assert stats.activations > 0
        assert stats.peak_rss > 0
        assert stats.total == stats.params + stats.grads + stats.optimizer + stats.activations
    table = monitor.table()
    assert "activations" in table
    assert table.count("\n") >= 5
    metrics = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "memory/group_0/total_mib" in metrics
    assert "memory/group_2/activations_mib" in metrics


def test_memory_monitor_end_to_end_row(tmp_path):
    monitor = BlockMemoryMonitor(log=False)
    module = make_module(**MEMORY_MODULE)
    fit(module, tmp_path, steps=3, strategy="auto", callbacks=[monitor], loader=image_loader(n=96))
    assert set(monitor.groups) == {"all"}
    assert monitor.groups["all"].params == parameter_bytes(module.parameters())


def test_memory_monitor_logs_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="ldb-test")
    try:
        fit(
            make_module(**MEMORY_MODULE),
            tmp_path,
            steps=3,
            callbacks=[BlockMemoryMonitor()],
            loader=image_loader(n=96),
            logger=logger,
            log_every_n_steps=1,
        )
        summary = dict(logger.experiment.summary)
    finally:
        import wandb

        wandb.finish()
    assert any(key.startswith("memory/group_") and key.endswith("/total_mib") for key in summary)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_after_training_offloaded_optimizer_state_comes_back_to_the_host(tmp_path, monkeypatch):
    """At the end of fit every group's weights return to the compute device, but the optimizer state of offloaded
    groups goes to host memory: a model trained block-wise because its training state does not fit the device
    would run out of memory there (the H100 headline did), and Lightning's teardown moves that state to the host."""
    module = make_module(**MEMORY_MODULE)
    opt = torch.optim.AdamW(module.network.parameters())
    for p in module.network.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    offload = BlockOffload(directory=tmp_path / "off")
    offload._module, offload._optimizer, offload._mode = module, opt, "disk"
    offload._device = torch.device("cpu", 0)  # stands in for an accelerator: distinct from the host's "cpu"
    offload._resident = {0, 1, 2}
    offload._prepare_directory(rank=0)
    placed: list[tuple[str, torch.device]] = []
    target = offload._target
    monkeypatch.setattr(offload, "_target", lambda slot: placed.append((slot[1], target(slot))) or target(slot))
    offload.offload(1)
    offload.load(1)  # during training: weights and optimizer state back to the device
    assert {d for _, d in placed} == {torch.device("cpu", 0)}
    assert {k for k, _ in placed} == {"data", "exp_avg", "exp_avg_sq"}
    offload.offload(1)
    offload.offload(2)
    placed.clear()
    offload.on_train_end(None, module)
    assert {d for k, d in placed if k == "data"} == {torch.device("cpu", 0)}
    assert {d for k, d in placed if k != "data"} == {torch.device("cpu")}
    for g in range(3):
        assert all(p.numel() for p in module.network.group_parameters(g))


def memory_rows(folder: Path) -> list[dict[str, str]]:
    """The rows of a CSVLogger's ``metrics.csv`` that hold memory figures."""
    rows = csv.DictReader((folder / "metrics.csv").open())
    return [r for r in rows if any(k.startswith("memory/") and v for k, v in r.items())]


def test_memory_is_logged_only_for_the_groups_trained_since_the_previous_row(tmp_path):
    """Groups 0 0 1 1 2 2, a logging row every two steps (after steps 1, 3 and 5): each group has one point, at the
    row after its own steps, holding the peak of those steps; without ``log`` the monitor logs nothing."""
    sequential = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    monitor = BlockMemoryMonitor()
    fit(
        make_module(**MEMORY_MODULE),
        tmp_path,
        steps=6,
        strategy=sequential,
        callbacks=[monitor],
        loader=image_loader(n=96),
        logger=CSVLogger(tmp_path, name="csv"),
        log_every_n_steps=2,
    )
    rows = memory_rows(tmp_path / "csv" / "version_0")
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for g, row in enumerate(rows):
        assert {k.split("/")[1] for k, v in row.items() if k.startswith("memory/") and v} == {f"group_{g}"}
        assert float(row[f"memory/group_{g}/total_mib"]) == pytest.approx(monitor.groups[str(g)].total / 2**20)
    quiet = BlockMemoryMonitor(log=False)
    fit(
        make_module(**MEMORY_MODULE),
        tmp_path,
        steps=2,
        callbacks=[quiet],
        loader=image_loader(n=96),
        logger=CSVLogger(tmp_path, name="quiet"),
        log_every_n_steps=1,
    )
    assert memory_rows(tmp_path / "quiet" / "version_0") == []
    assert quiet.groups  # still measured, and printed at the end
