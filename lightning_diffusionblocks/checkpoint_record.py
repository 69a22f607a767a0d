"""The ``diffusionblocks`` record a checkpoint carries beside its weights, and what a load checks against it.

The record holds the partition (``groups``, ``stem``, ``block_path``, ``boundaries``), the settings a resume must
keep (``training``), how the model was trained (``blockwise``), the constructor records of the network and the
task (``net``, ``task``; None unless plain data) and the task's own state. Everything in it is plain data, so the
file loads with ``weights_only=True``; hyper-parameters that are not plain are saved as strings. A load migrates
0.1 checkpoints (which lack the step counter and the LR horizons) and refuses one made with another partition or
without the module's EMA choice, before any weight is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint
from lightning_diffusionblocks.records import (
    RecordError,
    build,
    building_trust,
    class_paths,
    explain_rebuild,
    is_plain,
    record_of,
    top_package,
)
from lightning_diffusionblocks.tasks.base import Task

if TYPE_CHECKING:
    from lightning_diffusionblocks.module import DiffusionBlocksModule

RECORD_KEY = "diffusionblocks"


def partition_info(module: DiffusionBlocksModule) -> dict[str, Any]:
    """The partition a checkpoint must be loaded into: the layers of each group, the stem mode, the block path and
    the noise boundaries."""
    return {
        "groups": module.network.groups,
        "stem": module.network.stem_mode,
        "block_path": module.network.block_path,
        "boundaries": module.boundaries.tolist(),
    }


def training_settings(module: DiffusionBlocksModule) -> dict[str, Any]:
    """The module's settings a resume must keep (recorded in checkpoints, checked by the strategy)."""
    hp: Any = module.hparams
    settings = {
        "seed": hp.seed, "gamma": hp.gamma, "partition": hp.partition,
        "accumulate_grad_batches": hp.accumulate_grad_batches,
    }  # fmt: skip
    if not module.state_precision.full:  # recorded only when set: absent means full precision (and older files)
        settings["state_precision"] = module.state_precision.record()
    return settings


def missing_groups(module: DiffusionBlocksModule) -> list[int]:
    """Groups whose weights are not in memory (e.g. offloaded and not read back)."""
    missing = []
    for g in range(module.num_blocks):
        params = list(module.network.group_parameters(g))
        if module.ema_network is not None:
            params += module.ema_network.group_parameters(g)
        if any(p.numel() == 0 for p in params):
            missing.append(g)
    return missing


def save_record(module: DiffusionBlocksModule, checkpoint: dict[str, Any]) -> None:
    """Write the record into ``checkpoint`` (refusing a checkpoint of empty weights) and make its hyper-parameters
    plain data."""
    micro = module.optimisation.micro
    if micro:
        rank_zero_warn(
            f"A checkpoint is being saved after {micro} of {module.optimisation.settings.accumulate_grad_batches}"
            " accumulated micro-batches; their gradients are not saved, so a resume from it starts that"
            " optimizer step afresh. Save at optimizer steps (ModelCheckpoint(every_n_train_steps=...)) for"
            " exact resumes."
        )
    missing = module.missing_groups()
    if missing:
        raise RuntimeError(
            f"Refusing to write a checkpoint: the weights of group(s) {missing} are not in memory (their"
            " offloaded copies could not be read back), so it would hold empty tensors. Resume from the last"
            " complete checkpoint."
        )
    record = {
        **module.partition_info(),
        "training": module.training_settings(),
        "blockwise": module.blockwise,
        "net": record_of(module.network.net),
        "task": record_of(module.task),
        "task_state": module.task.state(),
    }
    if not is_plain(record):  # anything else would need the unrestricted unpickler to load
        record["net"] = record["task"] = None
    if module.pretrained is not None:  # where the weights came from (plain data by construction)
        record["pretrained"] = module.pretrained
    checkpoint[RECORD_KEY] = record
    hparams = checkpoint.get("hyper_parameters")
    if hparams is not None and not is_plain(dict(hparams)):
        rank_zero_warn(
            "Some hyper-parameters are not plain data (e.g. an OmegaConf config or a Path); they are saved as"
            " strings so the checkpoint stays loadable with weights_only=True."
        )
        checkpoint["hyper_parameters"] = plain(dict(hparams))
        checkpoint.pop("hparams_type", None)


