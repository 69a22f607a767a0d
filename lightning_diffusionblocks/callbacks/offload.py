"""`BlockOffload`: only the active group's weights and optimizer state stay on the compute device.

On a GPU, inactive groups live in pinned CPU memory and the next group is copied in on a side stream
while the current step runs. On the CPU, inactive groups are written to disk and their memory is freed,
so the process's own footprint drops. Under sequential phases this happens once per phase; under the
random schedule it happens whenever the drawn group changes (the overhead is measured in ``stats``).
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from typing_extensions import override

from lightning_diffusionblocks.dashboard import is_logging_row, log_metrics
from lightning_diffusionblocks.files import atomic_write, tensor_digest
from lightning_diffusionblocks.memory import release_freed_memory
from lightning_diffusionblocks.memory_plan import Placement
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.planning import GroupPlanning

Target = Literal["auto", "cpu", "disk"]


class OffloadError(RuntimeError):
    """Writing or reading an offloaded group failed; nothing in memory was released."""


PREFIX, OWNER = "ldb-offload-", "owner"


def refusal_reason(err: BaseException) -> str:
    """What torch's restricted unpickler refused, without its advice to load the file unrestricted."""
    text = str(err)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it refers to the global {found.group(1)}, which is not a tensor type"
    found = re.search(r"WeightsUnpickler error: ([^\n]*?)(?: Please use|\n|$)", text)
    return found.group(1).rstrip(".") if found else "it is not a file of plain tensors"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def remove_stale_directories(root: Path) -> list[Path]:
    """Remove ``ldb-offload-*`` folders in ``root`` left by killed runs on this host (their owner process is gone).

    A folder is only removed when its owner file names this host and a process that no longer exists; folders of
    live processes, of other hosts, or without an owner file are left alone.
    """
    removed = []
    for folder in root.glob(PREFIX + "*"):
        if folder.is_symlink() or not folder.is_dir():  # only real folders: never follow a link out of ``root``
            continue
        try:
            pid_text, host = (folder / OWNER).read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if host == socket.gethostname() and pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


