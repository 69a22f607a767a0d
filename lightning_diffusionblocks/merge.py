"""Merge checkpoints of jobs that each trained a subset of groups (``groups_to_train``) into one model.

    python -m lightning_diffusionblocks.merge merged.ckpt job0.ckpt job1.ckpt job2.ckpt

Each group must have been trained by exactly one job; the jobs must share the model and partition.
Requires ``stem="per_group"`` (a shared stem would be trained by every job).

Checkpoints are read with torch's restricted unpickler (``weights_only=True``): a file holding anything but tensors
and plain data is refused before any of it runs. The merged file holds tensors and plain data only, so it loads the
same way.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint, unsafe_file_message
from lightning_diffusionblocks.files import atomic_write
from lightning_diffusionblocks.partition import Partition


class MergeError(ValueError):
    """The checkpoints cannot be merged into one consistent model."""


#: where the module's state dict keeps its network and the network's EMA copy
NETWORK_PREFIXES = ("network.", "ema_network.")


def _owner(partition: Partition, key: str) -> int | None:
    for prefix in NETWORK_PREFIXES:
        if key.startswith(prefix):
            return partition.owner(key[len(prefix) :])
    return None


def group_of_key(key: str, info: dict[str, Any]) -> int | None:
    """The group owning the module's state-dict entry ``key`` (None for entries no group owns), as the partition
    recorded in ``info`` (a checkpoint's ``diffusionblocks`` record) assigns it."""
    return _owner(Partition.from_record(info), key)


_RECORD_KEYS = ("groups", "stem", "block_path", "boundaries")


def _load(path: str | Path) -> dict[str, Any]:
    try:
        ckpt = read_checkpoint(path)  # torch's restricted unpickler: a crafted file is refused, never run
    except CheckpointLoadError as err:
        if isinstance(err.__cause__, pickle.UnpicklingError):
            raise MergeError(
                unsafe_file_message(
                    path,
                    err.__cause__,
                    "Nothing was merged (not executed, not written). Merge only checkpoints from a trusted source;"
                    " if you trust this one, re-save it there as tensors and plain data (the checkpoint a"
                    " DiffusionBlocks Trainer writes is) and merge again.",
                )
            ) from err
        raise MergeError(str(err)) from err
    record = ckpt.get("diffusionblocks") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(record, dict) or not isinstance(state, dict):
        raise MergeError(f"{path} is not a DiffusionBlocks checkpoint (no 'diffusionblocks' record or state_dict).")
    lacking = [k for k in _RECORD_KEYS if k not in record]
    if lacking or not isinstance(state.get("group_steps"), torch.Tensor):
        raise MergeError(
            f"{path} lacks {lacking or ['state_dict.group_steps']}; it was not written by a DiffusionBlocks"
            " Trainer (or by an older version). Merge the checkpoints that the per-group jobs' Trainers wrote."
        )
    return ckpt


def _shape(value: Any) -> Any:
    return value.shape if isinstance(value, torch.Tensor) else type(value)


_PLAIN = (torch.Tensor, str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)


def _tensors_and_plain_data(value: Any, where: str) -> None:
    """Raise unless ``value`` is tensors and plain data only, so the merged file loads with ``weights_only=True``."""
    if isinstance(value, _PLAIN):
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            _tensors_and_plain_data(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _tensors_and_plain_data(k, f"a key of {where}")
            _tensors_and_plain_data(v, f"{where}[{k!r}]")
        return
    raise MergeError(
        f"Cannot write {where}: it is a {type(value).__name__}, not a tensor or plain data, so the merged checkpoint"
        " would need the unrestricted unpickler to load. Re-save the input checkpoints with plain data only."
    )


def merge_checkpoints(paths: Sequence[str | Path], out: str | Path) -> dict[str, Any]:
    """Write a checkpoint whose group k comes from the one job that trained group k; returns it."""
    if len(paths) < 2:
        raise MergeError("Give at least two checkpoints to merge.")
    ckpts = [_load(p) for p in paths]
    info = ckpts[0]["diffusionblocks"]
    if info["stem"] != "per_group":
        raise MergeError("Only stem='per_group' checkpoints can be merged: a shared stem is trained by every job.")
    reference = ckpts[0]["state_dict"]
    owner: dict[int, int] = {}
    for i, (path, ckpt) in enumerate(zip(paths, ckpts)):
        other = ckpt["diffusionblocks"]
        for key in _RECORD_KEYS:
            if other[key] != info[key]:
                raise MergeError(
                    f"{path} has {key}={other[key]!r} but {paths[0]} has {info[key]!r};"
                    " merge only jobs of one partition."
                )
        sd = ckpt["state_dict"]
        if sd.keys() != reference.keys() or any(_shape(sd[k]) != _shape(reference[k]) for k in sd):
            raise MergeError(f"{path} holds a different model than {paths[0]} (state-dict keys or shapes differ).")
        trained = [g for g, n in enumerate(sd["group_steps"].tolist()) if n > 0]
        for g in trained:
            if g in owner:
                raise MergeError(f"Group {g} was trained by both {paths[owner[g]]} and {path}; keep one of them.")
            owner[g] = i
    missing = [g for g in range(len(info["groups"])) if g not in owner]
    if missing:
        raise MergeError(f"No checkpoint trained group(s) {missing}; train them (groups_to_train={missing}) first.")
    partition = Partition.from_record(info)
    merged = {}
    for key, value in reference.items():
        try:
            key_group = _owner(partition, key)
        except ValueError as err:
            raise MergeError(f"{paths[0]}: {err}") from err
        merged[key] = ckpts[owner[key_group]]["state_dict"][key] if key_group is not None else value
    merged["group_steps"] = torch.stack([ckpts[owner[g]]["state_dict"]["group_steps"][g] for g in range(len(owner))])
    if "lr_horizons" in reference:  # each group's LR horizon from the job that trained it; the shared entry as is
        horizons = reference["lr_horizons"].clone()
        for g in range(len(owner)):
            horizons[g] = ckpts[owner[g]]["state_dict"]["lr_horizons"][g]
        merged["lr_horizons"] = horizons
    if "step_count" in reference:  # the jobs ran side by side: the merged model continues after the longest
        merged["step_count"] = torch.stack([c["state_dict"]["step_count"] for c in ckpts]).max()
    result = {
        "state_dict": merged,
        "diffusionblocks": info,
        "hyper_parameters": dict(ckpts[0].get("hyper_parameters") or {}),
        "merged_from": [str(p) for p in paths],
        "pytorch-lightning_version": ckpts[0].get("pytorch-lightning_version"),
    }
    _tensors_and_plain_data(result, "the merged checkpoint")
    try:  # a failed write never leaves a half-written merged checkpoint at ``out``
        atomic_write(out, lambda tmp: torch.save(result, tmp))
    except (OSError, RuntimeError) as err:
        raise MergeError(f"Writing {out} failed ({err}); free disk space or choose another path.") from err
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="merged checkpoint to write")
    parser.add_argument("checkpoints", nargs="+", help="checkpoints of the per-group jobs")
    args = parser.parse_args(argv)
    try:
        result = merge_checkpoints(args.checkpoints, args.out)
    except MergeError as err:
        parser.exit(2, f"error: {err}\n")
    steps = result["state_dict"]["group_steps"].tolist()
    print(f"merged {len(args.checkpoints)} checkpoints into {args.out}; steps per group: {steps}")


if __name__ == "__main__":
    main()
