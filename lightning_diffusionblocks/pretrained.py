"""Start a module's network from pretrained weights, and measure how far fine-tuning moved each group from them.

Fine-tuning block-wise starts every group from one end-to-end model: each group's blocks are that model's layers,
and each group's stem/head (per-group stems) is a copy of the model's own. :func:`load_pretrained` reads the
weights from

* a package checkpoint of an end-to-end run (``Trainer(strategy="auto")``, or ``num_blocks=1``); its EMA weights
  when it kept them (``weights="raw"`` for the trained ones);
* a plain Lightning checkpoint of a module holding the same network (its attribute prefix, e.g. ``model.``, is
  found from the keys, or given as ``prefix=``);
* a safetensors file, or a diffusers ``save_pretrained`` directory (its ``*.safetensors`` weights, sharded or not:
  nothing is imported from diffusers to read them);
* a state dict or an ``nn.Module`` already in memory (e.g. ``DiTTransformer2DModel.from_pretrained(repo)``).

Every key and shape must agree with the network (``strict=True``); otherwise one error names the keys that are
missing, left over or of another shape. ``strict=False`` loads what agrees and reports the rest. The original is
kept as the reference: the module records where its weights came from (``module.pretrained``, plain data saved in
its checkpoints: the source, its digest, what was loaded and skipped) and :meth:`PretrainedReference.drift` gives
the relative change of each group's weights since (from a copy kept in memory, or the source read again and
checked against the digest)::

    module = ldb.DiffusionBlocksModule(ldb.presets.demo_dit(), ldb.tasks.FlowMatching(), num_blocks=3)
    reference = ldb.pretrained.load_pretrained(module, "outputs/mnist_auto/model.ckpt")
    L.Trainer(strategy="diffusionblocks", max_steps=3000).fit(module, data)
    reference.drift(module)    # {"group_0": 0.021, "group_1": 0.017, "group_2": 0.019}
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_diffusionblocks.checkpoint_record import RECORD_KEY
from lightning_diffusionblocks.checkpoints import read_checkpoint
from lightning_diffusionblocks.files import Digest
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.records import class_path

Weights = Literal["ema", "raw"]
#: how many key names an error or a warning shows of each kind
SHOWN = 8
#: the weight file a diffusers (or transformers) save_pretrained directory holds, unsharded
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


class PretrainedLoadError(ValueError):
    """Pretrained weights that do not fit the module's network (or cannot be read as weights)."""


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" … ({len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _directory_weights(directory: Path) -> tuple[dict[str, Tensor], str]:
    """The tensors of a ``save_pretrained`` directory: its sharded index, else its single safetensors file."""
    if (directory / "model_index.json").exists():
        parts = sorted(p.name for p in directory.iterdir() if p.is_dir())
        raise PretrainedLoadError(
            f"{directory} is a whole pipeline (model_index.json); pass the folder of the network to fine-tune,"
            f" e.g. load_pretrained(module, '{directory / 'transformer'}') (its folders: {parts})."
        )
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_safetensors(directory / shard))
        return tensors, "diffusers_directory"
    files = [directory / name for name in WEIGHT_FILES if (directory / name).exists()]
    files = files or sorted(directory.glob("*.safetensors"))
    if len(files) != 1:
        found = sorted(p.name for p in directory.iterdir())
        raise PretrainedLoadError(
            f"{directory} holds {'no' if not files else 'several'} safetensors weight files ({found}); pass the"
            " file itself (load_pretrained(module, 'dir/weights.safetensors')). Pickled .bin weights are not read:"
            " load them with the model class's from_pretrained and pass the model (load_pretrained(module, model))."
        )
    return _safetensors(files[0]), "diffusers_directory"


