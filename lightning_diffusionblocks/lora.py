"""One LoRA adapter per block group (peft): fine-tune a network group by group with low-rank weights only.

``DiffusionBlocksModule(net, task, lora=GroupLoRA(rank=4))`` gives group ``g`` an adapter of its own, named
``group_<g>``, on the Linears inside group ``g``'s blocks and nowhere else, and freezes every weight of the network.
Each group's adapter therefore lives inside that group's blocks, so everything the package does per group holds for
it unchanged: a block-wise step's graph holds only its group's blocks, so only that group's adapter receives
gradients and optimizer state (the optimizer skips parameters without gradients); :class:`Partition.owner` gives it
to its group; ``BlockOffload`` moves it and its optimizer state with the group's other weights; the memory monitor
counts it as one of the module's parameters.

A group's adapter leaves on its own, in peft's format (:func:`save_adapters`: ``adapter_config.json`` and
``adapter_model.safetensors``, loadable onto a fresh copy of the base network with
``peft.PeftModel.from_pretrained``), so groups trained on different machines or days combine; :func:`merged_network`
folds every adapter into its Linear's weight and gives back the network with its own plain layers
(:func:`merge_adapters` does it in place to a module, which then exports and checkpoints as a plain one).

peft is imported only when an adapter is made or saved: the package stays importable without it.
"""

from __future__ import annotations

import copy
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_diffusionblocks.files import atomic_write
from lightning_diffusionblocks.partition import BlockwiseNetwork

if TYPE_CHECKING:
    from lightning_diffusionblocks.module import DiffusionBlocksModule

INSTALL_HINT = (
    "Per-group LoRA needs peft: `pip install 'lightning-diffusionblocks[diffusers]'` (or `pip install 'peft>=0.21'`)."
)
#: what peft calls an adapter's weights file (``peft.PeftModel.save_pretrained`` writes it beside adapter_config.json)
WEIGHTS_NAME = "adapter_model.safetensors"
#: the prefix ``peft.PeftModel`` gives every key of its adapter files (the base network sits at ``base_model.model``)
PEFT_KEY_PREFIX = "base_model.model."


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ModuleNotFoundError(INSTALL_HINT) from err
    return peft


def adapter_name(group: int) -> str:
    """The peft adapter name of ``group``'s adapter."""
    return f"group_{group}"


def lora_layers(module: nn.Module) -> list[tuple[str, Any]]:
    """(name, layer) of every peft LoRA layer in ``module``; none when peft was never imported (then none exists)."""
    if sys.modules.get("peft") is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_adapters(module: nn.Module) -> bool:
    """Whether ``module`` holds a peft LoRA layer."""
    return bool(lora_layers(module))


def block_linears(network: BlockwiseNetwork, group: int) -> list[tuple[str, str]]:
    """(name inside the network, name inside its block) of every ``nn.Linear`` in ``group``'s blocks.

    Names are the network's own (``blocks.3.attn.qkv``, ``transformer_blocks.3.attn1.to_q``), found by identity, so
    they hold for any block stack the partition found.
    """
    where = {id(m): name for name, m in network.net.named_modules()}
    found = []
    for block in network.block_modules(group):
        prefix = where[id(block)]
        for inner, module in block.named_modules():
            if isinstance(module, nn.Linear) and inner:
                found.append((f"{prefix}.{inner}", inner))
    return found


