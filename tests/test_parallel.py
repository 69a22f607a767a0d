"""Multi-process DiffusionBlocks on CPU with gloo: data parallel and block parallel, real spawned processes."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader, Dataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.block_parallel import block_layout
from lightning_diffusionblocks.schedules import RandomSchedule
from tests.conftest import image_loader, tiny_dit, trainer_kwargs


class IndexedImages(Dataset):
    """Images with class labels whose pixel (0, 0, 0) carries the sample's index, so shards can be read back."""

    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1
        self.images[:, 0, 0, 0] = torch.arange(n).float()
        self.labels = torch.randint(0, 10, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]


class Scramble(L.Callback):
    """Every process but rank 0 gets its own random initial weights and a wrong step counter before set-up, as
    processes that each build their network unseeded would: the strategy must start them all from rank 0's."""

    def setup(self, trainer, pl_module, stage):  # noqa: ANN001, ANN201
        if trainer.global_rank > 0:
            g = torch.Generator().manual_seed(trainer.global_rank)
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
                pl_module.step_count.fill_(5 + trainer.global_rank)


class Perturb(L.Callback):
    """Rank 1 changes one weight of its copy after the first step, as a bug that touches one process would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        if trainer.global_rank == 1 and trainer.global_step == 1:
            with torch.no_grad():
                pl_module.network.group_parameters(0)[0].add_(1e-3)


class Record(L.Callback):
    """Each process writes what it saw and its weights, before and after any gathering, for the test to read."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.seen: list[int] = []

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        start = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(start, self.out / f"start{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001, ANN201
        self.seen += batch[0][:, 0, 0, 0].long().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        rank = trainer.global_rank
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"state": state, "seen": self.seen}, self.out / f"rank{rank}.pt")

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        trainer.save_checkpoint(self.out / "merged.ckpt")  # every rank enters; rank 0 writes


#: plain SGD, so a step's weights show its averaged gradient directly (Adam's first step divides by |g|)
SGD = partial(torch.optim.SGD, lr=0.1)


def module(num_blocks: int = 2, **kwargs) -> ldb.DiffusionBlocksModule:  # noqa: ANN003
    net = tiny_dit(depth=4)
    return ldb.DiffusionBlocksModule(net, ldb.tasks.ImageGeneration(), num_blocks=num_blocks, lr=1e-2, **kwargs)


def spawn_fit(strategy: L.pytorch.strategies.Strategy, devices: int, tmp_path: Path, steps: int, batch: int,
              callbacks: tuple[L.Callback, ...] = (Scramble(),), record: bool = True,
              **kwargs) -> ldb.DiffusionBlocksModule:  # noqa: ANN003  # fmt: skip
    m = module(**kwargs)
    callbacks = (*callbacks, Record(tmp_path)) if record else callbacks
    trainer = L.Trainer(strategy=strategy, max_steps=steps, callbacks=list(callbacks),
                        **trainer_kwargs(tmp_path, devices=devices))  # fmt: skip
    trainer.fit(m, DataLoader(IndexedImages(), batch_size=batch, shuffle=False))
    return m


def group_state(state: dict, m: ldb.DiffusionBlocksModule, group: int) -> list[torch.Tensor]:
    names = {id(p): n for n, p in m.named_parameters()}
    return [state[names[id(p)]] for p in m.network.group_parameters(group)]


def test_block_layout_and_bad_world_sizes():
    assert block_layout(4, 2) == (1, 2)
    assert block_layout(2, 4) == (2, 1)
    assert block_layout(3, 3) == (1, 1)
    with pytest.raises(MisconfigurationException, match=r"divides B \(1, 2: .* multiple of B \(4, 8, 12"):
        block_layout(3, 4)


def test_the_plain_strategy_name_becomes_data_parallel_on_several_devices_or_nodes(tmp_path):
    """strategy="diffusionblocks" (or a preset such as "diffusionblocks_sequential") with devices=N or num_nodes=M
    trains data parallel with the same schedule, in Lightning's own DDP launcher and cluster environment."""
    trainer = L.Trainer(strategy="diffusionblocks_sequential", accelerator="cpu", devices=2, logger=False)
    strategy = trainer.strategy
    assert type(strategy) is ldb.DiffusionBlocksDDPStrategy
    assert (strategy.world_size, strategy.num_nodes, strategy.schedule_spec) == (2, 1, "sequential")
    assert strategy.cluster_environment is not None
    assert strategy.launcher is not None
    trainer = L.Trainer(strategy="diffusionblocks", accelerator="cpu", devices=1, num_nodes=2, logger=False)
    assert type(trainer.strategy) is ldb.DiffusionBlocksDDPStrategy
    assert (trainer.strategy.world_size, trainer.strategy.num_nodes) == (2, 2)
    single = L.Trainer(strategy="diffusionblocks", accelerator="cpu", devices=1, logger=False).strategy
    assert type(single) is ldb.DiffusionBlocksStrategy