def _checkpoint_weights(path: Path, weights: Weights) -> tuple[dict[str, Tensor], str, dict[str, Any]]:
    """A checkpoint's tensors: a package checkpoint's network (EMA or raw), else a Lightning or plain state dict."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict):
        raise PretrainedLoadError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint or a state dict.")
    state = checkpoint.get("state_dict", checkpoint)
    record = checkpoint.get(RECORD_KEY)
    if not isinstance(record, dict):
        kind = "lightning_checkpoint" if "state_dict" in checkpoint else "state_dict"
        return {k: v for k, v in state.items() if isinstance(v, Tensor)}, kind, {}
    groups = record.get("groups", [])
    if record.get("blockwise") and len(groups) > 1:
        raise PretrainedLoadError(
            f"{path} was trained block-wise in {len(groups)} groups, each serving its own noise levels with its own"
            " layers: it is not one end-to-end network to start every group from. Continue it with"
            " DiffusionBlocksModule.load_from_checkpoint(...), or fine-tune from an end-to-end checkpoint"
            " (Trainer(strategy='auto'), or num_blocks=1)."
        )
    has_ema = any(k.startswith("ema_network.net.") for k in state)
    if weights == "ema" and not has_ema:
        weights = "raw"  # trained without EMA: its weights are the only ones
    prefix = "ema_network.net." if weights == "ema" else "network.net."
    tensors = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and isinstance(v, Tensor)}
    details = {"weights": weights, "groups": groups, "blockwise": bool(record.get("blockwise"))}
    return tensors, "package_checkpoint", details


def read_weights(
    source: str | Path | nn.Module | Mapping[str, Tensor], weights: Weights = "ema"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors of ``source`` by name, and a plain description of it (``source``, ``kind`` and details)."""
    if weights not in ("ema", "raw"):
        raise ValueError(
            f"weights={weights!r} is neither 'ema' nor 'raw'; e.g. load_pretrained(module, path, weights='raw')."
        )
    if isinstance(source, nn.Module):
        return dict(source.state_dict()), {"source": class_path(source), "kind": "module"}
    if isinstance(source, Mapping):
        return dict(source), {"source": "<state dict>", "kind": "state_dict"}
    path = Path(source)
    if path.is_dir():
        tensors, kind = _directory_weights(path)
        return tensors, {"source": str(path), "kind": kind}
    if not path.exists():
        raise FileNotFoundError(
            f"No pretrained weights at {path}: pass a checkpoint, a safetensors file or a directory."
        )
    if path.suffix == ".safetensors":
        return _safetensors(path), {"source": str(path), "kind": "safetensors"}
    tensors, kind, details = _checkpoint_weights(path, weights)
    return tensors, {"source": str(path), "kind": kind, **details}


def _heads(key: str, depth: int) -> list[str]:
    """"" and every dotted head of ``key`` of up to ``depth`` parts (``model.``, ``model.net.``)."""
    parts = key.split(".")[:-1]
    return [""] + [".".join(parts[:n]) + "." for n in range(1, min(depth, len(parts)) + 1)]


