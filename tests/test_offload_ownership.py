"""Offload files belong to the run that wrote them: two runs given one directory do not touch each other's files,
and a group file that changed since it was written (even to tensors of the right shapes) is refused, never loaded."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks.offload import PREFIX, BlockOffload, OffloadError
from tests.conftest import fit, make_module, tiny_dit

STEPS = 8  # the random schedule (seed 0) trains groups 1 2 0 2 2 1 0 2: groups 0 and 1 leave the device twice


def random_order() -> ldb.DiffusionBlocksStrategy:
    """The random schedule of groups (seed 0: the order STEPS describes)."""
    return ldb.DiffusionBlocksStrategy(schedule="random")


def assert_same(a: ldb.DiffusionBlocksModule, b: ldb.DiffusionBlocksModule) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_two_runs_on_one_directory_each_end_as_if_alone(tmp_path: Path) -> None:
    """Run B starts, trains and ends in ``shared`` while run A is mid-training there, with groups 0 and 1 on disk
    (each after one step). B's files of the same names hold those groups after two steps, same shapes: read by A,
    they would silently replace A's groups."""
    reference = make_module()
    fit(reference, tmp_path / "alone", steps=STEPS, strategy=random_order())
    shared = tmp_path / "shared"
    first, second = make_module(), make_module()
    offload_a, offload_b = BlockOffload(directory=shared), BlockOffload(directory=shared)
    seen: dict[str, object] = {}

    class SecondRun(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 4:
                seen["folder"] = offload_a.directory
                # a whole run, while A is alive
                fit(second, tmp_path / "b", steps=STEPS, strategy=random_order(), callbacks=[offload_b])

    fit(first, tmp_path / "a", steps=STEPS, strategy=random_order(), callbacks=[offload_a, SecondRun()])
    assert_same(first, reference)
    assert_same(second, reference)
    folder = seen["folder"]
    assert isinstance(folder, Path)
    assert folder.parent == shared
    assert folder.name.startswith(f"{PREFIX}rank0-")  # this run's own folder, named by its rank
    assert min(offload_a.stats["loads"], offload_b.stats["loads"]) >= 4  # both read groups back from disk
    assert list(shared.iterdir()) == []  # each run removed its own folder; the directory itself stays


def zeros(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.zeros_like(t) for t in tensors]


def one_value_changed(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    tensors[-1].view(-1)[0] += 1e-3
    return tensors


@pytest.mark.parametrize("change", [zeros, one_value_changed])
def test_a_group_file_changed_since_it_was_written_is_refused(
    tmp_path: Path, change: Callable[[list[torch.Tensor]], list[torch.Tensor]]
) -> None:
    offload = BlockOffload(directory=tmp_path / "offload")

    class Change(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 2:  # group 0 (trained for two steps) is on disk while group 1 trains
                path = offload.directory / "group_0.pt"
                torch.save(change(torch.load(path, weights_only=True)), path)  # the same shapes and types

    module = make_module()
    sequential = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    with pytest.raises(OffloadError, match=r"group\(s\) \[0\].*changed since this run wrote it"):
        fit(module, tmp_path, steps=4, strategy=sequential, callbacks=[offload, Change()])
    assert offload.missing_groups() == [0]
    assert all(p.numel() == 0 for p in module.network.group_parameters(0))  # nothing of the file was loaded
    with pytest.raises(OffloadError, match="changed since this run wrote it"):  # asked again: refused again
        offload.load(0)


def test_two_runs_at_once_on_one_directory_in_lockstep(tmp_path: Path) -> None:
    """Two different runs (noise seeds 0 and 1) train at the same time in two threads, step by step together, on one
    directory: each ends as it does alone (sharing group files, at least one would load the other's)."""
    import threading

    alone = [ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3, seed=s)
             for s in (0, 1)]  # fmt: skip
    for i, module in enumerate(alone):
        fit(module, tmp_path / f"alone{i}", steps=STEPS, strategy=random_order())
    together = [ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3, seed=s)
                for s in (0, 1)]  # fmt: skip
    barrier, errors = threading.Barrier(2, timeout=60), []

    class Lockstep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            barrier.wait()

    def run(i: int) -> None:
        try:
            fit(
                together[i],
                tmp_path / f"run{i}",
                steps=STEPS,
                strategy=random_order(),
                callbacks=[BlockOffload(directory=tmp_path / "shared"), Lockstep()],
            )
        except BaseException as err:  # noqa: BLE001  # reported below, in the test's thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for a, b in zip(alone, together):
        assert_same(a, b)
