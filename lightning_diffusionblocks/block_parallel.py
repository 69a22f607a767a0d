"""Block-parallel DiffusionBlocks on Lightning's DDP: each process trains its own group(s), groups share nothing.

The world is laid out as groups × replicas, row-major: with W processes and B groups, W = B·R gives each
group R replicas (ranks g·R … g·R+R−1, data parallel among themselves); W < B with B = k·W gives each
process k groups (it runs the single-device schedule over them). Other world sizes are refused with the
valid ones. During training a process all-reduces only inside its replica set; each group shuffles the
data with its own seed and a group's replicas see disjoint shards. Groups are gathered (each broadcast by
its first owner) before validation, when a checkpoint is written (weights, EMA, counters and optimizer
state of every group, whichever rank trained it) and when training ends, so rank 0's checkpoint, the
weights the spawn launcher returns and sampling after ``fit`` all hold every group's trained weights.

While training, a process keeps only its own groups in memory: the weights (and EMA copy) of the groups it does
not own are freed at set-up (after rank 0's state was broadcast to every process) and hold no storage; gathering
allocates them, and they are freed again when training goes on. Before a gather, the replicas of each group are
checked to be bit-identical (see :meth:`DiffusionBlocksDDPStrategy.verify_replicas`): a gather copies each
group from its first owner, so a replica that drifted would otherwise be overwritten without a word.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.strategies.registry import _StrategyRegistry
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_diffusionblocks.data_parallel import DiffusionBlocksDDPStrategy, _distributed, broadcast_tensors
from lightning_diffusionblocks.module import DiffusionBlocksModule
from lightning_diffusionblocks.planning import ScheduleSpec


def block_layout(world: int, num_groups: int) -> tuple[int, int]:
    """(groups per process, replicas per group) for ``world`` processes; refuses sizes that do not fit."""
    if world >= num_groups and world % num_groups == 0:
        return 1, world // num_groups
    if world < num_groups and num_groups % world == 0:
        return num_groups // world, 1
    fewer = [d for d in range(1, num_groups) if num_groups % d == 0]
    raise MisconfigurationException(
        f"Block parallel lays {world} processes out as groups x replicas, which does not fit num_blocks={num_groups}."
        f" Use a world size that divides B ({', '.join(map(str, fewer))}: several groups per process) or a multiple"
        f" of B ({num_groups}, {2 * num_groups}, {3 * num_groups}, …: replicas per group), or change num_blocks."
    )


class BlockParallelStrategy(DiffusionBlocksDDPStrategy):
    """Each process owns and trains its own group(s); see the module docstring. ``schedule`` and ``seed`` apply
    to a process's own groups; the remaining arguments go to :class:`~lightning.pytorch.strategies.DDPStrategy`."""

    strategy_name = "diffusionblocks_block_parallel"

    def __init__(
        self,
        schedule: ScheduleSpec = "random",
        seed: int | None = None,
        allow_changed: Sequence[str] = (),
        **ddp_kwargs: Any,
    ) -> None:
        if "groups_to_train" in ddp_kwargs:
            raise MisconfigurationException("Block parallel assigns groups to processes itself; drop groups_to_train.")
        super().__init__(schedule=schedule, seed=seed, allow_changed=allow_changed, **ddp_kwargs)
        self.owned: list[int] = []
        self.owner_ranks: list[int] = []
        self.replicas = 1
        self._replica_group: Any = None
        #: the shapes of the tensors of each group this process does not own (freed while it trains)
        self._shapes: dict[int, list[torch.Size]] = {}
        self._keep_own_only = False  # True from set-up to the end of training in a fit
        self._whole = True  # every group's tensors are allocated

    # ------------------------------------------------------------------ layout
    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.check_module(self.lightning_module)
        groups_per_rank, self.replicas = block_layout(self.world_size, module.num_blocks)
        rank = self.global_rank
        if self.replicas > 1:
            first = (rank // self.replicas) * self.replicas
            self.owned = [rank // self.replicas]
            self.owner_ranks = [g * self.replicas for g in range(module.num_blocks)]
            for g in range(module.num_blocks):  # every rank creates every sub-group, in the same order
                ranks = list(range(g * self.replicas, (g + 1) * self.replicas))
                created = dist.new_group(ranks)
                if ranks[0] == first:
                    self._replica_group = created
        else:
            self.owned = list(range(rank * groups_per_rank, (rank + 1) * groups_per_rank))
            self.owner_ranks = [g // groups_per_rank for g in range(module.num_blocks)]

    @property
    @override
    def gradient_group(self) -> Any:
        return self._replica_group

    @property
    @override
    def gradient_group_size(self) -> int:
        return self.replicas

    @override
    def trained_groups(self, module: DiffusionBlocksModule) -> list[int]:
        return self.owned

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """A group's replicas split the data; each group shuffles it with its own seed."""
        first_group = self.owned[0] if self.owned else 0
        return {"num_replicas": self.replicas, "rank": self.global_rank % self.replicas, "seed": 1000 * first_group}

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        if trainer.training and self.offloader is not None and len(self.owned) == 1:
            raise MisconfigurationException(
                "BlockOffload has nothing to do under block parallel with one group per process: each process"
                " already holds only its own group. Remove the callback (it helps when a process owns several"
                " groups, i.e. fewer processes than num_blocks)."
            )
        super().setup(trainer)  # every process now holds rank 0's state (configure_ddp broadcasts it)
        self._keep_own_only = trainer.training
        self.release_others()

    # ------------------------------------------------------------------ keeping only the own groups
    def release_others(self) -> None:
        """While training, free the weights and EMA copy of the groups this process does not own: it neither
        trains nor reads them until :meth:`gather_groups` brings them back, so its memory follows 1/B."""
        if not self._keep_own_only or self.world_size <= 1:
            return
        module = self.check_module(self.lightning_module)
        for g in range(module.num_blocks):
            if g in self.owned:
                continue
            tensors = self._group_tensors(module, g)
            self._shapes.setdefault(g, [t.shape for t in tensors])
            for t in tensors:
                if t.numel():
                    t.data = torch.empty(0, dtype=t.dtype, device=self.root_device)
        self._whole = False

    def _allocate_others(self, module: DiffusionBlocksModule) -> None:
        """Give the freed groups' tensors storage again on the compute device (a gather then fills them)."""
        for g, shapes in self._shapes.items():
            for t, shape in zip(self._group_tensors(module, g), shapes):
                if t.numel() != shape.numel():
                    t.data = torch.empty(shape, dtype=t.dtype, device=self.root_device)
        self._whole = True

    # ------------------------------------------------------------------ gathering every group
    @staticmethod
    def _group_tensors(module: DiffusionBlocksModule, group: int) -> list[Tensor]:
        tensors = list(module.network.group_parameters(group))
        if module.ema_network is not None:
            tensors += module.ema_network.group_parameters(group)
        return tensors

    def gather_groups(self) -> None:
        """Every process receives every group's weights and counters from the group's first owner, after checking
        that the group's replicas agree (a collective: every process enters)."""
        if not _distributed() or self.world_size <= 1:
            return
        module = self.check_module(self.lightning_module)
        offloaded = any(t.numel() == 0 for g in self.owned for t in self._group_tensors(module, g))
        if self.offloader is not None and offloaded:  # own groups offloaded to disk or host memory come back first
            self.offloader.expose_for_checkpoint()
        self._allocate_others(module)
        self.verify_replicas("before gathering the groups")
        for g in range(module.num_blocks):
            broadcast_tensors(self._group_tensors(module, g), self.owner_ranks[g], self.root_device)
        mine = torch.zeros(module.num_blocks, dtype=torch.bool)
        mine[self.owned] = True
        for buffer in (module.group_steps, module.lr_horizons[: module.num_blocks]):  # views: copied in place
            values = torch.where(mine.to(buffer.device), buffer, torch.zeros_like(buffer)).double().to(self.root_device)
            dist.all_reduce(values)  # each group's value from its R replicas, identical
            buffer.copy_((values / self.replicas).round() if not buffer.is_floating_point() else values / self.replicas)

    # ------------------------------------------------------------------ checking replicas
    @override
    def replica_sets(self) -> list[list[int]]:
        r = self.replicas
        return [list(range(first, first + r)) for first in range(0, self.world_size, r)]

    @override
    def replicated_state(self, module: DiffusionBlocksModule) -> dict[str, Tensor]:
        """Everything but the groups this process does not own (their copies differ until gathered)."""
        others = {
            id(t) for g in range(module.num_blocks) if g not in self.owned for t in self._group_tensors(module, g)
        }
        return {k: v for k, v in module.state_dict(keep_vars=True).items() if id(v) not in others}

    @override
    def verify_before_checkpoint(self) -> None:
        """:meth:`gather_groups` checked the replicas before copying the groups; they are identical now."""

    @override
    def finish_training(self) -> None:
        self._keep_own_only = False
        self.gather_groups()

    @override
    def on_validation_start(self) -> None:
        if self._keep_own_only:  # validation (or the sanity check) in a fit visits every group
            self.gather_groups()
        super().on_validation_start()

    @override
    def on_validation_end(self) -> None:
        super().on_validation_end()
        self.release_others()

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        """A resumed run restores every group's optimizer state (the checkpoint holds them all): keep only the own
        groups' (before any callback, e.g. an offloader, sees the optimizer)."""
        super().load_optimizer_state_dict(checkpoint)
        if not self._keep_own_only or self.world_size <= 1:
            return
        module = self.check_module(self.lightning_module)
        others = [
            p for g in range(module.num_blocks) if g not in self.owned for p in module.network.group_parameters(g)
        ]
        for optimizer in self.optimizers:
            for p in others:
                optimizer.state.pop(p, None)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self._whole:  # groups gathered since the last step (e.g. for a preview) are freed again
            self.release_others()

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        self.gather_groups()  # every rank enters (Trainer.save_checkpoint runs on all of them)
        return super().lightning_module_state_dict()

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None) -> None:
        try:
            super().save_checkpoint(checkpoint, filepath, storage_options)
        finally:
            self.release_others()

    @override
    def teardown(self) -> None:
        self._keep_own_only = False
        super().teardown()

    @override
    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Tensor]:
        """The optimizer state of every group: each process contributes the state of the groups it owns."""
        state = optimizer.state_dict()
        if not (dist.is_available() and dist.is_initialized()) or self.world_size <= 1:
            return state
        module = self.check_module(self.lightning_module)
        owned_ids = {id(p) for g in self.owned for p in module.network.group_parameters(g)}
        index = 0
        owned_indices = set()
        for pg in optimizer.param_groups:
            for p in pg["params"]:
                if id(p) in owned_ids:
                    owned_indices.add(index)
                index += 1
        first_replica = self.global_rank % self.replicas == 0
        mine = {i: {k: v.cpu() if isinstance(v, Tensor) else v for k, v in s.items()}
                for i, s in state["state"].items() if i in owned_indices and first_replica}  # fmt: skip
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        merged: dict[int, Any] = {}
        for part in gathered:
            merged.update(part)
        state["state"] = dict(sorted(merged.items()))
        return state

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        strategy_registry.register(cls.strategy_name, cls, description="DiffusionBlocks, one group per process")
        strategy_registry.register(
            cls.strategy_name + "_spawn", cls, description="DiffusionBlocks, one group per process, spawned",
            start_method="spawn",
        )  # fmt: skip
