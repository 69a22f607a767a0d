"""Merge checkpoints of jobs that each trained a subset of groups (``groups_to_train``) into one model.

    python -m lightning_diffusionblocks.merge merged.ckpt job0.ckpt job1.ckpt job2.ckpt

Each group must have been trained by exactly one job; the jobs must share the model and partition.
Requires ``stem="per_group"`` (a shared stem would be trained by every job).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lightning_diffusionblocks.checkpoints import CheckpointLoadError, read_checkpoint


class MergeError(ValueError):
    """The checkpoints cannot be merged into one consistent model."""


def group_of_key(key: str, info: dict[str, Any]) -> int | None:
    """The group owning state-dict entry ``key`` (None for entries no group owns)."""
    block_prefix = re.escape(info["block_path"])
    for prefix in ("network.", "ema_network."):
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        match = re.match(rf"net\.{block_prefix}\.(\d+)\.", rest)
        if match:
            layer = int(match.group(1))
            return next(g for g, layers in enumerate(info["groups"]) if layer in layers)
        match = re.match(r"stems\.(\d+)\.", rest)
        if match:
            return int(match.group(1)) + 1
        if rest.startswith("net."):
            return 0  # the network's own stem/head belongs to group 0 when stems are per group
    return None


def _load(path: str | Path) -> dict[str, Any]:
    try:
        ckpt = read_checkpoint(path)  # torch's restricted unpickler: a crafted file is refused, never run
    except CheckpointLoadError as err:
        raise MergeError(str(err)) from err
    if "diffusionblocks" not in ckpt or "state_dict" not in ckpt:
        raise MergeError(f"{path} is not a DiffusionBlocks checkpoint (no 'diffusionblocks' record).")
    return ckpt


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
        for key in ("groups", "stem", "block_path", "boundaries"):
            if other[key] != info[key]:
                raise MergeError(
                    f"{path} has {key}={other[key]!r} but {paths[0]} has {info[key]!r};"
                    " merge only jobs of one partition."
                )
        sd = ckpt["state_dict"]
        if sd.keys() != reference.keys() or any(sd[k].shape != reference[k].shape for k in sd):
            raise MergeError(f"{path} holds a different model than {paths[0]} (state-dict keys or shapes differ).")
        trained = [g for g, n in enumerate(sd["group_steps"].tolist()) if n > 0]
        for g in trained:
            if g in owner:
                raise MergeError(f"Group {g} was trained by both {paths[owner[g]]} and {path}; keep one of them.")
            owner[g] = i
    missing = [g for g in range(len(info["groups"])) if g not in owner]
    if missing:
        raise MergeError(f"No checkpoint trained group(s) {missing}; train them (groups_to_train={missing}) first.")
    merged = {}
    for key, value in reference.items():
        g = group_of_key(key, info)
        merged[key] = ckpts[owner[g]]["state_dict"][key] if g is not None else value
    merged["group_steps"] = torch.stack([ckpts[owner[g]]["state_dict"]["group_steps"][g] for g in range(len(owner))])
    result = {
        "state_dict": merged,
        "diffusionblocks": info,
        "hyper_parameters": ckpts[0].get("hyper_parameters", {}),
        "merged_from": [str(p) for p in paths],
        "pytorch-lightning_version": ckpts[0].get("pytorch-lightning_version"),
    }
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(result, tmp)
    tmp.replace(out)
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
