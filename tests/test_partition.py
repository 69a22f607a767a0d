"""Finding the block stack, splitting it, and running one group at a time."""

import pytest
import timm
import torch
from torch import nn

from lightning_diffusionblocks.partition import (
    BlockwiseNetwork,
    Partition,
    autograd_leaves,
    find_block_stack,
    split_layers,
)
from tests.conftest import tiny_dit


class HFLike(nn.Module):
    """Hugging Face *ForCausalLM layout: model.layers, iterated with a slice."""

    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(depth))
        self.lm_head = nn.Linear(8, 3)

    def forward(self, x):  # noqa: ANN001, ANN201
        for layer in self.model.layers[:4]:
            x = x + layer(x)
        return self.lm_head(x)


class NoStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)


class Widening(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 16))

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.blocks(x)


def test_finds_known_stacks():
    assert find_block_stack(tiny_dit())[0] == "blocks"
    assert find_block_stack(HFLike())[0] == "model.layers"
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10)
    assert find_block_stack(vit)[0] == "blocks"
    assert find_block_stack(HFLike(), "model.layers")[0] == "model.layers"


def test_missing_stack_names_the_fix():
    with pytest.raises(ValueError, match="block_path="):
        find_block_stack(NoStack())
    with pytest.raises(ValueError, match="no attribute path `encoder.layers`"):
        find_block_stack(NoStack(), "encoder.layers")
    with pytest.raises(ValueError, match="not an nn.ModuleList"):
        find_block_stack(NoStack(), "body")