@dataclass(frozen=True)
class GroupLoRA:
    """One LoRA adapter per block group, on the Linears of that group's blocks; every base weight frozen.

    Args:
        rank: r, the rank of every adapter (a positive integer).
        alpha: the LoRA scale's numerator (the update is alpha / r · B A); default ``rank`` (scale 1).
        target: which Linears of each block get an adapter. A string is a regular expression full-matched against
            a Linear's name inside its block (``r"attn\\.(qkv|proj)"``) or inside the network
            (``r"blocks\\.\\d+\\.attn\\.qkv"``); a list of names matches as peft matches ``target_modules`` (the
            name, or a suffix after a dot: ``["to_q", "to_k", "to_v", "to_out.0"]``). None: every Linear inside the
            blocks.
            Every group must get at least one adapter.
        dropout: dropout on each adapter's input (peft's ``lora_dropout``).
        train_stem: also train the modules outside the block stack (stem/head: each group's own copy with
            ``stem="per_group"``, trained at every step with ``"shared"``). Off by default: then a group's adapter
            is everything its training changed, so its adapter file alone carries the group, the merged model is
            the base network plus the adapters, and the trainable memory is the adapters' alone
            (Σ r·(in + out) over the adapted Linears).
    """

    rank: int = 4
    alpha: float | None = None
    target: str | Sequence[str] | None = None
    dropout: float = 0.0
    train_stem: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(
                f"GroupLoRA needs a positive integer rank, got rank={self.rank!r}; e.g. GroupLoRA(rank=4)."
            )
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"GroupLoRA's alpha must be positive (or None for alpha=rank), got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GroupLoRA's dropout must be in [0, 1), got {self.dropout!r}.")
        if isinstance(self.target, str):
            try:
                re.compile(self.target)
            except re.error as err:
                raise ValueError(f"GroupLoRA's target {self.target!r} is not a regular expression ({err}).") from err
        elif self.target is not None:
            names = tuple(self.target)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(
                    f"GroupLoRA's target must be a regular expression, a non-empty list of Linear names or None,"
                    f" got {self.target!r}; e.g. target=['to_q', 'to_k', 'to_v', 'to_out.0']."
                )
            object.__setattr__(self, "target", names)  # hashable and frozen like the rest

    @classmethod
    def of(cls, value: GroupLoRA | Mapping[str, Any] | None) -> GroupLoRA | None:
        """``value`` as a GroupLoRA: itself, built from its :meth:`record` (what a checkpoint holds), or None."""
        if value is None or isinstance(value, GroupLoRA):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {f.name for f in fields(cls)})
            if unknown:
                raise ValueError(
                    f"A GroupLoRA record has unknown keys {unknown}; it takes {[f.name for f in fields(cls)]}"
                    " (e.g. lora={'rank': 4, 'target': 'attn.*'})."
                )
            return cls(**value)
        raise TypeError(f"lora must be a GroupLoRA, its record (a dict) or None, got {type(value).__name__}.")

    def record(self) -> dict[str, Any]:
        """Plain data that :meth:`of` turns back into this GroupLoRA (stored in checkpoints' hyper-parameters)."""
        target = list(self.target) if isinstance(self.target, tuple) else self.target
        return {"rank": self.rank, "alpha": self.alpha, "target": target, "dropout": self.dropout,
                "train_stem": self.train_stem}  # fmt: skip

    # ------------------------------------------------------------------ placement
    def _matches(self, full: str, inner: str) -> bool:
        if self.target is None:
            return True
        if isinstance(self.target, str):
            return bool(re.fullmatch(self.target, inner) or re.fullmatch(self.target, full))
        return any(full == t or full.endswith("." + t) for t in self.target)

    def targets(self, network: BlockwiseNetwork, group: int) -> list[str]:
        """The names (inside the network) of the Linears that get ``group``'s adapter; refuses a group with none."""
        linears = block_linears(network, group)
        chosen = [full for full, inner in linears if self._matches(full, inner)]
        if not chosen:
            inner_names = list(dict.fromkeys(inner for _, inner in linears))
            example = linears[0][0] if linears else "<none>"
            raise ValueError(
                f"GroupLoRA(target={self.target!r}) matches no Linear of group {group} (layers"
                f" {network.groups[group]} of `{network.block_path}`), and every group needs an adapter. The Linears"
                f" it could match are, by their names inside a block: {', '.join(inner_names) or 'none'} (inside the"
                f" network: {example}, …). Pass a target that matches some of them in every group, e.g."
                f" GroupLoRA(rank={self.rank}, target={_suggest(inner_names)!r}), or target=None for all of them."
            )
        return chosen

    def apply(self, network: BlockwiseNetwork) -> None:
        """Give each group its adapter (``group_<g>``) on its Linears, and freeze everything else.

        Called by :class:`~lightning_diffusionblocks.module.DiffusionBlocksModule` before its EMA copy; refuses a
        network that already holds LoRA layers.
        """
        peft = _peft()
        if has_adapters(network):
            raise ValueError(
                "The network already holds LoRA layers; give DiffusionBlocksModule the base network (without"
                " adapters) and lora=GroupLoRA(...), which adds one adapter per group."
            )
        names = [self.targets(network, g) for g in range(network.num_groups)]  # every group checked before any change
        for g, group_names in enumerate(names):
            config = peft.LoraConfig(
                r=self.rank, lora_alpha=self.alpha if self.alpha is not None else self.rank,
                lora_dropout=self.dropout, target_modules="|".join(re.escape(n) for n in group_names),
            )  # fmt: skip
            with warnings.catch_warnings():  # peft warns that a network gets a second adapter: one per group is meant
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                peft.inject_adapter_in_model(config, network.net, adapter_name=adapter_name(g))
        # peft leaves every LoRA layer running the adapter injected last (the last group's): each layer holds only
        # its own group's adapter, which must be the one it runs
        for _, layer in lora_layers(network.net):
            layer.set_adapter(list(layer.lora_A.keys()))
        network.requires_grad_(False)
        for p in adapter_parameters(network):
            p.requires_grad_(True)
        if self.train_stem:
            for g in range(network.num_groups):
                for p in network.stem_parameters(g):
                    p.requires_grad_(True)


def _suggest(names: list[str]) -> str:
    """A target regex over the attention Linears among ``names`` (or all of them)."""
    attention = [n for n in names if "attn" in n or "attention" in n] or names
    return "|".join(re.escape(n) for n in attention[:4])


def adapter_parameters(network: BlockwiseNetwork, group: int | None = None) -> list[nn.Parameter]:
    """The LoRA parameters of ``group``'s adapter (every group's when None): what its LoRA layers hold beside the base
    layer (peft's ``adapter_layer_names``: ``lora_A``, ``lora_B``)."""
    modules = network.block_modules(group) if group is not None else [network.net]
    return [
        p
        for m in modules
        for _, layer in lora_layers(m)
        for attr in layer.adapter_layer_names
        for p in getattr(layer, attr).parameters()
    ]


