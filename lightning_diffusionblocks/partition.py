"""Find a network's stack of residual blocks, cut it into groups, and run one group at a time.

The stack is swapped in place for a :class:`BlockStack` with the same children, so state-dict keys
(``blocks.0.attn.qkv.weight`` …) stay exactly as the user's network had them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

StemMode = Literal["per_group", "shared"]

# Where well-known libraries keep their block stack, tried in this order.
KNOWN_STACK_PATHS = (
    "blocks",  # timm ViT/DeiT, our DiT
    "layers",  # Hugging Face Llama-style inner model, many custom transformers
    "h",  # Hugging Face GPT-2 inner model
    "model.layers",  # Hugging Face *ForCausalLM (Llama, Mistral, Qwen)
    "transformer.h",  # Hugging Face GPT2LMHeadModel
    "transformer.layers",
    "encoder.layers",
    "encoder.layer",  # Hugging Face BERT/ViT
    "model.decoder.layers",  # Hugging Face OPT
)


def _get(module: nn.Module, path: str) -> Any:
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def find_block_stack(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return (dotted path, container) of the model's block stack.

    Looks for the explicit ``path`` if given, else the path a wrapper declares in its
    ``diffusionblocks_stack_path`` attribute, else the first of :data:`KNOWN_STACK_PATHS` that holds an
    ``nn.ModuleList`` or ``nn.Sequential`` of at least one block.
    """
    path = path or getattr(model, "diffusionblocks_stack_path", None)
    candidates = (path,) if path else KNOWN_STACK_PATHS
    for cand in candidates:
        try:
            found = _get(model, cand)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found) > 0:
            return cand, found
        if path:
            raise ValueError(
                f"`{path}` on {type(model).__name__} is a {type(found).__name__}, not an nn.ModuleList or"
                " nn.Sequential of blocks. Pass `block_path` pointing at the list of residual blocks."
            )
    if path:
        raise ValueError(
            f"{type(model).__name__} has no attribute path `{path}`. Pass `block_path` as the dotted path of its"
            " block stack, e.g. block_path='encoder.layers'."
        )
    raise ValueError(
        f"Could not find a block stack in {type(model).__name__}: none of {', '.join(KNOWN_STACK_PATHS)} is an"
        " nn.ModuleList/nn.Sequential. Pass `block_path='<dotted.path.to.blocks>'` to DiffusionBlocksModule."
    )


def split_layers(num_layers: int, num_groups: int, sizes: Sequence[int] | None = None) -> list[list[int]]:
    """Contiguous layer indices per group; an even split puts the extra layers in the first groups."""
    if num_groups < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_groups}.")
    if num_groups > num_layers:
        raise ValueError(
            f"num_blocks={num_groups} is larger than the network's {num_layers} layers: num_blocks must not exceed the"
            f" number of layers in the block stack, since every group needs at least one. Lower num_blocks to at most"
            f" {num_layers} (command line: --model.num_blocks={num_layers}), or build the network with at least"
            f" {num_groups} layers (e.g. depth={num_groups}: --model.net.init_args.depth={num_groups})."
        )
    if sizes is None:
        base, extra = divmod(num_layers, num_groups)
        sizes = [base + (1 if g < extra else 0) for g in range(num_groups)]
    else:
        sizes = list(sizes)
        if len(sizes) != num_groups:
            raise ValueError(
                f"group_sizes has {len(sizes)} entries but num_blocks={num_groups}; give one size per group."
            )
        if any(s < 1 for s in sizes):
            raise ValueError(f"Every group needs at least one layer, got group_sizes={sizes}.")
        if sum(sizes) != num_layers:
            raise ValueError(
                f"group_sizes={sizes} sum to {sum(sizes)} but the network has {num_layers} layers;"
                f" make them sum to {num_layers}."
            )
    groups, start = [], 0
    for s in sizes:
        groups.append(list(range(start, start + s)))
        start += s
    return groups