def load_record(module: DiffusionBlocksModule, checkpoint: dict[str, Any]) -> None:
    """Check ``checkpoint`` fits ``module`` (EMA, partition, boundaries), fill in what a 0.1 checkpoint lacks, and
    give the task its saved state."""
    state = checkpoint.get("state_dict", {})
    has_ema = any(k.startswith("ema_network.") for k in state)
    if state and has_ema != (module.ema_network is not None):
        raise CheckpointLoadError(
            f"The checkpoint was trained {'with' if has_ema else 'without'} an EMA copy of the weights but this"
            f" module has ema_decay={module.optimisation.settings.ema_decay}. Build it with"
            f" {'ema_decay=<the decay used in training>' if has_ema else 'ema_decay=None'} to load it."
        )
    if state:  # checkpoints of 0.1 lack the counters added since
        state.setdefault("step_count", state.get("group_steps", module.group_steps).max().clone())
        state.setdefault("lr_horizons", torch.zeros_like(module.lr_horizons))
    saved = checkpoint.get(RECORD_KEY)
    if saved is None:
        rank_zero_warn("The checkpoint has no DiffusionBlocks partition record; loading it as is.")
        return
    mine = module.partition_info()
    for key in ("groups", "stem", "block_path"):
        if saved[key] != mine[key]:
            raise ValueError(
                f"The checkpoint was made with {key}={saved[key]!r} but this module has {key}={mine[key]!r}."
                f" Build the module with the checkpoint's partition (num_blocks={len(saved['groups'])},"
                f" group_sizes={[len(g) for g in saved['groups']]}, stem={saved['stem']!r}) to resume from it."
            )
    if not torch.allclose(torch.tensor(saved["boundaries"], dtype=torch.float64), module.boundaries, rtol=1e-6):
        raise ValueError(
            f"The checkpoint's noise boundaries {saved['boundaries']} differ from this module's"
            f" {module.boundaries.tolist()}; use the same `partition` and noise schedule to resume."
        )
    module.task.load_state(saved.get("task_state") or {})
    module.pretrained = saved.get("pretrained")


def rebuild_arguments(
    checkpoint_path: str | Path, kwargs: dict[str, Any], trusted: tuple[str, ...], call: str
) -> dict[str, Any]:
    """``kwargs`` with ``net`` and ``task`` filled in: the caller's own (a ``class_path`` dict is built), else
    rebuilt from the checkpoint's record under ``trusted``; one error (naming ``call``) says what to pass."""
    kwargs = dict(kwargs)
    for what, expected in (("net", nn.Module), ("task", Task)):
        if isinstance(kwargs.get(what), dict):  # the caller's own config (built before the file's rule applies)
            kwargs[what] = built(kwargs[what], what, expected)
    missing = [what for what in ("net", "task") if what not in kwargs]
    if not missing:
        return kwargs
    checkpoint = read_checkpoint(checkpoint_path)
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, dict) else None
    record = record if isinstance(record, dict) else {}
    problem = explain_rebuild(str(checkpoint_path), {w: record.get(w) for w in missing}, trusted, call)
    if problem is not None:
        raise CheckpointLoadError(problem)
    for what, expected in (("net", nn.Module), ("task", Task)):
        if what in missing:
            try:
                kwargs[what] = build(record[what], what, trusted, expected)
            except RecordError as err:
                raise CheckpointLoadError(str(err)) from err
    return kwargs


def plain(value: Any) -> Any:
    """``value`` with every leaf that is not plain data replaced by its string (for hyper-parameters)."""
    if is_plain(value):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)


def built(value: Any, what: str, expected: type) -> Any:
    """A ``{"class_path", "init_args"}`` dict is built. One the caller wrote is their own config: the packages it
    names are trusted. One met while a checkpoint's record is being rebuilt (``records.trusting``: the record nests
    a module whose argument is such a dict, or the checkpoint's hyper-parameters hold one) came from the file: only
    this package and the packages the caller trusted are imported."""
    if isinstance(value, dict) and "class_path" in value:
        record = {"class_path": value["class_path"], "init_args": value.get("init_args", {})}
        from_record = building_trust()
        trusted = from_record if from_record is not None else [top_package(p) for p in class_paths(value)]
        return build(record, what, trusted=trusted, expected=expected)
    return value
