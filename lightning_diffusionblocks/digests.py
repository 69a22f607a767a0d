"""Digests that key a cache to what produced it: a model's weights and the data it was given.

A cache (caption embeddings, encoded latents) is valid only for the exact encoder weights and inputs that made it;
a digest of both, written into the cache and its name, makes a changed encoder or data set rebuild (or refuse)
the cache instead of silently reusing stale values.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["Digest", "module_digest", "tensor_digest"]


class Digest:
    """An incremental BLAKE2b digest of tensors (shape, dtype and exact bytes) and strings."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def text(self, value: str) -> Digest:
        data = value.encode()
        self._h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: ("ab","c") != ("a","bc")
        return self

    def bytes(self, data: bytes | memoryview) -> Digest:
        """Raw bytes, fed in pieces (a file read in chunks digests like the whole file)."""
        self._h.update(data)
        return self

    def tensor(self, t: Tensor) -> Digest:
        data = t.detach().reshape(-1)
        if data.dtype == torch.bool:
            data = data.to(torch.uint8)
        self.text(f"{tuple(t.shape)} {t.dtype}")
        self._h.update(memoryview(data.contiguous().cpu().view(torch.uint8).numpy()))
        return self

    def tensors(self, named: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> Digest:
        items = named.items() if isinstance(named, Mapping) else named
        for name, t in items:
            self.text(name).tensor(t)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def tensor_digest(t: Tensor) -> str:
    """The digest of one tensor's shape, dtype and bytes."""
    return Digest().tensor(t).hexdigest()


def module_digest(module: nn.Module) -> str:
    """The digest of a module's class name and every entry of its ``state_dict`` (weights and buffers)."""
    return Digest().text(type(module).__qualname__).tensors(module.state_dict()).hexdigest()
