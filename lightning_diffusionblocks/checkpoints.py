"""Reading checkpoint files as data: torch's restricted unpickler only, so a crafted file is refused, never run."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read safely or does not fit what it is loaded into."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a file holding objects that would run code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            f"{path} holds objects other than tensors and plain data, which loading would execute; it was refused"
            f" and nothing in it ran ({str(err).splitlines()[0]}). Only load checkpoints from sources you trust, and"
            " re-save them as plain state dicts."
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointLoadError(f"Cannot read checkpoint {path}: {err}") from err
