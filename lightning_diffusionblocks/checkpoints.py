"""Reading checkpoint files as data: torch's restricted unpickler only, so a crafted file is refused, never run.

Every read passes ``weights_only=True`` explicitly: torch honours an explicit value even when the environment sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (that variable only replaces a value the caller left unset). A refusal names
what the file tried to load (e.g. the global ``builtins.exec``) and never suggests the unrestricted unpickler.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+) was not an allowed global")
_DETAIL = re.compile(r"WeightsUnpickler error: ([^\n]*)")


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read safely or does not fit what it is loaded into."""


def refused_content(err: BaseException) -> str:
    """What torch's restricted unpickler refused, read from its message: ``the global `builtins.exec```.

    torch's own first line advises loading with the unrestricted unpickler, which would run the file; only the part
    naming the refused global (or the refused pickle operation) is kept.
    """
    text = str(err)
    found = _GLOBAL.search(text)
    if found:
        return f"the global `{found.group(1)}`"
    found = _DETAIL.search(text)
    if found:  # another refused operation; its own sentence, without torch's advice that follows it
        detail = found.group(1).split(". Please")[0].split(". Use ")[0].strip().rstrip(".")
        if detail and "weights_only" not in detail and "safe_globals" not in detail:
            return f"an object the restricted unpickler refuses ({detail})"
    return "an object that is not a tensor or plain data"


def unsafe_file_message(path: str | Path, err: BaseException, advice: str) -> str:
    """The refusal of a file torch's restricted unpickler would not load: names the refused global, runs nothing."""
    return (
        f"{path} holds objects other than tensors and plain data ({refused_content(err)}): loading it would run"
        f" code the file chooses, so it was refused and nothing in it ran. {advice}"
    )


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a file holding objects that would run code is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointLoadError(
            unsafe_file_message(
                path,
                err,
                "Only load checkpoints from sources you trust. A DiffusionBlocks checkpoint holds tensors and plain"
                " data only; re-save this one that way where it was made (e.g. its state_dict).",
            )
        ) from err
    except (OSError, RuntimeError, EOFError) as err:
        raise CheckpointLoadError(f"Cannot read checkpoint {path}: {err}") from err