def test_a_launch_of_several_processes_with_one_device_each_is_refused(tmp_path, monkeypatch):
    """torchrun with WORLD_SIZE=2 but Trainer(devices=1): never two copies of rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=1, **trainer_kwargs(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"WORLD_SIZE=2.*devices=N"):
        trainer.fit(ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=2), image_loader())


def test_data_parallel_equals_one_process_with_the_whole_batch(tmp_path):
    """Rank 1 built its network with other random weights (Scramble): it starts from rank 0's all the same, and the
    two end bit-identical, equal to one process that saw both shards."""
    strategy = ldb.DiffusionBlocksDDPStrategy(start_method="spawn", process_group_backend="gloo")
    spawn_fit(strategy, 2, tmp_path, steps=1, batch=8, optimizer=SGD)
    starts = [torch.load(tmp_path / f"start{r}.pt", weights_only=True) for r in range(2)]
    fresh_state = module().state_dict()
    for key, value in starts[1].items():  # parameters, EMA, counters and buffers: rank 0's (the unscrambled one)
        assert torch.equal(value, fresh_state[key]), key
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():  # replicas identical
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert len(set(ranks[0]["seen"] + ranks[1]["seen"])) == 16  # two disjoint shards of 8
    # the reference: one process, the two shards' losses averaged (= the mean over the 16 samples), each shard
    # with the noise of its process, one AdamW step
    ref = module()
    group = RandomSchedule(2, seed=0).group_at(0)
    data = IndexedImages()
    opt = SGD(ref.param_groups())
    loss = 0
    for rank, seen in enumerate(r["seen"] for r in ranks):
        batch = (data.images[seen], data.labels[seen])
        gen = ref._generator(0, salt=1_000_003 * rank)
        loss = loss + ref.group_loss(ref.network, batch, group, gen) / 2
    loss.backward()
    opt.step()
    for got, want in zip(group_state(ranks[0]["state"], ref, group), ref.network.group_parameters(group)):
        assert torch.allclose(got, want.detach(), atol=1e-6)
    other = 1 - group
    fresh = module()
    for got, want in zip(group_state(ranks[0]["state"], ref, other), fresh.network.group_parameters(other)):
        assert torch.equal(got, want.detach())  # the inactive group did not move


def test_block_parallel_groups_train_apart_and_merge(tmp_path):
    """Each group's replicas start from rank 0's weights (ranks 1-3 built other ones: Scramble), train apart, keep
    only their own group in memory, and are gathered whole at the end."""
    strategy = ldb.BlockParallelStrategy(start_method="spawn", process_group_backend="gloo")
    m = spawn_fit(strategy, 4, tmp_path, steps=3, batch=4, ema_decay=0.9)  # B=2 groups x 2 replicas
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    fresh = module(ema_decay=0.9)
    ema_names = {id(p): n for n, p in fresh.named_parameters()}
    for rank in range(4):  # every group starts from rank 0's weights (and counters) on its owners
        start = torch.load(tmp_path / f"start{rank}.pt", weights_only=True)
        owned = group_state(start, fresh, rank // 2)
        assert all(torch.equal(a, b.detach()) for a, b in zip(owned, fresh.network.group_parameters(rank // 2)))
        assert int(start["step_count"]) == 0
    for rank, record in enumerate(ranks):
        owned = rank // 2
        other = 1 - owned
        # while training, the other group's weights and EMA copy hold no storage on this process
        assert all(t.numel() == 0 for t in group_state(record["state"], fresh, other))
        assert all(record["state"][ema_names[id(p)]].numel() == 0 for p in fresh.ema_network.group_parameters(other))
        assert all(t.numel() > 0 for t in group_state(record["state"], fresh, owned))
        assert record["state"]["group_steps"].tolist()[owned] == 3
    for g in range(2):  # replicas identical, shards disjoint
        a, b = ranks[2 * g], ranks[2 * g + 1]
        same = zip(group_state(a["state"], fresh, g), group_state(b["state"], fresh, g))
        assert all(torch.equal(x, y) for x, y in same)
        assert not set(a["seen"]) & set(b["seen"])
    assert ranks[0]["seen"] != ranks[2]["seen"]  # each group shuffles with its own seed... or order
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    for g in range(2):  # the checkpoint holds what each group's owners trained, and both groups' Adam state
        assert all(torch.equal(x, y) for x, y in zip(group_state(merged["state_dict"], fresh, g),
                                                      group_state(ranks[2 * g]["state"], fresh, g)))  # fmt: skip
    assert merged["state_dict"]["group_steps"].tolist() == [3, 3]
    assert all(v.numel() > 0 for v in merged["state_dict"].values() if v.ndim)  # every group and its EMA, whole
    n_params = sum(len(pg["params"]) for pg in merged["optimizer_states"][0]["param_groups"])
    assert len(merged["optimizer_states"][0]["state"]) == n_params
    # the spawn launcher hands the main process every group's trained weights
    for g in range(2):
        trained = group_state(ranks[2 * g]["state"], fresh, g)
        assert all(torch.equal(x.detach(), y) for x, y in zip(m.network.group_parameters(g), trained))
    restored = ldb.DiffusionBlocksModule.load_from_checkpoint(tmp_path / "merged.ckpt")
    assert restored.sample(labels=[1, 2], steps=3).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("strategy", "blocks", "when"),
    [
        (ldb.DiffusionBlocksDDPStrategy, 2, "at the end of training"),
        (ldb.BlockParallelStrategy, 1, "before gathering the groups"),  # 1 group x 2 replicas; gathered to save
    ],
)
def test_a_replica_that_drifts_stops_fit_naming_the_tensor(tmp_path, strategy, blocks, when):
    """Rank 1 changes one weight mid-training: fit raises, naming the tensor, instead of finishing with two models
    (data parallel) or overwriting the replica with the first owner's copy (block parallel's gather, here for the
    checkpoint written when training ends)."""
    launch = strategy(start_method="spawn", process_group_backend="gloo")
    pattern = rf"Replicas diverged \({when}\).*rank 1 differs from rank 0 in 1 of \d+ tensors \(network\.net\."
    with pytest.raises(Exception, match=pattern):
        spawn_fit(launch, 2, tmp_path, steps=2, batch=4, callbacks=(Perturb(),), record=blocks == 1, num_blocks=blocks)
    assert not (tmp_path / "merged.ckpt").exists()


def test_block_parallel_with_several_groups_per_process_and_offload_writes_whole_checkpoints(tmp_path):
    """Two processes, B=4: each offloads its own inactive group and holds none of the other's; the sanity check,
    validation after each step and a checkpoint mid-fit gather every group (offloaded ones read back first; a
    group left empty would fail them), and the checkpoint equals what the spawn launcher returns."""
    strategy = ldb.BlockParallelStrategy(start_method="spawn", process_group_backend="gloo")
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1)
    trainer = L.Trainer(strategy=strategy, max_steps=2, callbacks=[ldb.callbacks.BlockOffload(), saver],
                        **trainer_kwargs(tmp_path, devices=2, enable_checkpointing=True, num_sanity_val_steps=1,
                                         val_check_interval=1, limit_val_batches=1))  # fmt: skip
    m = module(num_blocks=4, ema_decay=0.9)
    trainer.fit(m, DataLoader(IndexedImages(), batch_size=4), DataLoader(IndexedImages(8), batch_size=4))
    saved = torch.load(tmp_path / "epoch=0-step=2.ckpt", weights_only=True)["state_dict"]
    assert int(saved["group_steps"].sum()) == 4  # two steps on each process, every group's counter gathered
    for key, value in m.state_dict().items():
        assert value.numel() > 0, key
        assert torch.equal(saved[key], value), key


def test_offload_under_block_parallel_with_one_group_per_process_is_refused(tmp_path):
    strategy = ldb.BlockParallelStrategy(start_method="spawn", process_group_backend="gloo")
    trainer = L.Trainer(strategy=strategy, max_steps=1, callbacks=[ldb.callbacks.BlockOffload()],
                        **trainer_kwargs(tmp_path, devices=2))  # fmt: skip
    with pytest.raises(Exception, match="BlockOffload has nothing to do"):
        trainer.fit(module(), DataLoader(IndexedImages(), batch_size=4))


def test_data_parallel_keeps_offload_memory_monitor_ema_and_clipping_working(tmp_path):
    strategy = ldb.DiffusionBlocksDDPStrategy(start_method="spawn", process_group_backend="gloo")
    callbacks = [ldb.callbacks.BlockOffload(), ldb.callbacks.BlockMemoryMonitor(log=False), Record(tmp_path)]
    trainer = L.Trainer(strategy=strategy, max_steps=4, callbacks=callbacks, **trainer_kwargs(tmp_path, devices=2))
    m = module(ema_decay=0.9, gradient_clip_val=0.5, warmup_steps=2, lr_schedule="cosine")
    trainer.fit(m, DataLoader(IndexedImages(), batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, value in ranks[0]["state"].items():  # offloaded, clipped, EMA-averaged: still identical replicas
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert int(m.group_steps.sum()) == 4
    merged = torch.load(tmp_path / "merged.ckpt", weights_only=True)
    assert all(v.numel() > 0 for v in merged["state_dict"].values() if v.ndim)  # offloaded groups exposed