def _whole(network: BlockwiseNetwork, what: str) -> None:
    empty = [g for g in range(network.num_groups) if any(p.numel() == 0 for p in network.group_parameters(g))]
    if empty:
        raise RuntimeError(
            f"Cannot {what}: the weights of group(s) {empty} are not in memory (offloaded and not read back). Call it"
            " after fit, when BlockOffload has brought every group back, or on a module loaded from a checkpoint."
        )


def _write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """``tensors`` as a safetensors file at ``path``, written whole or not at all."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata={"format": "pt"})

    atomic_write(path, write)


def save_adapters(network: BlockwiseNetwork, directory: str | Path, groups: Sequence[int] | None = None) -> list[Path]:
    """Write each group's adapter on its own, in peft's format: ``<directory>/group_<g>/`` with ``adapter_config.json``
    and ``adapter_model.safetensors`` (keys as ``peft.PeftModel.save_pretrained`` writes them). Returns the folders.

    ``peft.PeftModel.from_pretrained(base, folder, adapter_name="group_<g>")`` puts one onto a fresh copy of the base
    network (``load_adapter`` adds the others). Pass ``module.sampling_network`` for the EMA weights, if any.
    """
    peft = _peft()
    if not has_adapters(network):
        raise ValueError("The network holds no LoRA adapters; build the module with lora=GroupLoRA(...).")
    _whole(network, "save the adapters")
    if any(p.requires_grad for g in range(network.num_groups) for p in network.stem_parameters(g)):
        rank_zero_warn(
            "The stem/head were trained too (GroupLoRA(train_stem=True)); the adapter files hold only the adapters."
            " Save the merged network (save_merged) or a checkpoint to keep the trained stem/head."
        )
    folders = []
    for g in range(network.num_groups) if groups is None else groups:
        name = adapter_name(g)
        if name not in getattr(network.net, "peft_config", {}):
            raise ValueError(f"The network has no adapter {name!r}; groups are 0…{network.num_groups - 1}.")
        state = peft.get_peft_model_state_dict(network.net, adapter_name=name)
        tensors = {PEFT_KEY_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        config = copy.deepcopy(network.net.peft_config[name])
        config.inference_mode = True
        folder = Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        _write_safetensors(folder / WEIGHTS_NAME, tensors)
        config.save_pretrained(str(folder))
        folders.append(folder)
    return folders


@torch.no_grad()
def _fold(network: BlockwiseNetwork) -> None:
    """Fold every adapter of ``network`` into its Linear's weight and put that plain Linear back in its place."""
    _whole(network, "merge the adapters")
    for name, layer in lora_layers(network.net):
        layer.merge(safe_merge=True, adapter_names=list(layer.lora_A.keys()))
        parent_name, _, attr = name.rpartition(".")
        parent = network.net.get_submodule(parent_name) if parent_name else network.net
        setattr(parent, attr, layer.get_base_layer())
    if hasattr(network.net, "peft_config"):
        del network.net.peft_config


def merged_network(network: BlockwiseNetwork) -> BlockwiseNetwork:
    """A copy of ``network`` with every group's adapter folded into its Linear's weight (W + alpha/r · B A) and each
    LoRA layer replaced by that plain Linear: the network's own modules and state-dict keys, with its outputs (up to
    float rounding). Its parameters are trainable again, like any network's."""
    _peft()
    merged = copy.deepcopy(network)
    _fold(merged)
    return merged.requires_grad_(True)


def merge_adapters(module: DiffusionBlocksModule) -> DiffusionBlocksModule:
    """Fold every group's adapter into ``module``'s own network (and its EMA copy), in place, and return it.

    The module becomes a plain one, as if trained without LoRA: its checkpoints hold the network's own keys and load
    without ``lora``, and anything that exports or samples it sees plain Linears. Its parameters are trainable again
    (a further fit trains all of them); the EMA copy stays frozen.
    """
    if module.lora is None:
        raise ValueError("The module has no LoRA adapters to merge (it was built without lora=GroupLoRA(...)).")
    _peft()
    _fold(module.network)
    module.network.requires_grad_(True)
    if module.ema_network is not None:
        _fold(module.ema_network)
    module.lora = None
    module.hparams.pop("lora", None)
    return module


def save_merged(network: BlockwiseNetwork, path: str | Path) -> Path:
    """Write :func:`merged_network` as a safetensors file of its state dict: ``net.<the network's own keys>`` and,
    with per-group stems, ``stems.<k>.…``; ``BlockwiseNetwork(fresh_net, …).load_state_dict(load_file(path))``
    restores it (``{k[4:]: v for k, v in … if k.startswith("net.")}`` is the network's own state dict)."""
    state = merged_network(network).state_dict()
    tensors: dict[str, Tensor] = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_safetensors(path, tensors)
    return path


__all__ = [
    "GroupLoRA", "adapter_name", "adapter_parameters", "block_linears", "has_adapters", "lora_layers",
    "merge_adapters", "merged_network", "save_adapters", "save_merged",
]  # fmt: skip
