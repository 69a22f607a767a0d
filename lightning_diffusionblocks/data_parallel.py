"""Data-parallel DiffusionBlocks on Lightning's DDP: every process trains the same group each step.

``Trainer(strategy="diffusionblocks_ddp", devices=N, num_nodes=M)`` (or under ``torchrun``/SLURM, through
Lightning's cluster environments) trains exactly the single-device schedule with an N·M× larger global
batch: the step's group is a function of ``(seed, step)``, the same on every rank. The model is not
wrapped in ``DistributedDataParallel`` (its reducer expects the same parameters to get gradients every
step, and here they change with the group): after the backward pass only the active group's gradients
are all-reduced, as one flat bucket, so inactive groups stay bit-identical and replicas stay identical.

As DDP's wrapper would, the strategy broadcasts rank 0's state at set-up (every parameter and buffer, the EMA
copy and the task's learned state), so processes that built their networks with different random weights
start as one. Identity is then checked, never assumed: before each checkpoint and when training ends every
process hashes its state and the digests are compared; a difference raises :class:`ReplicaMismatchError`
naming the tensors (nothing is silently overwritten).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from typing_extensions import override

from lightning_diffusionblocks.files import tensor_digest as tensor_digest  # re-exported: this was its home
from lightning_diffusionblocks.memory_plan import PlanMode
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.planning import GroupPlanning, ScheduleSpec

#: broadcasts at set-up go in buckets of at most this many bytes (DDP uses 250 MiB)
BUCKET_BYTES = 64 * 2**20


class ReplicaMismatchError(RuntimeError):
    """Processes that should hold identical copies of the model do not."""


class DiffusionBlocksDDPStrategy(GroupPlanning, DDPStrategy):
    """Every process trains the step's group on its own shard of the batch; only that group's gradients
    are averaged (see :class:`~lightning_diffusionblocks.planning.GroupPlanning` for the schedule arguments;
    the rest go to :class:`~lightning.pytorch.strategies.DDPStrategy`, e.g. ``start_method="spawn"``,
    ``process_group_backend="gloo"``)."""

    strategy_name = "diffusionblocks_ddp"

    def __init__(
        self,
        schedule: ScheduleSpec = "random",
        steps_per_phase: int | None = None,
        groups_to_train: Sequence[int] | None = None,
        seed: int | None = None,
        allow_changed: Sequence[str] = (),
        memory_plan: PlanMode = "check",
        memory_limits: Mapping[str, int] | None = None,
        **ddp_kwargs: Any,
    ) -> None:
        for option in ("find_unused_parameters", "static_graph"):
            if ddp_kwargs.get(option):
                raise MisconfigurationException(
                    f"{option}=True does not apply: {type(self).__name__} does not wrap the model in"
                    " DistributedDataParallel; it all-reduces only the active group's gradients itself."
                )
        super().__init__(**ddp_kwargs)
        self._init_planning(schedule, steps_per_phase, groups_to_train, seed, allow_changed, memory_plan, memory_limits)
        #: bytes this process all-reduced for gradients, and the seconds it spent doing so (for benchmarks)
        self.bytes_reduced = 0
        self.seconds_reduced = 0.0

    @property
    def gradient_group(self) -> Any:
        """The process group whose members train the same group as this process (None: the whole world)."""
        return None

    @property
    def gradient_group_size(self) -> int:
        return self.world_size

    @override
    def configure_ddp(self) -> None:
        """No DistributedDataParallel wrapper (:meth:`reduce_gradients` averages the active group's gradients), but
        what its constructor does: every process starts from rank 0's weights (see :meth:`broadcast_state`)."""
        self.broadcast_state()

    def broadcast_state(self) -> None:
        """Copy rank 0's parameters, buffers (counters, LR horizons, the network's own), EMA copy and task state to
        every process. Runs at set-up, after the model is on its device and after a checkpoint was restored (then
        it changes nothing), so replicas start identical even when each process built its network unseeded."""
        if not _distributed() or self.world_size <= 1:
            return
        module = self.check_module(self.lightning_module)
        broadcast_tensors([*module.parameters(), *module.buffers()], 0, self.root_device)
        task_state = [module.task.state()]
        dist.broadcast_object_list(task_state, src=0)
        if self.global_rank != 0:
            module.task.load_state(task_state[0])

    # ------------------------------------------------------------------ checking that replicas agree
    def replica_sets(self) -> list[list[int]]:
        """Global ranks that must hold identical copies of :meth:`replicated_state`, one list per set."""
        return [list(range(self.world_size))]

    def replicated_state(self, module: DiffusionBlocksModule) -> dict[str, Tensor]:
        """The tensors this process shares with the other members of its replica set (here: the whole module)."""
        return module.state_dict()

    def verify_replicas(self, when: str) -> None:
        """Compare a digest of every replicated tensor across each replica set; raise on any difference.

        A collective: every process enters, and every process raises the same error, so none is left waiting.
        """
        sets = [s for s in self.replica_sets() if len(s) > 1]
        if not sets or not _distributed() or self.world_size <= 1:
            return
        module = self.check_module(self.lightning_module)
        digests = {name: tensor_digest(t) for name, t in self.replicated_state(module).items()}
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, digests)
        problems = []
        for ranks in sets:
            first = gathered[ranks[0]]
            for rank in ranks[1:]:
                names = sorted(n for n in first.keys() | gathered[rank].keys() if first.get(n) != gathered[rank].get(n))
                if names:
                    problems.append((ranks[0], rank, names, len(first)))
        if problems:
            raise ReplicaMismatchError(replica_mismatch_message(when, problems))

    @override
    def reduce_gradients(self, params: list[Tensor]) -> None:
        size = self.gradient_group_size
        if size <= 1 or not dist.is_available() or not dist.is_initialized():
            return
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        start = time.perf_counter()
        flat = _flatten_dense_tensors([p.grad for p in with_grad])
        dist.all_reduce(flat, group=self.gradient_group)
        flat.div_(size)
        self.bytes_reduced += flat.numel() * flat.element_size()
        self.seconds_reduced += time.perf_counter() - start
        for p, synced in zip(with_grad, _unflatten_dense_tensors(flat, [p.grad for p in with_grad])):
            p.grad.copy_(synced)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = super().lightning_module_state_dict()  # offloaded groups are exposed by now
        self.verify_before_checkpoint()
        return state

    def verify_before_checkpoint(self) -> None:
        """Every process enters :meth:`lightning_module_state_dict` (``Trainer.save_checkpoint`` runs on all)."""
        self.verify_replicas("before writing a checkpoint")

    @override
    def on_train_end(self) -> None:
        self.finish_training()
        super().on_train_end()

    def finish_training(self) -> None:
        """When training ends (every process): the replicas must agree."""
        self.verify_replicas("at the end of training")

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DiffusionBlocks, data parallel (DDP)")
        strategy_registry.register(
            cls.strategy_name + "_spawn", cls, description="DiffusionBlocks, data parallel, spawned processes",
            start_method="spawn",
        )  # fmt: skip


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _buckets(tensors: Iterable[Tensor]) -> list[list[Tensor]]:
    """Tensors split into buckets of one dtype and at most :data:`BUCKET_BYTES` (one tensor may exceed it)."""
    by_dtype: dict[torch.dtype, list[list[Tensor]]] = {}
    filled: dict[torch.dtype, int] = {}  # bytes in each dtype's last bucket
    for t in tensors:
        buckets = by_dtype.setdefault(t.dtype, [[]])
        size = t.numel() * t.element_size()
        if buckets[-1] and filled[t.dtype] + size > BUCKET_BYTES:
            buckets.append([])
            filled[t.dtype] = 0
        buckets[-1].append(t)
        filled[t.dtype] = filled.get(t.dtype, 0) + size
    return [bucket for buckets in by_dtype.values() for bucket in buckets]