def test_split_layers():
    assert split_layers(12, 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_layers(6, 3, [1, 2, 3]) == [[0], [1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        split_layers(6, 0)
    with pytest.raises(ValueError, match="larger than the network's 6 layers"):
        split_layers(6, 7)
    with pytest.raises(ValueError, match="sum to 5 but the network has 6 layers"):
        split_layers(6, 2, [2, 3])
    with pytest.raises(ValueError, match="one size per group"):
        split_layers(6, 2, [6])


def test_state_dict_keys_unchanged():
    net = tiny_dit()
    keys = list(net.state_dict())
    wrapped = BlockwiseNetwork(net, 3, stem="shared")
    assert list(wrapped.net.state_dict()) == keys
    assert isinstance(net.blocks, nn.ModuleList)
    assert len(net.blocks) == 6


@pytest.mark.parametrize("stem", ["per_group", "shared"])
def test_group_runs_only_its_blocks(stem):
    net = tiny_dit()
    wrapped = BlockwiseNetwork(net, 3, stem=stem)
    calls = []
    for i, block in enumerate(net.blocks._modules.values()):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    x, c = torch.randn(2, 1, 8, 8), torch.zeros(2)
    for g, expected in enumerate([[0, 1], [2, 3], [4, 5]]):
        calls.clear()
        wrapped(x, c, group=g)
        assert calls == expected
    calls.clear()
    wrapped(x, c)  # whole network
    assert calls == list(range(6))


@pytest.mark.parametrize("stem", ["per_group", "shared"])
def test_only_the_group_is_in_the_autograd_graph(stem):
    wrapped = BlockwiseNetwork(tiny_dit(), 3, stem=stem)
    x, c, labels = torch.randn(2, 1, 8, 8), torch.zeros(2), torch.tensor([1, 2])
    for g in range(3):
        out = wrapped(x, c, labels, group=g)
        leaves = autograd_leaves(out.sum())
        own = {id(p) for p in wrapped.group_parameters(g)} | {id(p) for p in wrapped.shared_parameters()}
        assert leaves == own
        others = {id(p) for k in range(3) if k != g for p in wrapped.group_parameters(k)}
        assert not leaves & others


def test_per_group_stems_are_independent_copies():
    wrapped = BlockwiseNetwork(tiny_dit(), 3, stem="per_group")
    assert len(wrapped.stems) == 2
    stem0 = {id(p) for p in wrapped.stem_parameters(0)}
    stem1 = {id(p) for p in wrapped.stem_parameters(1)}
    assert stem0.isdisjoint(stem1)
    assert len(stem0) == len(stem1)
    # the copies hold no blocks
    assert all(len(list(s.blocks.parameters())) == 0 for s in wrapped.stems)
    # every parameter belongs to exactly one group
    owned = [id(p) for g in range(3) for p in wrapped.group_parameters(g)]
    assert len(owned) == len(set(owned)) == len(list(wrapped.parameters()))


def test_timm_vit_sequential_stack_runs_active_group():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=10, img_size=32, patch_size=8)
    wrapped = BlockwiseNetwork(vit, 3, stem="shared")
    calls = []
    for i, block in enumerate(vit.blocks._modules.values()):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    wrapped(torch.randn(1, 3, 32, 32), group=1)
    assert calls == [2, 3]


def test_hf_slice_iteration_sees_only_active_group():
    net = HFLike()
    wrapped = BlockwiseNetwork(net, 2, stem="shared")
    calls = []
    for i, layer in enumerate(net.model.layers._modules.values()):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    wrapped(torch.randn(1, 8), group=1)
    assert calls == [2, 3]


def test_width_changing_block_is_refused():
    wrapped = BlockwiseNetwork(Widening(), 2, stem="shared")
    with pytest.raises(ValueError, match="Block 1 .* maps shape"):
        wrapped(torch.randn(2, 8))


def test_bad_stem_mode():
    with pytest.raises(ValueError, match="'per_group' or 'shared'"):
        BlockwiseNetwork(tiny_dit(), 3, stem="copied")


# ---------------------------------------------------------------------------- who owns a weight
OWNERS_PER_GROUP = {  # a 4-layer DiT cut 2 + 1 + 1, written out by hand
    "net.blocks.0.attn.qkv.weight": 0,
    "net.blocks.1.mlp.2.bias": 0,
    "net.blocks.2.ada.1.weight": 1,
    "net.blocks.3.attn.proj.bias": 2,
    "net.patch_embed.weight": 0,  # the network's own stem and head are group 0's
    "net.label_embed.weight": 0,
    "net.final.linear.bias": 0,
    "stems.0.patch_embed.weight": 1,  # group 1's private copy
    "stems.1.final.ada.1.weight": 2,
    "group_steps": None,  # not a network weight
    "stems": None,
}


@pytest.mark.parametrize("stem", ["per_group", "shared"])
def test_partition_names_the_group_owning_each_weight(stem):
    """The owner of every weight matches a hand-written table, and the network's own parameter lists: the group
    that alone trains it, None for a stem every group shares."""
    wrapped = BlockwiseNetwork(tiny_dit(depth=4), 3, stem=stem)
    partition = Partition.from_record({"groups": wrapped.groups, "stem": stem, "block_path": "blocks", "other": 1})
    assert partition == wrapped.partition == Partition([[0, 1], [2], [3]], stem, "blocks")
    keys = set(wrapped.state_dict())
    for key, group in OWNERS_PER_GROUP.items():
        if key.startswith("stems.") and stem == "shared":
            continue
        assert key in keys or group is None, key
        expected = None if stem == "shared" and key.startswith("net.") and ".blocks." not in key else group
        assert partition.owner(key) == expected, key
    names = {id(p): n for n, p in wrapped.named_parameters()}
    owned = {names[id(p)]: g for g in range(3) for p in wrapped.group_parameters(g)}
    shared = {names[id(p)] for p in wrapped.shared_parameters()}
    assert set(owned) | shared == set(names.values())
    for name in names.values():
        assert partition.owner(name) == owned.get(name), name
    with pytest.raises(ValueError, match="layer 4"):  # a record of another network is refused, never guessed
        partition.owner("net.blocks.4.attn.qkv.weight")
    with pytest.raises(ValueError, match=r"lacks \['block_path'\]"):
        Partition.from_record({"groups": [[0]], "stem": stem})
