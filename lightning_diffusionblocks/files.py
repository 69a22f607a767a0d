"""Files and what they must hold: writes that readers see whole or not at all, and digests of tensors.

:func:`atomic_write` makes readers see the old file or the whole new one, never half of one: the new contents go to a
temporary file beside the target (same folder, so the rename stays on one file system) and are renamed over it only
once written; a failed write removes the temporary and leaves the old file as it was. Temporary names carry the
process id and random bits, so two processes writing one path never write each other's.

:func:`tensor_digest` is the one hash of tensor contents in the package: the offloader checks that a group file it
reads back is what it wrote, and the parallel strategies that replicas hold bit-identical copies. :class:`Digest`
builds the same hash incrementally from names, strings and tensors, to key a cache (caption embeddings, encoded
latents) to the weights and data that made it, so a changed encoder or data set rebuilds the cache instead of
silently reusing stale values.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

#: bytes hashed as one piece; the pieces of large tensors are hashed on a few threads (hashlib releases the GIL)
DIGEST_CHUNK = 16 * 2**20
_hashers: ThreadPoolExecutor | None = None


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


def _pieces(tensors: tuple[Tensor, ...]) -> list[Any]:
    """Every tensor's exact bytes (on the host), cut into pieces of at most :data:`DIGEST_CHUNK` bytes."""
    pieces: list[Any] = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        data = (flat.cpu() if flat.device.type != "cpu" else flat).contiguous().view(torch.uint8).numpy()
        pieces += [data[i : i + DIGEST_CHUNK] for i in range(0, max(len(data), 1), DIGEST_CHUNK)]
    return pieces


def tensor_digest(*tensors: Tensor) -> str:
    """SHA-256 (hex) over the tensors' dtypes and shapes, then the SHA-256 of each piece of their exact bytes.

    Equal digests mean the same dtypes, shapes and bits, in order. SHA-256 for every use, because one of them
    needs a cryptographic hash: a group file on disk can be replaced by another process (another run sharing
    the folder), and a file built to collide with what was written must not pass. SHA-256 is also fast where it
    matters (CPU instructions on current x86 and ARM), and the pieces of a large group are hashed in parallel.
    """
    global _hashers
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    pieces = _pieces(tensors)
    if len(pieces) > 1:
        if _hashers is None:
            _hashers = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="ldb-digest")
        hashed = list(_hashers.map(lambda data: hashlib.sha256(data).digest(), pieces))
    else:
        hashed = [hashlib.sha256(data).digest() for data in pieces]
    for piece in hashed:
        h.update(piece)
    return h.hexdigest()


class Digest:
    """An incremental SHA-256 of strings and tensors (dtype, shape and exact bytes), for cache keys."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    def text(self, value: str) -> Digest:
        data = value.encode()
        self._h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ("ab","c") != ("a","bc")
        return self

    def bytes(self, data: bytes | memoryview) -> Digest:
        """Raw bytes, fed in pieces (a file read in chunks digests like the whole file)."""
        self._h.update(data)
        return self

    def tensor(self, t: Tensor) -> Digest:
        self._h.update(tensor_digest(t).encode())
        return self

    def tensors(self, named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Digest:
        items = named.items() if isinstance(named, Mapping) else named
        for name, t in items:
            self.text(name).tensor(t)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def module_digest(module: nn.Module) -> str:
    """The digest of a module's class name and every entry of its ``state_dict`` (weights and buffers)."""
    return Digest().text(type(module).__qualname__).tensors(module.state_dict()).hexdigest()


__all__ = ["DIGEST_CHUNK", "Digest", "atomic_write", "module_digest", "tensor_digest", "temporary_name"]
