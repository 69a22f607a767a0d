"""Files this package reads back are data, never code; a lost offload file never yields an empty checkpoint; the
temporary folders of killed runs do not pile up.

Every crafted file here carries a payload that writes a marker file when unpickled; a control load with the
unrestricted unpickler proves the payload is live, and the package's own loads must leave no marker behind.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import traceback
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.callbacks.offload import PREFIX, BlockOffload, OffloadError
from lightning_diffusionblocks.merge import MergeError, main, merge_checkpoints
from tests.conftest import fit, make_module


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def torch_saved(path: Path, marker: Path, wrap: object = None) -> Path:
    """A crafted file written by ``torch.save`` (the payload inside ``wrap``'s structure, if given)."""
    torch.save(wrap(Payload(marker)) if callable(wrap) else Payload(marker), path)
    return path


def raw_zip(path: Path, marker: Path, wrap: object = None) -> Path:
    """A crafted file built by hand the way torch lays out its zip archive, with a plain ``pickle`` inside."""
    obj = wrap(Payload(marker)) if callable(wrap) else Payload(marker)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return path


def legacy_pickle(path: Path, marker: Path, wrap: object = None) -> Path:
    """A crafted file in torch's legacy (pre-zip) format."""
    obj = wrap(Payload(marker)) if callable(wrap) else Payload(marker)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    return path


CRAFTERS = [torch_saved, raw_zip, legacy_pickle]


def assert_payload_is_live(craft: object, tmp_path: Path) -> None:
    """Control: the same crafted file does run code under the unrestricted unpickler (so the tests mean something)."""
    control = tmp_path / "control-marker"
    torch.load(craft(tmp_path / "control.pt", control), weights_only=False)
    assert control.read_text() == "ran"


def sequential() -> ldb.DiffusionBlocksStrategy:
    """Group 0 for steps 0-1, group 1 for 2-3, group 2 for 4-5: which group is on disk when is known."""
    return ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)


# ---------------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real per-group job checkpoints written by Lightning (one training step each)."""
    root = tmp_path_factory.mktemp("jobs")
    paths = []
    for group in range(3):
        trainer = fit(make_module(), root, steps=1, strategy=ldb.DiffusionBlocksStrategy(groups_to_train=[group]))
        trainer.save_checkpoint(root / f"job{group}.ckpt")
        paths.append(root / f"job{group}.ckpt")
    return paths


def test_real_checkpoints_merge_and_the_result_is_tensors_and_plain_data(jobs: list[Path], tmp_path: Path) -> None:
    for job in jobs:  # what Lightning wrote (hyper_parameters included) loads with the restricted unpickler
        torch.load(job, weights_only=True)
    merge_checkpoints(jobs, tmp_path / "merged.ckpt")
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)  # the merged file loads the same way
    assert merged["state_dict"]["group_steps"].tolist() == [1, 1, 1]
    assert type(merged["hyper_parameters"]) is dict
    assert merged["hyper_parameters"]["num_blocks"] == 3
    restored = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "merged.ckpt")
    assert restored.num_blocks == 3
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("craft", CRAFTERS)
def test_merge_refuses_a_crafted_checkpoint_and_runs_nothing(
    craft: object, jobs: list[Path], tmp_path: Path
) -> None:  # fmt: skip
    assert_payload_is_live(craft, tmp_path)
    marker = tmp_path / "marker"
    # the payload hides where a checkpoint's data goes, next to real tensors
    evil = craft(tmp_path / "evil.ckpt", marker, lambda p: {"state_dict": {"w": torch.ones(2), "x": p}})
    for order in ([jobs[0], evil, jobs[2]], [evil, jobs[1], jobs[2]]):
        with pytest.raises(MergeError) as info:
            merge_checkpoints(order, tmp_path / "merged.ckpt")
        message = str(info.value)
        assert "holds objects other than tensors and plain data" in message
        assert "not executed" in message
        assert "trusted source" in message
        assert "re-save" in message
        assert str(evil) in message
    assert not marker.exists()
    assert not (tmp_path / "merged.ckpt").exists()


def test_merge_command_line_refuses_a_crafted_checkpoint(
    jobs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:  # fmt: skip
    marker = tmp_path / "marker"
    evil = torch_saved(tmp_path / "b.ckpt", marker)
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "out.ckpt"), str(jobs[0]), str(evil)])
    assert info.value.code == 2
    assert "not executed" in capsys.readouterr().err
    assert not marker.exists()
    assert not (tmp_path / "out.ckpt").exists()