@dataclass(frozen=True)
class Partition:
    """How a network is cut: the layers of each group, the stem mode and the block stack's dotted path.

    It is what a checkpoint's ``diffusionblocks`` record holds (:meth:`from_record`), and it answers which group
    alone trains a weight of a :class:`BlockwiseNetwork` (:meth:`owner`), with the network's own layout: blocks at
    ``net.<block_path>.<layer>.``, the stem/head at ``net.`` (group 0's when stems are per group) and the copies of
    groups 1… at ``stems.<group - 1>.``.
    """

    groups: list[list[int]]
    stem: StemMode
    block_path: str

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Partition:
        """The partition a checkpoint's ``diffusionblocks`` record (or any mapping with its keys) describes."""
        missing = [k for k in ("groups", "stem", "block_path") if k not in record]
        if missing:
            raise ValueError(
                f"The partition record lacks {missing}; pass a checkpoint's 'diffusionblocks' record"
                " (Partition.from_record(checkpoint['diffusionblocks']))."
            )
        return cls([list(layers) for layers in record["groups"]], record["stem"], record["block_path"])

    def owner(self, key: str) -> int | None:
        """The group that alone trains the :class:`BlockwiseNetwork` state-dict entry ``key``.

        None when no single group does: the stem/head when it is shared by all groups, or an entry that is not one
        of the network's weights. Raises ValueError for a block layer that no group holds (a record of another
        network).
        """
        if key.startswith("stems."):
            index, _, rest = key[len("stems.") :].partition(".")
            return int(index) + 1 if index.isdigit() and rest else None
        if not key.startswith("net."):
            return None
        inner = key[len("net.") :]
        blocks = self.block_path + "."
        if inner.startswith(blocks):
            index, _, rest = inner[len(blocks) :].partition(".")
            if index.isdigit() and rest:
                layer = int(index)
                for group, layers in enumerate(self.groups):
                    if layer in layers:
                        return group
                raise ValueError(
                    f"{key!r} is a weight of layer {layer}, but the partition's groups {self.groups} do not hold that"
                    " layer: the partition record is not this network's."
                )
        return 0 if self.stem == "per_group" else None  # the network's own stem/head: group 0's, or everyone's


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj and isinstance(obj[0], Tensor):
        return obj[0]
    return None


def _check_block_shape(idx: int, module: nn.Module, args: tuple, output: Any) -> None:
    x, y = _first_tensor(args), _first_tensor(output)
    if x is not None and y is not None and x.shape != y.shape:
        raise ValueError(
            f"Block {idx} ({type(module).__name__}) maps shape {tuple(x.shape)} to {tuple(y.shape)}."
            " DiffusionBlocks needs every block to keep the token count and width unchanged;"
            " move projections into the stem or head, outside the block stack."
        )


class BlockStack(nn.ModuleList):
    """The user's blocks, unchanged, that iterate over only the active group's blocks.

    ``active=None`` runs every block (end-to-end). Calling it like ``nn.Sequential`` runs the active
    blocks in order. Every block is checked to keep its input's shape: DiffusionBlocks needs
    set-to-set blocks of one width.
    """

    def __init__(self, blocks: nn.ModuleList | nn.Sequential, groups: list[list[int]]) -> None:
        super().__init__(list(blocks))
        self.groups = groups
        self.active: int | None = None
        for idx, block in enumerate(self):
            block.register_forward_hook(partial(_check_block_shape, idx))  # a partial, so models pickle (spawn)

    def active_indices(self) -> list[int]:
        return list(range(len(self._modules))) if self.active is None else self.groups[self.active]

    def __iter__(self) -> Iterator[nn.Module]:
        modules = list(self._modules.values())
        return iter([modules[i] for i in self.active_indices()])

    def __getitem__(self, idx: int | slice) -> Any:
        if isinstance(idx, slice):  # `for layer in self.layers[:n]` (Hugging Face) must see only active blocks
            wanted = set(range(len(self._modules))[idx])
            modules = list(self._modules.values())
            return [modules[i] for i in self.active_indices() if i in wanted]
        return super().__getitem__(idx)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        for block in self:
            x = block(x, *args, **kwargs)
        return x