def find_prefixes(source: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> tuple[str, str]:
    """The prefixes ``(in the source, in the network)`` under which most of the network's keys meet the source's:
    ``("model.", "")`` for a Lightning checkpoint of a module holding the network as ``model``, ``("", "model.")`` for
    a bare model's weights loaded into a wrapper holding it as ``model``. The shortest wins a tie."""
    best: tuple[int, int, str, str] = (0, 0, "", "")
    for net_prefix in sorted({h for key in target for h in _heads(key, 1)}):
        wanted = {k[len(net_prefix) :] for k in target if k.startswith(net_prefix)}
        counts: dict[str, int] = {}
        for key in source:
            for head in _heads(key, 3):
                if key[len(head) :] in wanted:
                    counts[head] = counts.get(head, 0) + 1
        for head, count in counts.items():
            candidate = (count, -len(head) - len(net_prefix), head, net_prefix)
            if candidate[:2] > best[:2]:
                best = candidate
    return best[2], best[3]


@dataclass
class Matching:
    """How a source's keys meet the network's: loaded, missing, left over, or of another shape."""

    prefix: str
    net_prefix: str = ""
    loaded: list[str] = field(default_factory=list)  # the network's keys
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # the source's keys
    mismatched: list[str] = field(default_factory=list)  # "key: (source shape) vs (network shape)"

    def source_key(self, key: str) -> str | None:
        """The source's key of the network's ``key`` (None when outside the network prefix)."""
        if not key.startswith(self.net_prefix):
            return None
        return self.prefix + key[len(self.net_prefix) :]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def problems(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"missing from the source ({len(self.missing)}): {_names(self.missing)}")
        if self.unexpected:
            parts.append(f"not in the network ({len(self.unexpected)}): {_names(self.unexpected)}")
        if self.mismatched:
            parts.append(f"of another shape ({len(self.mismatched)}): {_names(self.mismatched)}")
        return "; ".join(parts)


def match(
    source: Mapping[str, Tensor], target: Mapping[str, Tensor], prefix: str | None = None, net_prefix: str | None = None
) -> Matching:
    """Compare ``source`` (its keys under ``prefix``) with the network state dict ``target`` (its keys under
    ``net_prefix``); a prefix left None is found from the keys."""
    found = find_prefixes(source, target)
    result = Matching(found[0] if prefix is None else prefix, found[1] if net_prefix is None else net_prefix)
    used = set()
    for key, tensor in target.items():
        name = result.source_key(key)
        if name is None or name not in source:
            result.missing.append(key)
            continue
        used.add(name)
        if tuple(source[name].shape) != tuple(tensor.shape):
            result.mismatched.append(f"{key}: {tuple(source[name].shape)} vs {tuple(tensor.shape)}")
        else:
            result.loaded.append(key)
    result.unexpected = sorted(k for k in source if k.startswith(result.prefix) and k not in used)
    return result


def weights_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 of the named tensors (dtype, shape and bytes), in name order: the reference's fingerprint."""
    return Digest().tensors(sorted(tensors.items())).hexdigest()


def _owner_key(key: str) -> str:
    """The network's own key of a :class:`BlockwiseNetwork` entry: ``net.x`` and ``stems.<k>.x`` are both ``x``."""
    if key.startswith("stems."):
        return key.split(".", 2)[2]
    return key[len("net.") :]


@dataclass
class PretrainedReference:
    """The weights a module started from: ``record`` (plain data, also in ``module.pretrained``) and, when kept, a
    CPU copy of them (``state``, by the network's own keys); without it :meth:`weights` reads the source again."""

    record: dict[str, Any]
    state: dict[str, Tensor] | None = None

    def weights(self) -> dict[str, Tensor]:
        """The reference weights by network key; read again from the source (checked against the digest) if not
        kept."""
        if self.state is not None:
            return self.state
        source = self.record["source"]
        if self.record["kind"] in ("module", "state_dict"):
            raise PretrainedLoadError(
                "The reference came from an object in memory and was not kept; pass keep_reference=True to"
                " load_pretrained to measure drift from it."
            )
        tensors, _ = read_weights(source, self.record.get("weights", "ema"))
        matching = Matching(self.record["prefix"], self.record["net_prefix"])
        state = {k: tensors[str(matching.source_key(k))] for k in self.record["loaded_keys"]}
        if weights_digest(state) != self.record["digest"]:
            raise PretrainedLoadError(
                f"{source} changed since the module was started from it (its digest differs from the recorded"
                f" {self.record['digest'][:12]}…); keep the original file to measure drift from it."
            )
        return state

    @torch.no_grad()
    def drift(self, module: DiffusionBlocksModule, ema: bool = False) -> dict[str, float]:
        """Relative change ``‖θ − θ₀‖ / ‖θ₀‖`` of each group's weights (its blocks and its own stem/head) and of
        the shared stem (``"shared"``, shared stems only), from the reference ``θ₀``; ``ema`` measures the EMA copy."""
        network = module.ema_network if ema and module.ema_network is not None else module.network
        reference = self.weights()
        partition = network.partition
        sums: dict[str, list[float]] = {}
        for key, param in network.named_parameters():
            base = reference.get(_owner_key(key))
            if base is None:  # not loaded (strict=False): no reference to measure from
                continue
            owner = partition.owner(key)
            name = "shared" if owner is None else f"group_{owner}"
            diff = (param.detach().float().cpu() - base.float()).pow(2).sum().item()
            acc = sums.setdefault(name, [0.0, 0.0])
            acc[0] += diff
            acc[1] += base.float().pow(2).sum().item()
        return {name: (d / n) ** 0.5 if n else 0.0 for name, (d, n) in sorted(sums.items())}


@torch.no_grad()
def load_pretrained(
    module: DiffusionBlocksModule,
    source: str | Path | nn.Module | Mapping[str, Tensor],
    *,
    strict: bool = True,
    prefix: str | None = None,
    net_prefix: str | None = None,
    weights: Weights = "ema",
    keep_reference: bool = True,
) -> PretrainedReference:
    """Load ``source`` into ``module``'s network: every group's blocks, every group's stem/head copy and the EMA
    copy all start from it. Records the source in ``module.pretrained`` and returns the reference.

    Args:
        source: a checkpoint (package or Lightning), a state dict file, a ``.safetensors`` file, a diffusers
            ``save_pretrained`` directory, a state dict or an ``nn.Module``.
        strict: refuse any key missing, left over or of another shape (False: load what agrees, warn, record the
            rest).
        prefix: the prefix of the network's keys in the source (default: found from the keys, e.g. ``model.``).
        net_prefix: the part of the network the source holds (default: found; e.g. ``model.`` when the network
            wraps the source's model as ``model``).
        weights: a package checkpoint's ``"ema"`` weights (when it has them) or its ``"raw"`` trained ones.
        keep_reference: keep a CPU copy of the loaded weights to measure drift from (False: read the source again).
    """
    tensors, info = read_weights(source, weights)
    net = module.network.net
    target = net.state_dict()
    matching = match(tensors, target, prefix, net_prefix)
    named = len(matching.loaded) + len(matching.mismatched)
    if not named or (strict and named * 2 < len(target)):  # not this network's weights: one sentence, not every key
        raise PretrainedLoadError(
            f"Only {named} of the network's {len(target)} weights ({_names(list(target))}) are named in"
            f" {info['source']} ({len(tensors)} tensors: {_names(sorted(tensors))}): it does not hold weights of"
            f" {type(net).__name__}. Build the network the weights were saved from, or give"
            " prefix='<the attribute path of the network in the source>.' if its keys carry one."
        )
    if not matching.complete:
        message = (
            f"The pretrained weights from {info['source']} do not fit {type(net).__name__}: {matching.problems()}."
        )
        if strict:
            raise PretrainedLoadError(
                message + " Build the network with the source's configuration, give prefix='...' if the keys carry"
                " another one, or pass strict=False to load the weights that agree and keep the others as built."
            )
        rank_zero_warn(message + " strict=False: those were skipped, the rest loaded.")
    loaded = {key: tensors[str(matching.source_key(key))] for key in matching.loaded}
    for key, value in loaded.items():
        target[key].copy_(value)
    for stem in module.network.stems:  # every group's own stem/head starts as the network's
        for key, value in stem.state_dict().items():
            value.copy_(target[key])
    if module.ema_network is not None:
        module.ema_network.load_state_dict(module.network.state_dict())
    record = {
        **info,
        "prefix": matching.prefix,
        "net_prefix": matching.net_prefix,
        "digest": weights_digest(loaded),
        "strict": strict,
        "loaded": len(matching.loaded),
        "loaded_keys": sorted(matching.loaded),
        "missing": matching.missing,
        "unexpected": matching.unexpected,
        "mismatched": matching.mismatched,
    }
    module.pretrained = record
    state = {k: v.detach().to("cpu", copy=True) for k, v in loaded.items()} if keep_reference else None
    return PretrainedReference(record, state)


class PretrainedDrift(L.Callback):
    """Logs each group's relative weight change from the pretrained reference (``pretrained/drift_group_k``) every
    ``every_n_steps`` optimizer steps and at the end of training; the last values are in :attr:`last`."""

    def __init__(self, reference: PretrainedReference, every_n_steps: int = 0) -> None:
        self.reference = reference
        self.every_n_steps = every_n_steps
        self.last: dict[str, float] = {}

    def _measure(self, trainer: L.Trainer, module: DiffusionBlocksModule) -> None:
        self.last = self.reference.drift(module)
        if trainer.logger is not None:
            trainer.logger.log_metrics(
                {f"pretrained/drift_{k}": v for k, v in self.last.items()}, step=int(module.step_count)
            )

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = int(pl_module.step_count)  # type: ignore[call-overload]
        if self.every_n_steps and step and step % self.every_n_steps == 0:
            self._measure(trainer, pl_module)  # type: ignore[arg-type]

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._measure(trainer, pl_module)  # type: ignore[arg-type]


__all__ = [
    "Matching", "PretrainedDrift", "PretrainedLoadError", "PretrainedReference", "find_prefixes", "load_pretrained",
    "match", "read_weights", "weights_digest",
]  # fmt: skip
