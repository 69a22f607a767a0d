"""Exact resume after SIGKILL, corrupt checkpoints, and merging per-group jobs."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.merge import MergeError, group_of_key, merge_checkpoints
from tests.conftest import image_loader, tiny_dit, trainer_kwargs

JOB = Path(__file__).with_name("resume_job.py")


def run_job(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), str(out), *extra], capture_output=True, text=True, timeout=300)


def test_sigkill_mid_phase_then_resume_matches_uninterrupted_run(tmp_path):
    full = run_job(tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_job(tmp_path / "killed", "--kill-at", "13")  # phase 2 runs steps 8..15
    assert killed.returncode == -signal.SIGKILL
    ckpts = sorted((tmp_path / "killed" / "ckpt").glob("*.ckpt"))
    assert "epoch=1-step=10.ckpt" in {p.name for p in ckpts}
    assert not (tmp_path / "killed" / "final.pt").exists()
    resumed = run_job(tmp_path / "killed", "--resume", str(tmp_path / "killed" / "ckpt" / "last.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(tmp_path / "killed" / "final.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["group_steps"].tolist() == [8, 8, 8]


@pytest.mark.matrix  # three processes, ~40 s; the suite resumes block parallel in its fault-injection subset
def test_block_parallel_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """Three processes, one group each, the package's resumable loader (sharded per group by Lightning): killed
    after the step-4 checkpoint, in the middle of an epoch (6 batches), resumed, same final weights."""
    full = run_job(tmp_path / "full", "--block-parallel", "3", "--max-steps", "12", "--every", "4")
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_job(tmp_path / "killed", "--block-parallel", "3", "--max-steps", "12", "--every", "4",
                     "--kill-at", "6")  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "final.pt").exists()
    assert sorted(p.name for p in (tmp_path / "killed" / "ckpt").glob("epoch=*")) == ["epoch=0-step=4.ckpt"]
    resumed = run_job(tmp_path / "killed", "--block-parallel", "3", "--max-steps", "12", "--every", "4",
                      "--resume", str(tmp_path / "killed" / "ckpt" / "last.ckpt"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "final.pt")
    b = torch.load(tmp_path / "killed" / "final.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert a["group_steps"].tolist() == [12, 12, 12]  # every process trained its own group at every step


def test_truncated_checkpoint_is_refused_and_kept(tmp_path, monkeypatch):
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=3, **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    good, bad = tmp_path / "good.ckpt", tmp_path / "bad.ckpt"
    trainer.save_checkpoint(good)
    assert not list(tmp_path.glob("*.partial"))

    def half_then_disk_full(checkpoint, path, storage_options=None):  # noqa: ANN001, ANN202
        Path(path).write_bytes(good.read_bytes()[:100])
        raise OSError(28, "No space left on device")

    # a write that fails midway neither replaces the good checkpoint nor leaves its half behind
    monkeypatch.setattr(trainer.strategy.checkpoint_io, "save_checkpoint", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(good)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.glob("good.ckpt*")) == ["good.ckpt"]
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    fresh = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=5, **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"corrupt or truncated.*good\.ckpt"):
        trainer.fit(fresh, image_loader(), ckpt_path=bad)
    assert torch.load(good, weights_only=False)["global_step"] == 3


def train_subset(tmp_path: Path, groups: list[int], name: str, num_blocks: int = 3, **kw) -> Path:  # noqa: ANN003
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=num_blocks, **kw)
    strategy = ldb.DiffusionBlocksStrategy(
        schedule="sequential", steps_per_phase=4 // len(groups), groups_to_train=groups
    )
    trainer = L.Trainer(strategy=strategy, max_steps=4, **trainer_kwargs(tmp_path / name))
    trainer.fit(module, image_loader())
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_merge_per_group_jobs(tmp_path):
    jobs = [train_subset(tmp_path, [g], f"job{g}") for g in range(3)]
    merged = merge_checkpoints(jobs, tmp_path / "merged.ckpt")
    assert merged["state_dict"]["group_steps"].tolist() == [4, 4, 4]
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(
        tmp_path / "merged.ckpt", net=tiny_dit(), task=ldb.tasks.ImageGeneration(), num_blocks=3
    )
    for g, job in enumerate(jobs):
        source = torch.load(job, weights_only=False)["state_dict"]
        names = {id(p): n for n, p in module.named_parameters()}
        for p in module.network.group_parameters(g):
            assert torch.equal(p, source[names[id(p)]]), names[id(p)]
    assert module.sample(labels=[1], steps=4).shape == (1, 1, 8, 8)
    # the command-line entry point
    out = subprocess.run(
        [sys.executable, "-m", "lightning_diffusionblocks.merge", str(tmp_path / "m2.ckpt"), *map(str, jobs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert "steps per group: [4, 4, 4]" in out.stdout


def test_merge_refuses_overlaps_gaps_and_mismatches(tmp_path):
    a = train_subset(tmp_path, [0, 1], "a")
    b = train_subset(tmp_path, [1, 2], "b")
    c = train_subset(tmp_path, [2], "c")
    with pytest.raises(MergeError, match="Group 1 was trained by both"):
        merge_checkpoints([a, b], tmp_path / "x.ckpt")
    j0, j1 = train_subset(tmp_path, [0], "j0"), train_subset(tmp_path, [1], "j1")
    with pytest.raises(MergeError, match=r"No checkpoint trained group\(s\) \[2\]"):
        merge_checkpoints([j0, j1], tmp_path / "x.ckpt")
    other = train_subset(tmp_path, [1], "other", num_blocks=2)
    with pytest.raises(MergeError, match="groups="):
        merge_checkpoints([a, other], tmp_path / "x.ckpt")
    wide = ldb.DiffusionBlocksModule(tiny_dit(dim=48), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = L.Trainer(
        strategy=ldb.DiffusionBlocksStrategy(groups_to_train=[2]), max_steps=2, **trainer_kwargs(tmp_path / "wide")
    )
    trainer.fit(wide, image_loader())
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    with pytest.raises(MergeError, match="different model"):
        merge_checkpoints([a, tmp_path / "wide.ckpt"], tmp_path / "x.ckpt")
    assert merge_checkpoints([a, c], tmp_path / "ok.ckpt")["state_dict"]["group_steps"].tolist()[2] > 0


def test_merge_takes_each_weight_from_the_group_the_partition_names():
    """Keys of the module's network and of its EMA copy go to the group the partition names; the rest to none."""
    info = {"groups": [[0, 1], [2], [3]], "stem": "per_group", "block_path": "blocks", "boundaries": [0, 1, 2, 3]}
    assert group_of_key("network.net.blocks.2.attn.qkv.weight", info) == 1
    assert group_of_key("ema_network.net.blocks.3.mlp.0.bias", info) == 2
    assert group_of_key("ema_network.stems.0.final.linear.weight", info) == 1
    assert group_of_key("network.stems.1.patch_embed.weight", info) == 2
    assert group_of_key("network.net.patch_embed.weight", info) == 0
    assert group_of_key("group_steps", info) is None
    assert group_of_key("net.blocks.0.attn.qkv.weight", info) is None  # not under the module's networks