@pytest.mark.parametrize(
    "content",
    [torch.zeros(3), [1, 2], {"state_dict": {}}, {"diffusionblocks": {"stem": "per_group"}, "state_dict": {}}],
    ids=["tensor", "list", "no-record", "partial-record"],
)
def test_merge_refuses_files_that_are_data_but_not_checkpoints(content: object, jobs: list[Path],
                                                               tmp_path: Path) -> None:  # fmt: skip
    torch.save(content, tmp_path / "other.ckpt")
    with pytest.raises(MergeError, match="DiffusionBlocks"):
        merge_checkpoints([jobs[0], tmp_path / "other.ckpt"], tmp_path / "merged.ckpt")


def test_a_merge_whose_write_fails_keeps_the_old_file_and_leaves_nothing_behind(
    jobs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "merged.ckpt"
    out.write_bytes(b"the previous merge")

    def half_then_disk_full(obj: object, f: Path, *args: object, **kwargs: object) -> None:
        Path(f).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_disk_full)
    with pytest.raises(MergeError, match="No space left on device.*free disk space"):
        merge_checkpoints(jobs, out)
    assert out.read_bytes() == b"the previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.ckpt"]


# ---------------------------------------------------------------------------- offload files
class Swap(Callback):
    """At ``step``, group 0 sits on disk (group 1 trains); its file (in the run's own folder) is replaced by
    ``write(path)``."""

    def __init__(self, offload: BlockOffload, write: object, step: int = 2) -> None:
        self.offload, self.write, self.step = offload, write, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_step == self.step:
            self.write(self.offload.directory / "group_0.pt")


@pytest.mark.parametrize("craft", CRAFTERS)
def test_a_crafted_offload_file_is_refused_and_runs_nothing(craft: object, tmp_path: Path) -> None:
    assert_payload_is_live(craft, tmp_path)
    marker = tmp_path / "marker"
    offload = BlockOffload(directory=tmp_path / "offload")
    swap = Swap(offload, lambda path: craft(path, marker, lambda p: [p]))
    with pytest.raises(OffloadError, match=r"group\(s\) \[0\]") as info:
        fit(make_module(), tmp_path, steps=4, strategy=sequential(), callbacks=[offload, swap])
    assert "refused and nothing in it ran" in str(info.value)
    assert re.search(r"refers to the global (builtins\.)?exec\b", str(info.value))  # names what was refused
    assert "weights_only=False" not in "".join(traceback.format_exception(info.value))  # never advises it
    assert offload.missing_groups() == [0]
    with pytest.raises(OffloadError, match="holds objects other than tensors"):  # asked again: refused again
        offload.load(0)
    assert not marker.exists()


def test_an_offload_file_with_other_tensors_is_refused(tmp_path: Path) -> None:
    """A file of plain tensors with the right name but not this run's shapes (another run's) is not loaded."""
    offload = BlockOffload(directory=tmp_path / "offload")
    swap = Swap(offload, lambda path: torch.save([torch.zeros(1)] * len(torch.load(path, weights_only=True)), path))
    with pytest.raises(OffloadError, match=r"group\(s\) \[0\].*does not hold the"):
        fit(make_module(), tmp_path, steps=4, strategy=sequential(), callbacks=[offload, swap])
    assert offload.missing_groups() == [0]


# ---------------------------------------------------------------------------- lost offload files
def reference_after(steps: int, tmp_path: Path) -> ldb.DiffusionBlocksModule:
    """The same training without offload: offloading is bit-identical, so these are the true values."""
    module = make_module()
    fit(module, tmp_path / "reference", steps=steps, strategy=sequential())
    return module


def group_equal(a: ldb.DiffusionBlocksModule, b: ldb.DiffusionBlocksModule, group: int) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.network.group_parameters(group), b.network.group_parameters(group)))


