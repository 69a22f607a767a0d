"""Write a file so that readers see the old file or the whole new one, never half of one.

The new contents go to a temporary file beside the target (same folder, so the rename stays on one file system) and
are renamed over it only once written; a failed write removes the temporary and leaves the old file as it was.
Temporary names carry the process id and random bits, so two processes writing one path never write each other's.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def temporary_name(path: str | os.PathLike[str], suffix: str = "tmp") -> Path:
    """A name beside ``path`` that no other write uses: ``<name>.<pid>-<8 hex digits>.<suffix>``."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[Path], T], *, suffix: str = "tmp", durable: bool = False
) -> T:
    """Call ``write(temporary)`` and rename the temporary over ``path``; returns what ``write`` returned.

    Whatever ``write`` or the rename raises is raised again after the temporary is removed, so a failure leaves
    ``path`` as it was (absent, or the old contents) and nothing beside it. ``write`` may create missing folders
    (nothing is created before it runs). ``durable=True`` also flushes the file and the folder to disk (fsync), so
    the new contents survive a power loss, at the cost of waiting for the disk.
    """
    path = Path(path)
    tmp = temporary_name(path, suffix)
    try:
        result = write(tmp)
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # interrupts too: never leave a temporary behind
        tmp.unlink(missing_ok=True)
        raise
    if durable and os.name == "posix":  # the rename itself lives in the folder's entry
        _fsync(path.parent)
    return result


__all__ = ["atomic_write", "temporary_name"]