class BlockOffload(Callback):
    """Keep inactive block groups (weights, EMA weights, optimizer state) off the compute device.

    Where the files go (``"disk"``): each run (each process of a multi-process run) writes into a folder of its
    own, ``ldb-offload-rank{r}-<random>`` inside ``directory`` (default: the system's temporary directory,
    ``tempfile.gettempdir()``, i.e. ``$TMPDIR``), with an ``owner`` file naming its process and host, so several
    runs and several processes can share one ``directory``. While it runs, :attr:`directory` is that folder. One
    ``group_{k}.pt`` per offloaded group is written to a unique temporary name and renamed, and read back with
    torch's restricted unpickler (``weights_only=True``): a file replaced by a crafted one is refused and never run.
    What was written is also remembered as a SHA-256 digest in memory, so a file that changed since (another
    process's tensors, zeros of the right shapes, one perturbed value) is refused, not loaded.

    When they are cleaned: the run's folder is removed at the end of fit (also after an exception), unless a group
    could not be read back, in which case it stays until every group is whole again or the process ends. A run
    killed before that (SIGKILL, out of memory) leaves it behind; the next ``BlockOffload`` started on the same host
    with the same ``directory`` removes every ``ldb-offload-*`` folder there whose owner process no longer runs
    (folders of live processes, of other hosts, and without an owner file are left alone). The ``directory`` itself
    and anything else in it are never removed.

    A group whose file cannot be read back (deleted, truncated, replaced, changed) is reported by
    :meth:`missing_groups`; its parameters stay empty, so no checkpoint is written while it is missing (the
    offloader stays attached to the strategy and refuses, naming the groups).

    Args:
        target: ``"cpu"`` (pinned host memory; for GPU training), ``"disk"`` (files in ``directory``;
            for CPU training) or ``"auto"`` (cpu on a GPU, disk on the CPU).
        directory: where ``"disk"`` makes this run's folder of ``group_{k}.pt`` files (default: the system's
            temporary directory, see above).
        prefetch: on a GPU, copy the next step's group in on a side stream ahead of time.
    """

    def __init__(self, target: Target = "auto", directory: str | os.PathLike | None = None, prefetch: bool = True):
        if target not in ("auto", "cpu", "disk"):
            raise ValueError(f"target must be 'auto', 'cpu' or 'disk', got {target!r}.")
        self.target = target
        #: where this run's group files are: the run's own folder during fit, else the directory given (or None)
        self.directory = Path(directory) if directory is not None else None
        self._root = self.directory  # the directory given, in which each run makes its own folder
        self.prefetch = prefetch
        self.stats = {"offloads": 0, "loads": 0, "seconds": 0.0, "bytes_moved": 0}
        self._own_directory = False
        self._resident: set[int] = set()
        self._lost: dict[int, OffloadError] = {}  # groups whose offloaded copy could not be read back, and why
        self._layout: dict[int, list[tuple[torch.Size, torch.dtype]]] = {}  # what each group's file must hold
        self._digests: dict[int, str] = {}  # SHA-256 of what this run last wrote for each group
        self._finished = False  # teardown ran: groups are not offloaded again
        self._pinned: dict[int, dict[int, Tensor]] = {}  # cpu target: group -> {tensor slot -> pinned buffer}
        self._prefetched: dict[int, dict[int, Tensor]] = {}
        self._stream: torch.cuda.Stream | None = None
        self._module: Any = None
        self._strategy: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._device = torch.device("cpu")
        self._mode: Literal["cpu", "disk"] = "disk"
        self._state_on_host = False  # after training: optimizer state comes back to host memory, not the device

    # ------------------------------------------------------------------ set-up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if pl_module is self._module and self.missing_groups():
            raise MisconfigurationException(
                f"The weights of group(s) {self.missing_groups()} were lost in the previous fit (their offloaded copies"
                " could not be read back). Load the last complete checkpoint (ckpt_path=...) instead of training on."
            )
        self._release_directory()  # a folder kept for an earlier module's lost groups
        self._lost.clear()
        self._layout.clear()
        self._digests.clear()
        self._finished = False
        self._state_on_host = False
        if not isinstance(trainer.strategy, GroupPlanning) or not isinstance(pl_module, DiffusionBlocksModule):
            raise MisconfigurationException(
                "BlockOffload moves inactive block groups off the device, which only exist under"
                " a DiffusionBlocks strategy (e.g. strategy='diffusionblocks') with a DiffusionBlocksModule. Remove the"
                " callback for end-to-end runs."
            )
        self._module, self._strategy = pl_module, trainer.strategy
        self._device = trainer.strategy.root_device
        self._mode = ("cpu" if self._device.type == "cuda" else "disk") if self.target == "auto" else self.target
        if self._mode == "cpu" and self._device.type == "cpu":
            raise MisconfigurationException(
                "BlockOffload(target='cpu') moves groups to CPU memory, but training already runs on the CPU."
                " Use target='disk' (or 'auto') to free the process's memory."
            )
        if self._mode == "disk":
            self._prepare_directory(trainer.global_rank)
        trainer.strategy.offloader = self

    def placement(self) -> Placement:
        """Where this callback keeps inactive groups in the fit being set up (read by the memory plan)."""
        return Placement(self._mode, self.prefetch and self._mode == "cpu", self.directory)

    def _prepare_directory(self, rank: int) -> None:
        """Make this run's own folder in the given directory (or ``$TMPDIR``), after removing dead runs' folders."""
        root = self._root if self._root is not None else Path(tempfile.gettempdir())
        try:
            root.mkdir(parents=True, exist_ok=True)
            remove_stale_directories(root)
            folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}rank{rank}-", dir=root))
            (folder / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}")
        except OSError as err:
            raise MisconfigurationException(
                f"BlockOffload cannot write to {root} ({err.strerror or err})."
                " Pass BlockOffload(directory=...) pointing at a writable directory with room for the model."
            ) from err
        self.directory, self._own_directory = folder, True

    # ------------------------------------------------------------------ which tensors a group owns
    def _params(self, group: int) -> list[torch.nn.Parameter]:
        m = self._module
        params = list(m.network.group_parameters(group))
        if m.ema_network is not None:
            params += m.ema_network.group_parameters(group)
        return params

    def _slots(self, group: int) -> list[tuple[Any, Any]]:
        """(container, key) pairs whose tensor belongs to ``group``: parameter data and optimizer state."""
        slots: list[tuple[Any, Any]] = [(p, "data") for p in self._params(group)]
        opt = self._optimizer
        if opt is not None:
            for p in self._module.network.group_parameters(group):
                state = opt.state.get(p, {})
                slots += [(state, k) for k, v in state.items() if isinstance(v, Tensor) and v.dim() > 0]
        return slots

    def _target(self, slot: tuple[Any, Any]) -> torch.device:
        """Where a slot's tensor goes on load: the compute device, except optimizer state once training is over."""
        return torch.device("cpu") if self._state_on_host and slot[1] != "data" else self._device

    @staticmethod
    def _get(slot: tuple[Any, Any]) -> Tensor:
        owner, key = slot
        return owner.data if key == "data" else owner[key]

    @staticmethod
    def _set(slot: tuple[Any, Any], value: Tensor) -> None:
        owner, key = slot
        if key == "data":
            owner.data = value
        else:
            owner[key] = value

    # ------------------------------------------------------------------ moves
    def _file(self, group: int) -> Path:
        if self.directory is None or not self._own_directory:
            raise OffloadError(f"Group {group} is not in memory and the offload folder is gone; reload a checkpoint.")
        return self.directory / f"group_{group}.pt"

    def offload(self, group: int) -> None:
        """Move ``group`` off the compute device (to pinned host memory or to disk)."""
        if group not in self._resident:
            return
        start = time.perf_counter()
        if self._module.state_store is not None:  # what moves is the group's low-precision (stored) form
            self._module.state_store.store(group)
        slots = self._slots(group)
        tensors = [self._get(s) for s in slots]
        moved = sum(t.numel() * t.element_size() for t in tensors)
        if self._mode == "disk":
            path = self._file(group)
            try:  # a temporary of its own (never another run's name), renamed over the group file once whole
                atomic_write(path, lambda tmp: torch.save(tensors, tmp))
            except (OSError, RuntimeError) as err:
                raise OffloadError(
                    f"Writing group {group} to {path} failed ({err}). Training stopped; the group is still in memory"
                    " and saved checkpoints are untouched. Free disk space or pass BlockOffload(directory=...)."
                ) from err
            self._layout[group] = [(t.shape, t.dtype) for t in tensors]
            self._digests[group] = tensor_digest(*tensors)
            for slot, t in zip(slots, tensors):
                self._set(slot, torch.empty(0, dtype=t.dtype, device=t.device))
            tensors.clear()
            release_freed_memory()  # the allocator would otherwise keep the group's pages: the process must shrink
        else:
            host = self._pinned.get(group, {})
            for i, t in enumerate(tensors):
                buf = host.get(i)
                if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                    buf = host[i] = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
                buf.copy_(t, non_blocking=True)
            self._pinned[group] = host  # pinned buffers are reused: allocating pinned memory is slow
            torch.cuda.current_stream(self._device).synchronize()
            for i, slot in enumerate(slots):
                self._set(slot, host[i])
        self._resident.discard(group)
        self.stats["offloads"] += 1
        self.stats["bytes_moved"] += moved
        self.stats["seconds"] += time.perf_counter() - start

    def _start_prefetch(self, group: int) -> None:
        if self._mode != "cpu" or group in self._resident or group in self._prefetched:
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream(self._device)
        slots = self._slots(group)
        with torch.cuda.stream(self._stream):
            self._prefetched[group] = {i: self._get(s).to(self._device, non_blocking=True) for i, s in enumerate(slots)}

    def load(self, group: int) -> None:
        """Bring ``group`` back onto the compute device."""
        if group in self._resident:
            return
        start = time.perf_counter()
        slots = self._slots(group)
        if self._mode == "disk":
            path = self._file(group)
            try:
                tensors = torch.load(path, map_location="cpu", weights_only=True)  # then each to its _target
            except pickle.UnpicklingError as err:  # a replaced file is refused by the restricted unpickler
                raise OffloadError(
                    f"The offloaded copy of group {group} at {path} holds objects other than tensors"
                    f" ({refusal_reason(err)}): it was replaced after this run wrote it, so it was refused and nothing"
                    " in it ran. Only this process writes to its offload folder: check what else writes there, and"
                    " resume from the last saved checkpoint."
                ) from None  # torch's own message would advise loading the file unrestricted
            except (OSError, RuntimeError, EOFError) as err:
                raise OffloadError(
                    f"Reading offloaded group {group} from {path} failed ({err}). Was the offload directory deleted or"
                    " shared with another run? Resume from the last saved checkpoint."
                ) from err
            self._check_layout(group, path, tensors, len(slots))
            self._check_digest(group, path, tensors)
            for slot, t in zip(slots, tensors):
                self._set(slot, t.to(self._target(slot)))
        else:
            ready = self._prefetched.pop(group, None)
            if ready is not None:
                assert self._stream is not None
                torch.cuda.current_stream(self._device).wait_stream(self._stream)
                for t in ready.values():
                    t.record_stream(torch.cuda.current_stream(self._device))
            else:
                ready = {i: self._get(s).to(self._target(s), non_blocking=True) for i, s in enumerate(slots)}
            for i, slot in enumerate(slots):
                self._set(slot, ready[i])
        moved = sum(self._get(s).numel() * self._get(s).element_size() for s in slots)
        self._resident.add(group)
        self.stats["loads"] += 1
        self.stats["bytes_moved"] += moved
        self.stats["seconds"] += time.perf_counter() - start

    def _check_layout(self, group: int, path: Path, tensors: Any, count: int) -> None:
        """Refuse a file that is not the list of tensors this run wrote (a stale or foreign file of the same name)."""
        expected = self._layout.get(group)
        valid = isinstance(tensors, list) and len(tensors) == count and all(isinstance(t, Tensor) for t in tensors)
        if not valid or (expected is not None and [(t.shape, t.dtype) for t in tensors] != expected):
            raise OffloadError(
                f"{path} does not hold the {count} tensors this run offloaded for group {group} (shapes or types"
                " differ): it was replaced after this run wrote it, so it was refused and not loaded. Only this process"
                " writes to its offload folder: check what else writes there, and resume from the last saved"
                " checkpoint."
            )

    def _check_digest(self, group: int, path: Path, tensors: list[Tensor]) -> None:
        """Refuse a file whose tensors are not the bytes this run wrote (right shapes, other values)."""
        expected = self._digests.get(group)
        if expected is None or tensor_digest(*tensors) != expected:
            raise OffloadError(
                f"The offloaded copy of group {group} at {path} changed since this run wrote it (its SHA-256 differs"
                " from the one kept in memory), so it was refused and not loaded. Only this process writes to its"
                " offload folder: check what else writes there, and resume from the last saved checkpoint."
            )

    def activate(self, group: int) -> None:
        """Make ``group`` the only resident group."""
        for other in sorted(self._resident - {group}):
            self.offload(other)
        self.load(group)

    def load_all(self) -> list[int]:
        """Bring every group back, trying each one even when another fails; returns the groups that could not
        be read back (their weights stay empty; :meth:`missing_groups` keeps reporting them)."""
        for g in range(self._module.num_blocks):
            try:
                self.load(g)
            except OffloadError as err:
                self._lost[g] = err.with_traceback(None)  # keep the reason, not the frames (and their tensors)
            else:
                self._lost.pop(g, None)
        return self.missing_groups()

    def missing_groups(self) -> list[int]:
        """The groups whose offloaded copy could not be read back and whose weights are still empty in the module.

        Empty until a read fails; a group leaves the list once it is read back (:meth:`load_all` retries).
        """
        if self._module is None:
            return []
        self._lost = {g: e for g, e in self._lost.items() if any(p.numel() == 0 for p in self._params(g))}
        return sorted(self._lost)

    def _lost_error(self, missing: list[int], consequence: str) -> OffloadError:
        reasons = " ".join(f"Group {g}: {self._lost[g]}" for g in missing)
        err = OffloadError(
            f"The offloaded copies of group(s) {missing} could not be read back from {self.directory}; {consequence}"
            f" Resume from the last saved checkpoint. {reasons}"
        )
        err.__cause__ = self._lost[missing[0]]
        return err

    def _load_every_group(self) -> None:
        missing = self.load_all()
        if missing:
            raise self._lost_error(missing, "the model is incomplete and no checkpoint will be written from it.")

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # optimizer state is restored by now (resume); every group is still on the device
        self._optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._resident = set(range(pl_module.num_blocks))
        self.activate(trainer.strategy.select_group(trainer.global_step))
        rank_zero_info(
            f"BlockOffload: inactive groups go to {'pinned CPU memory' if self._mode == 'cpu' else self.directory}."
        )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.activate(trainer.strategy.select_group(trainer.global_step))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.prefetch:
            self._start_prefetch(trainer.strategy.select_group(trainer.global_step))
        if is_logging_row(trainer):
            log_metrics(trainer, self.metrics())

    def metrics(self) -> dict[str, float]:
        """The moves so far, as logged on every logging row: ``offload/seconds`` (time spent moving, excluding
        prefetches that overlap a step), ``offload/mib_moved``, and the counts ``offload/offloads`` and
        ``offload/loads``."""
        stats = self.stats
        return {
            "offload/seconds": float(stats["seconds"]),
            "offload/mib_moved": stats["bytes_moved"] / 2**20,
            "offload/offloads": float(stats["offloads"]),
            "offload/loads": float(stats["loads"]),
        }

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resident:  # training has started: validation visits every group
            self._load_every_group()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # leave a whole model behind for sampling and checkpoints; the optimizer state of offloaded groups comes
        # back to host memory (Lightning's teardown moves it there anyway), since a model trained block-wise
        # because its training state does not fit the device must not need it all on the device now
        self._state_on_host = True
        self._load_every_group()
        # the pinned copies of the weights are stale now; dropping them before Lightning's teardown copies the
        # model to the host keeps the host from holding the weights twice (the H100 headline's process was killed
        # for memory there); the optimizer state keeps the pinned buffers it now lives in
        self._pinned.clear()
        self._prefetched.clear()
        rank_zero_info(
            f"BlockOffload: {self.stats['offloads']} offloads, {self.stats['loads']} loads,"
            f" {self.stats['bytes_moved'] / 2**20:.1f} MiB moved in {self.stats['seconds']:.2f} s."
        )
        if getattr(trainer, "loggers", None):  # the totals, end-of-fit loads included
            log_metrics(trainer, self.metrics())

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")  # Lightning skips teardown hooks after an exception

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._module is not None:
            self._finished = True
            if self._resident != set(range(self._module.num_blocks)):
                self.load_all()  # every group that can be read back is; missing_groups() names the rest
            self._pinned.clear()  # host buffers go now, not when the callback does (large models: tens of GB)
            self._prefetched.clear()
            if not self.missing_groups():
                self._detach(trainer.strategy)
            # else: stay attached, so a checkpoint saved after this (OnExceptionCheckpoint) asks this offloader,
            # which refuses while groups are missing; the folder stays for a retry (cleaned once the process is gone)

    def _detach(self, strategy: Any) -> None:
        if getattr(strategy, "offloader", None) is self:
            strategy.offloader = None
        self._release_directory()

    def _release_directory(self) -> None:
        if self._own_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory, self._own_directory = self._root, False

    # ------------------------------------------------------------------ checkpoints
    def expose_for_checkpoint(self) -> list[int]:
        """Load every offloaded group so a checkpoint sees real tensors; returns the groups to re-offload.

        Raises :class:`OffloadError` naming the groups that cannot be read back: a checkpoint without them would
        hold empty tensors.
        """
        offloaded = [g for g in range(self._module.num_blocks) if g not in self._resident]
        missing = self.load_all() if offloaded else self.missing_groups()
        if missing:
            raise self._lost_error(missing, "refusing to write a checkpoint that would hold empty tensors for them.")
        if self._finished:  # after fit the model stays whole: nothing goes back to disk
            self._detach(self._strategy)
            return []
        return offloaded