def broadcast_tensors(tensors: list[Tensor], src: int, device: torch.device, group: Any = None) -> None:
    """Broadcast ``tensors`` from global rank ``src`` in flat buckets (on ``device``) and copy them in place."""
    unique = list({id(t): t for t in tensors}.values())  # tied weights once
    for bucket in _buckets(unique):
        flat = _flatten_dense_tensors([t.detach().to(device) for t in bucket])
        if flat.dtype == torch.bool:  # not every backend sends bool
            sent = flat.to(torch.uint8)
            dist.broadcast(sent, src=src, group=group)
            flat = sent.bool()
        else:
            dist.broadcast(flat, src=src, group=group)
        for t, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.data.copy_(value)


def replica_mismatch_message(when: str, problems: list[tuple[int, int, list[str], int]]) -> str:
    parts = []
    for first, rank, names, total in problems:
        shown = ", ".join(names[:6]) + (f", … ({len(names) - 6} more)" if len(names) > 6 else "")
        parts.append(f"rank {rank} differs from rank {first} in {len(names)} of {total} tensors ({shown})")
    return (
        f"Replicas diverged ({when}): processes that train the same groups must hold bit-identical copies, but "
        + "; ".join(parts)
        + ". They started identical (rank 0's state is broadcast at set-up), so something made them drift: check"
        " that every process sees batches of the same shapes and count (equal shards, drop_last), that no"
        " nondeterministic op gives a different result on one process, that no callback or hook changes weights"
        " on one process only, and that buffers updated in forward (BatchNorm statistics) are synchronised"
        " (Trainer(sync_batchnorm=True)). Nothing was overwritten; the copies were left as they are."
    )
