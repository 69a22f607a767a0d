"""The reference DiT."""

import pytest
import torch

import lightning_diffusionblocks as ldb
from tests.conftest import tiny_dit


def test_dit_shapes_and_zero_init():
    net = tiny_dit()
    x = torch.randn(3, 1, 8, 8)
    out = net(x, torch.zeros(3), torch.tensor([0, -1, 9]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the untrained head outputs zero
    assert net(x, torch.zeros(3)).shape == x.shape  # unconditional


def test_dit_adaln_zero_blocks_start_as_identity():
    block = ldb.models.DiTBlock(16, 2)
    h, c = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert torch.equal(block(h, c), h)


def test_dit_bad_input():
    net = tiny_dit()
    with pytest.raises(ValueError, match=r"shape \(N, 1, 8, 8\)"):
        net(torch.randn(2, 1, 16, 16), torch.zeros(2))
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 10\)"):
        net(torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([3, 11]))
    # the extra embedding row (num_classes) and negative ids both mean "no label"
    c, z = torch.zeros(2), torch.randn(2, 1, 8, 8)
    assert torch.equal(net(z, c, torch.tensor([10, 10])), net(z, c, torch.tensor([-1, -1])))
    with pytest.raises(ValueError, match="divisible by patch"):
        ldb.models.DiT(image_size=10, patch=4)
    with pytest.raises(ValueError, match="divisible by heads"):
        ldb.models.DiT(dim=20, heads=3)