def _fit(tmp_path: Path, ckpt: Path | None = None, max_steps: int = 4, allow: tuple[str, ...] = (), **kw):  # noqa: ANN003
    """A short sequential fit (2 steps a phase); ``kw`` splits into module and strategy options."""
    strategy_kw = {k: kw.pop(k) for k in ("schedule", "groups_to_train", "steps_per_phase") if k in kw}
    strategy_kw.setdefault("schedule", "sequential")
    if strategy_kw["schedule"] == "sequential":
        strategy_kw.setdefault("steps_per_phase", 2)
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=3, **kw)
    strategy = ldb.DiffusionBlocksStrategy(**strategy_kw, allow_changed=allow)
    trainer = L.Trainer(strategy=strategy, max_steps=max_steps, **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader(), ckpt_path=ckpt)
    return trainer, module


def test_resume_refuses_changed_settings_unless_allowed(tmp_path):
    """The checkpoint records schedule, seeds, groups_to_train, gamma, partition and layout; a resume that changes one
    is refused naming it and its recorded value, unless `allow_changed` names it."""
    trainer, _ = _fit(tmp_path)
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    record = torch.load(ckpt, weights_only=True)["diffusionblocks"]
    assert record["training"] == {"seed": 0, "gamma": 0.05, "partition": "equiprobable", "accumulate_grad_batches": 1}
    assert record["run"] == {
        "schedule": "SequentialSchedule", "steps_per_phase": 2, "schedule_seed": None, "groups_to_train": None,
        "parallelism": "single", "world_size": 1, "replicas": 1,
    }  # fmt: skip
    changes = {
        "schedule='SequentialSchedule'": {"schedule": "random"},
        "steps_per_phase=2": {"steps_per_phase": 3},
        r"groups_to_train=None \(now \[0\]\)": {"groups_to_train": [0]},
        "seed=0": {"seed": 1},
        "gamma=0.05": {"gamma": 0.1},
        "accumulate_grad_batches=1": {"accumulate_grad_batches": 2},
    }
    for message, change in changes.items():
        with pytest.raises(MisconfigurationException, match=message):
            _fit(tmp_path, ckpt, max_steps=6, **change)
    with pytest.raises(ValueError, match="same `partition`"):  # its noise boundaries are checked on loading
        _fit(tmp_path, ckpt, max_steps=6, partition="uniform_log")
    allow_seed = r"DiffusionBlocksStrategy\(\.\.\., allow_changed=\('seed',\)\)"  # the working call
    with pytest.raises(MisconfigurationException, match=allow_seed):
        _fit(tmp_path, ckpt, max_steps=6, seed=1)
    with pytest.raises(ValueError, match="unknown settings"):
        _fit(tmp_path, ckpt, max_steps=6, allow=("sead",))
    with pytest.warns(UserWarning, match="changed settings.*seed 0 -> 1"):
        _, module = _fit(tmp_path, ckpt, max_steps=6, allow=("seed",), seed=1)
    assert int(module.step_count) == 6
    # a checkpoint of 0.2.0 (no record of the settings) still resumes, with a warning
    old = torch.load(ckpt, weights_only=True)
    del old["diffusionblocks"]["training"], old["diffusionblocks"]["run"]
    torch.save(old, tmp_path / "old.ckpt")
    with pytest.warns(UserWarning, match="does not record the run's settings"):
        _fit(tmp_path, tmp_path / "old.ckpt", max_steps=6)


