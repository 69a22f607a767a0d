"""Find a network's stack of residual blocks, cut it into groups, and run one group at a time.

The stack is swapped in place for a :class:`BlockStack` with the same children, so state-dict keys
(``blocks.0.attn.qkv.weight`` …) stay exactly as the user's network had them.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from torch import Tensor, nn
from torch.func import functional_call

from lightning_diffusionblocks.activation_checkpointing import checkpointing

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
    hint = ""
    if type(model).__module__.startswith("diffusers."):  # a diffusers model given as is: name the wrapper
        hint = (
            " It is a diffusers model: wrap it as lightning_diffusionblocks.models.DiffusersNetwork(model), which finds"
            " its stacks, takes its conditioning and returns a tensor."
        )
    raise ValueError(
        f"Could not find a block stack in {type(model).__name__}: none of {', '.join(KNOWN_STACK_PATHS)} is an"
        " nn.ModuleList/nn.Sequential. Pass `block_path='<dotted.path.to.blocks>'` to DiffusionBlocksModule."
        + hint
    )


_PART = re.compile(r"^(?P<path>[A-Za-z_][\w.]*?)(\[(?P<start>\d+):(?P<stop>\d+)\])?$")


def stack_parts(block_path: str) -> list[tuple[str, int | None, int | None]]:
    """The parts of a block path: ``"a"`` is one stack; ``"a+b"`` is stack ``a`` then stack ``b`` as one global layer
    index (a group may span the seam), each part optionally with its global ``[start:stop]`` range as recorded."""
    parts = []
    for text in block_path.split("+"):
        match = _PART.match(text.strip())
        if match is None:
            raise ValueError(
                f"Cannot read the block path {block_path!r}: give dotted attribute paths joined by '+' for stacks run"
                " one after the other, e.g. block_path='transformer_blocks+single_transformer_blocks'."
            )
        start, stop = match["start"], match["stop"]
        parts.append((match["path"], None if start is None else int(start), None if stop is None else int(stop)))
    return parts


def find_block_stacks(model: nn.Module, path: str | None = None) -> tuple[str, list[tuple[str, nn.ModuleList]]]:
    """The block path (canonical form) and each stack it names, in the order their layers run.

    One stack: as :func:`find_block_stack`. Several (``"a+b"``, given or declared in ``diffusionblocks_stack_path``):
    their layers get one global index, and the canonical path records each part's range, ``"a[0:2]+b[2:4]"``, so a
    checkpoint's keys ``a.<i>.…`` / ``b.<i>.…`` map to their groups without the network (:meth:`Partition.owner`).
    """
    path = path or getattr(model, "diffusionblocks_stack_path", None)
    if not path or "+" not in path:
        found_path, found = find_block_stack(model, path)
        return found_path, [(found_path, found)]
    parts, names, start = [], [], 0
    for part, first, stop in stack_parts(path):
        part_path, found = find_block_stack(model, part)
        if first is not None and (first, stop) != (start, start + len(found)):
            raise ValueError(
                f"The block path {path!r} says `{part}` holds layers [{first}:{stop}], but the network's `{part}` holds"
                f" {len(found)} layers from layer {start}: the path was recorded for another network."
            )
        parts.append((part_path, found))
        names.append(f"{part_path}[{start}:{start + len(found)}]")
        start += len(found)
    return "+".join(names), parts


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
        for part, start, _ in stack_parts(self.block_path):
            blocks = part + "."
            if not inner.startswith(blocks):
                continue
            index, _, rest = inner[len(blocks) :].partition(".")
            if index.isdigit() and rest:
                layer = int(index) + (start or 0)
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


class _ActiveView(nn.ModuleList):
    """A list of blocks that iterates over only those of the running group.

    ``trimmed`` (declared by the network as ``diffusionblocks_trimmed_stack = True``): while a group runs, integer
    indices and ``len`` are the group's too, so the network sees the model it would be if built with only that
    group's blocks (``stack[0]`` is the group's first block). Otherwise an integer index is the block's own.
    """

    trimmed: bool

    def running_indices(self) -> list[int]:
        """Indices (into this list) of the blocks that run now, in order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[nn.Module]:
        modules = list(self._modules.values())
        return iter([modules[i] for i in self.running_indices()])

    def __getitem__(self, idx: int | slice) -> Any:
        modules = list(self._modules.values())
        if isinstance(idx, slice):  # `for layer in self.layers[:n]` (Hugging Face) must see only active blocks
            if getattr(self, "trimmed", False):
                return [modules[i] for i in self.running_indices()[idx]]
            wanted = set(range(len(modules))[idx])
            return [modules[i] for i in self.running_indices() if i in wanted]
        if getattr(self, "trimmed", False):
            return modules[self.running_indices()[idx]]
        return super().__getitem__(idx)

    def __len__(self) -> int:
        if getattr(self, "trimmed", False):
            return len(self.running_indices())
        return len(self._modules)


