"""``files.tensor_digest``, the one hash of tensor contents (offloaded group files, replicas of parallel runs).

The expected digests are computed here with hashlib from the documented construction: SHA-256 over each tensor's
``f"{dtype}{shape};"``, then the SHA-256 of each piece of at most ``DIGEST_CHUNK`` bytes of their raw contents.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from lightning_diffusionblocks import data_parallel, files
from lightning_diffusionblocks.files import tensor_digest


def expected_digest(tensors: list[torch.Tensor], chunk: int) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        for i in range(0, max(len(raw), 1), chunk):
            h.update(hashlib.sha256(raw[i : i + chunk]).digest())
    return h.hexdigest()


def test_digest_is_sha256_of_types_shapes_and_pieces_whatever_the_piece_count(monkeypatch):
    """One piece or many (hashed on threads), empty and 0-d tensors included: the documented SHA-256 construction."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(5, 7, generator=gen), torch.arange(10), torch.empty(0), torch.tensor(3.0)]
    assert tensor_digest(*tensors) == expected_digest(tensors, files.DIGEST_CHUNK)
    monkeypatch.setattr(files, "DIGEST_CHUNK", 16)  # 140 bytes -> 9 pieces, through the thread pool
    assert tensor_digest(*tensors) == expected_digest(tensors, 16)
    assert data_parallel.tensor_digest is tensor_digest  # the replicas' check uses the same helper


def test_digest_tells_apart_one_bit_a_shape_a_dtype_and_the_order():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    base = tensor_digest(a, b)
    flipped = a.clone()
    flipped.view(torch.int32)[3] ^= 1  # the lowest mantissa bit of one value
    assert tensor_digest(flipped, b) != base
    assert tensor_digest(a.view(2, 3), b) != base  # same bytes, another shape
    assert tensor_digest(a.view(torch.int32), b) != base  # same bytes, another dtype
    assert tensor_digest(b, a) != base
    assert tensor_digest(a.clone(), b.clone()) == base


@pytest.mark.parametrize(
    "tensor",
    [torch.tensor([True, False, True]), torch.ones(3, dtype=torch.bfloat16), torch.arange(12.0).view(3, 4).t()],
    ids=["bool", "bfloat16", "non-contiguous"],
)
def test_digest_takes_any_dense_tensor(tensor):
    """Bools and bfloat16 (no numpy type) hash by their bytes; a non-contiguous view hashes as its contiguous copy."""
    assert tensor_digest(tensor) == tensor_digest(tensor.contiguous().clone())
    assert tensor_digest(tensor) == expected_digest([tensor], files.DIGEST_CHUNK)