def test_block_parallel_checkpoint_in_one_process_is_refused_or_gets_new_horizons(tmp_path):
    """A block-parallel run's LR horizons count each process's own steps; resumed in one process (another layout)
    the run is refused, or, when allowed, every group's horizon is counted afresh for the steps left."""
    trainer, _ = _fit(tmp_path, schedule="random")
    ckpt = tmp_path / "bp.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)  # what a 3-process block-parallel run of 4 steps records
    state["diffusionblocks"]["run"].update(parallelism="block_parallel", world_size=3, replicas=1)
    state["state_dict"]["group_steps"] = torch.tensor([4, 4, 4])
    state["state_dict"]["lr_horizons"] = torch.tensor([4.0, 4.0, 4.0, 4.0], dtype=torch.float64)
    torch.save(state, ckpt)
    with pytest.raises(MisconfigurationException, match="parallelism='block_parallel'.*world_size=3"):
        _fit(tmp_path, ckpt, max_steps=10, schedule="random")
    allow = ("parallelism", "world_size", "replicas")
    with pytest.warns(UserWarning, match="changed settings"):
        _, module = _fit(tmp_path, ckpt, max_steps=10, schedule="random", allow=allow)
    # 6 steps left, a third each: 4 + 2 per group; the shared stem 4 + 6
    assert module.lr_horizons.tolist() == [6.0, 6.0, 6.0, 10.0]
