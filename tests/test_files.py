"""Writing a file through a temporary beside it: the old file or the whole new one, never half, nothing left over."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from lightning_diffusionblocks import files
from lightning_diffusionblocks.files import atomic_write


def test_a_write_lands_whole_through_a_temporary_of_its_own(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"old")
    seen: list[Path] = []

    def write(tmp: Path) -> str:
        seen.append(tmp)
        assert target.read_bytes() == b"old" * len(seen)  # readers see the old file until the new one is whole
        tmp.write_bytes(b"old" * (len(seen) + 1))
        return "written"

    assert atomic_write(target, write) == "written"
    assert target.read_bytes() == b"oldold"
    assert atomic_write(str(target), write, suffix="partial") == "written"
    assert target.read_bytes() == b"oldoldold"
    assert [p.parent for p in seen] == [tmp_path, tmp_path]  # same folder: the rename never crosses file systems
    pid = os.getpid()
    assert re.fullmatch(rf"model\.ckpt\.{pid}-[0-9a-f]{{8}}\.tmp", seen[0].name), seen[0].name
    assert re.fullmatch(rf"model\.ckpt\.{pid}-[0-9a-f]{{8}}\.partial", seen[1].name), seen[1].name
    assert files.temporary_name(target) != files.temporary_name(target)  # two writers never share a name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path, error: BaseException) -> None:
    target = tmp_path / "group_0.pt"
    target.write_bytes(b"good")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ha")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group_0.pt"]
    with pytest.raises(FileNotFoundError):  # a writer that wrote nothing: the rename fails, nothing is created
        atomic_write(tmp_path / "absent.pt", lambda tmp: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["group_0.pt"]


def test_a_failed_rename_leaves_no_temporary(tmp_path: Path) -> None:
    folder = tmp_path / "taken"
    (folder / "inside").mkdir(parents=True)  # a non-empty folder where the file should go: the rename fails
    with pytest.raises(IsADirectoryError):
        atomic_write(folder, lambda tmp: tmp.write_bytes(b"new"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_durable_write_flushes_the_file_and_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"x"))
    assert synced == []  # by default the disk is not waited for
    atomic_write(tmp_path / "b.bin", lambda tmp: tmp.write_bytes(b"x"), durable=True)
    assert len(synced) == (2 if os.name == "posix" else 1)
    assert (tmp_path / "b.bin").read_bytes() == b"x"