def test_every_group_whose_file_exists_is_restored_and_the_lost_one_is_named(tmp_path: Path) -> None:
    class LoseGroupZero(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 5:  # groups 0 and 1 are on disk, group 2 trains
                (offload.directory / "group_0.pt").unlink()

    module, offload = make_module(), BlockOffload(directory=tmp_path / "offload")
    with pytest.raises(OffloadError, match=r"group\(s\) \[0\]"):
        fit(module, tmp_path, steps=6, strategy=sequential(), callbacks=[offload, LoseGroupZero()])
    reference = reference_after(6, tmp_path)
    assert offload.missing_groups() == [0]
    assert group_equal(module, reference, 1)  # read back from its file although group 0 failed first
    assert group_equal(module, reference, 2)
    assert all(p.numel() == 0 for p in module.network.group_parameters(0))
    assert offload.load_all() == [0]  # asking again changes nothing


def test_deleted_offload_folder_never_gives_an_empty_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reported defect: the temporary folder vanishes mid-run and OnExceptionCheckpoint fires.

    The module's own guard is switched off here, to show the offloader refuses by itself.
    """
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(ldb.DiffusionBlocksModule, "missing_groups", lambda self: [])

    class DeleteFolder(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
            if trainer.global_step == 3:  # group 1 trains; groups 0 and 2 are on disk
                shutil.rmtree(offload.directory)

    module, offload = make_module(), BlockOffload()
    strategy = sequential()
    callbacks = [offload, DeleteFolder(), OnExceptionCheckpoint(tmp_path / "ckpt")]
    with pytest.raises(OffloadError, match=r"group\(s\) \[0, 2\]"):
        fit(module, tmp_path, steps=6, strategy=strategy, callbacks=callbacks, enable_checkpointing=True)
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()
    assert offload.missing_groups() == [0, 2]
    assert strategy.offloader is offload  # still attached: any later save asks it, and is refused
    with pytest.raises(OffloadError, match="refusing to write a checkpoint"):
        strategy.lightning_module.trainer.save_checkpoint(tmp_path / "later.ckpt")
    assert not (tmp_path / "later.ckpt").exists()
    # group 1 trained at steps 2 and 3, then could not be written out at step 4: it stayed in memory, intact
    assert group_equal(module, reference_after(4, tmp_path), 1)
    with pytest.raises(L.pytorch.utilities.exceptions.MisconfigurationException, match=r"group\(s\) \[0, 2\]"):
        fit(module, tmp_path, steps=2, strategy=sequential(), callbacks=[offload])  # no training on a broken model


def test_after_a_complete_fit_the_offloader_lets_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module, offload, strategy = make_module(), BlockOffload(), sequential()
    trainer = fit(module, tmp_path, steps=4, strategy=strategy, callbacks=[offload])
    assert offload.missing_groups() == []
    assert strategy.offloader is None
    assert not list(tmp_path.glob(PREFIX + "*"))  # its folder is gone
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    assert all(v.numel() > 0 for v in torch.load(tmp_path / "end.ckpt", weights_only=True)["state_dict"].values())


# ---------------------------------------------------------------------------- leftover temporary folders
def dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_folders_of_killed_runs_are_removed_at_the_next_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    host = socket.gethostname()
    owners = {"stale": f"{dead_pid()} {host}", "live": f"{os.getpid()} {host}", "elsewhere": f"{dead_pid()} other-host"}
    for name, owner in owners.items():
        (root / f"{PREFIX}{name}").mkdir()
        (root / f"{PREFIX}{name}" / "group_0.pt").write_bytes(b"x")
        (root / f"{PREFIX}{name}" / "owner").write_text(owner)
    (root / f"{PREFIX}user").mkdir()  # a directory a user gave (no owner file)
    outside = tmp_path / "outside"  # a link that looks stale must not lead the cleaner out of the temporary root
    outside.mkdir()
    (outside / "owner").write_text(f"{dead_pid()} {host}")
    (root / f"{PREFIX}link").symlink_to(outside)

    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
            seen["own"] = offload.directory
            seen["owner"] = (offload.directory / "owner").read_text().split()
            seen["folders"] = sorted(p.name for p in root.iterdir())

    offload = BlockOffload()
    fit(make_module(), tmp_path, steps=2, strategy=sequential(), callbacks=[offload, Look()])
    assert seen["owner"] == [str(os.getpid()), host]
    assert seen["own"].parent == root
    expected = sorted(f"{PREFIX}{n}" for n in ("live", "elsewhere", "user", "link"))
    assert seen["folders"] == sorted([*expected, seen["own"].name])  # only the stale one went
    assert sorted(p.name for p in root.iterdir()) == expected  # and its own folder is gone after fit
    assert (outside / "owner").exists()


def test_a_given_directory_is_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    given = tmp_path / f"{PREFIX}mine"  # even named like ours and inside the temporary root
    fit(make_module(), tmp_path, steps=4, strategy=sequential(), callbacks=[BlockOffload(directory=given)])
    assert given.is_dir()
    assert not (given / "owner").exists()  # no owner file: no later run treats it as stale
    fit(make_module(), tmp_path / "second", steps=2, strategy=sequential(), callbacks=[BlockOffload()])
    assert given.is_dir()