class BlockStack(_ActiveView):
    """The user's blocks, unchanged, that iterate over only the active group's blocks.

    ``active=None`` runs every block (end-to-end). Calling it like ``nn.Sequential`` runs the active
    blocks in order. Every block is checked to keep its input's shape: DiffusionBlocks needs
    set-to-set blocks of one width. ``trimmed``: see :class:`_ActiveView`.
    """

    def __init__(self, blocks: Sequence[nn.Module], groups: list[list[int]], trimmed: bool = False) -> None:
        super().__init__(list(blocks))
        self.groups = groups
        self.active: int | None = None
        self.trimmed = trimmed
        for idx, block in enumerate(self._modules.values()):
            block.register_forward_hook(partial(_check_block_shape, idx))  # a partial, so models pickle (spawn)

    def active_indices(self) -> list[int]:
        return list(range(len(self._modules))) if self.active is None else self.groups[self.active]

    def running_indices(self) -> list[int]:
        return self.active_indices()

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        for block in self:
            x = block(x, *args, **kwargs)
        return x


class StackPart(_ActiveView):
    """One of several stacks that run one after the other (``block_path="a+b"``), at its own place in the network
    (so its state-dict keys stay the network's): its blocks are layers ``offset …`` of the whole :class:`BlockStack`
    and run when the whole stack's active group holds them."""

    def __init__(self, blocks: Sequence[nn.Module], whole: BlockStack, offset: int) -> None:
        super().__init__(list(blocks))
        object.__setattr__(self, "whole", whole)  # not a submodule: the blocks' state-dict home is this part
        self.offset = offset
        self.trimmed = whole.trimmed

    def running_indices(self) -> list[int]:
        whole: BlockStack = self.__dict__["whole"]
        count = len(self._modules)
        return [i - self.offset for i in whole.active_indices() if self.offset <= i < self.offset + count]


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
        path, parts = find_block_stacks(net, block_path)
        self.block_path = path
        blocks = [block for _, part in parts for block in part]
        self.groups = split_layers(len(blocks), num_groups, group_sizes)
        stack = BlockStack(blocks, self.groups, trimmed=bool(getattr(net, "diffusionblocks_trimmed_stack", False)))
        installed: list[nn.Module] = [stack]
        if len(parts) == 1:
            _install(net, path, stack)
        else:  # each part stays where it was (its keys unchanged) and runs the layers of the whole stack it holds
            offset = 0
            for part_path, part in parts:
                view = StackPart(part, stack, offset)
                _install(net, part_path, view)
                installed.append(view)
                offset += len(part)
        # a plain attribute, not a submodule: the stack's only state-dict home is inside `net`
        object.__setattr__(self, "stack", stack)
        self.net = net
        self.stem_mode = stem
        #: checkpoint every k-th block of the running group while gradients are on (None: no checkpointing)
        self.checkpoint_every: int | None = None
        self.stems = nn.ModuleList()
        if stem == "per_group":
            for _ in range(1, num_groups):
                # a copy of everything but the stack (the memo maps the stack to an empty placeholder)
                self.stems.append(copy.deepcopy(net, memo={id(m): nn.ModuleList() for m in installed}))

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
        """Make the stack run only ``group`` (None: all layers) inside the context; with ``checkpoint_every`` k, every
        k-th of those blocks runs under activation checkpointing (the network may give the context its hooks need at
        recomputation as ``diffusionblocks_recompute_context(block)``)."""
        previous, self.stack.active = self.stack.active, group
        try:
            modules = list(self.stack._modules.values())
            running = [modules[i] for i in self.stack.active_indices()]
            recompute = getattr(self.net, "diffusionblocks_recompute_context", None)
            with checkpointing(running, self.checkpoint_every, recompute):
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


def _install(net: nn.Module, path: str, stack: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    setattr(_get(net, parent_path) if parent_path else net, attr, stack)


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
    "KNOWN_STACK_PATHS", "BlockStack", "BlockwiseNetwork", "Partition", "StackPart", "autograd_leaves",
    "find_block_stack", "find_block_stacks", "split_layers", "stack_parts",
]  # fmt: skip