class BlockwiseNetwork(nn.Module):
    """A network whose block stack is cut into groups, each trainable and callable on its own.

    ``stem="shared"`` (the official code): the modules outside the stack are shared by all groups and
    trained at every step. ``stem="per_group"``: group 0 uses the network's own stem/head and every other
    group owns a private copy in ``stems[k-1]``, so groups are fully independent.
    """

    if TYPE_CHECKING:  # the type check does not read torch, so it learns the call signature (nn.Module's) here

        def __call__(self, *args: Any, group: int | None = None, **kwargs: Any) -> Any: ...

    def __init__(
        self,
        net: nn.Module,
        num_groups: int,
        group_sizes: Sequence[int] | None = None,
        block_path: str | None = None,
        stem: StemMode = "per_group",
    ) -> None:
        super().__init__()
        if stem not in ("per_group", "shared"):
            raise ValueError(f"stem must be 'per_group' or 'shared', got {stem!r}.")
        path, blocks = find_block_stack(net, block_path)
        self.block_path = path
        self.groups = split_layers(len(blocks), num_groups, group_sizes)
        stack = BlockStack(blocks, self.groups)
        parent_path, _, attr = path.rpartition(".")
        setattr(_get(net, parent_path) if parent_path else net, attr, stack)
        # a plain attribute, not a submodule: the stack's only state-dict home is inside `net`
        object.__setattr__(self, "stack", stack)
        self.net = net
        self.stem_mode = stem
        self.stems = nn.ModuleList()
        if stem == "per_group":
            for _ in range(1, num_groups):
                # a copy of everything but the stack (the memo maps the stack to an empty placeholder)
                self.stems.append(copy.deepcopy(net, memo={id(self.stack): nn.ModuleList()}))

    @property
    def partition(self) -> Partition:
        """How this network is cut (what a checkpoint records of it)."""
        return Partition(self.groups, self.stem_mode, self.block_path)

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def num_layers(self) -> int:
        return len(self.stack._modules)

    def block_modules(self, group: int) -> list[nn.Module]:
        modules = list(self.stack._modules.values())
        return [modules[i] for i in self.groups[group]]

    def stem_module(self, group: int) -> nn.Module | None:
        """The module holding group ``group``'s private stem/head (None for group 0 and shared stems)."""
        return self.stems[group - 1] if self.stem_mode == "per_group" and group > 0 else None

    def stem_parameters(self, group: int = 0) -> list[nn.Parameter]:
        """Parameters outside the stack used when running ``group`` (its own copy for per-group stems)."""
        holder = self.stem_module(group)
        if holder is not None:
            return list(holder.parameters())
        stack_ids = {id(p) for p in self.stack.parameters()}
        return [p for p in self.net.parameters() if id(p) not in stack_ids]

    def group_parameters(self, group: int) -> list[nn.Parameter]:
        """Everything only ``group`` trains: its blocks, plus its own stem/head when stems are per group."""
        params = [p for m in self.block_modules(group) for p in m.parameters()]
        if self.stem_mode == "per_group":
            params += self.stem_parameters(group)
        return params

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters trained at every step (the stem/head in shared mode; nothing in per-group mode)."""
        return self.stem_parameters(0) if self.stem_mode == "shared" else []

    @contextmanager
    def running(self, group: int | None):  # noqa: ANN201
        """Make the stack run only ``group`` (None: all layers) inside the context."""
        previous, self.stack.active = self.stack.active, group
        try:
            yield
        finally:
            self.stack.active = previous

    def forward(self, *args: Any, group: int | None = None, **kwargs: Any) -> Any:
        """Run group ``group`` alone (its stem → its blocks → its head), or the whole network if None."""
        with self.running(group):
            holder = self.stem_module(group) if group is not None else None
            if holder is None:
                return self.net(*args, **kwargs)
            swap = dict(holder.named_parameters())
            swap.update(holder.named_buffers())
            return functional_call(self.net, swap, args, kwargs, strict=False, tie_weights=False)


def autograd_leaves(output: Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) an output depends on, by walking its autograd graph."""
    seen, leaves, stack = set(), set(), [output.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


__all__ = [
    "KNOWN_STACK_PATHS", "BlockStack", "BlockwiseNetwork", "Partition", "autograd_leaves", "find_block_stack",
    "split_layers",
]  # fmt: skip
