"""Fault injection: a run killed with SIGKILL and resumed ends bit-identical to the run that was never stopped.

Kill points × process layouts × offload, each resumed run compared tensor by tensor with its layout's
uninterrupted run (computed once per layout), batch by batch (epoch, group and data of every step) and by the
checkpoint files it wrote. Every run accumulates 2 micro-batches per optimizer step, so a kill can land inside an
accumulation window; an epoch is 8 batches (4 optimizer steps) in every layout; step checkpoints every 2 steps
(one of two on an epoch's last batch) and Lightning's default per-epoch checkpoint.

The whole matrix is marked ``matrix`` and left out by default: ``pytest -m matrix tests/test_fault_injection.py``.
A representative subset (epoch-boundary resumes in 1 and 2 processes, disk offload, block parallel inside an
accumulation window) runs with the suite.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("resume_job.py")
COMMON = ["--accumulate", "2", "--max-steps", "10", "--every", "2", "--epoch-ckpt", "--schedule", "random"]
#: 8 batches of 16 per process and epoch in every layout (data parallel splits 256 samples over 2 processes)
LAYOUTS = {
    "single": ["--samples", "128"],
    "data_parallel": ["--data-parallel", "2", "--samples", "256"],
    "block_parallel": ["--block-parallel", "2", "--num-blocks", "4", "--samples", "128"],  # 2 groups a process
    # one process, inactive groups' weights and EMA in bf16 (stochastic rounding), 8-bit moments for every tensor
    "single_lowbit": [
        "--samples", "128", "--state-precision",
        '{"weights": "bf16", "moments": "8bit", "rounding": "stochastic", "min_8bit_size": 0}',
    ],
}  # fmt: skip
#: where the run dies (optimizer step, micro-batch) and the checkpoint it resumes from
KILLS = {
    "mid_epoch": (7, 0, "ckpt/last.ckpt"),  # resumes at step 6, the middle of epoch 1
    "last_batch": (7, 1, "epoch_ckpt/epoch=0-step=4.ckpt"),  # epoch 1's last batch; Lightning's epoch checkpoint
    "after_checkpoint": (4, 0, "ckpt/last.ckpt"),  # step 4's checkpoint, written on epoch 0's last batch
    "accumulation": (3, 1, "ckpt/last.ckpt"),  # the second micro-batch of step 3; resumes at step 2
}
#: run with the suite: epoch-boundary resumes in 1 process (both kinds of checkpoint, disk offload) and 2 processes,
#: and block parallel with disk offload killed inside an accumulation window
SUBSET = {
    ("single", True, "last_batch"),
    ("single", True, "after_checkpoint"),
    ("data_parallel", False, "last_batch"),
    ("block_parallel", True, "accumulation"),
}


def run_job(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), str(out), *args], capture_output=True, text=True, timeout=300)


def offload_args(offload: bool) -> list[str]:
    return ["--offload"] if offload else ["--no-offload"]  # BlockOffload(directory=OUT/offload/rank<r>)


def trace(out: Path) -> dict[tuple[int, int], str]:
    """(step, micro-batch) -> 'epoch group labels' of the last time rank 0 trained that batch."""
    seen = {}
    for line in (out / "trace.txt").read_text().splitlines():
        step, micro, rest = line.split(" ", 2)
        seen[int(step), int(micro)] = rest
    return seen


def checkpoint_names(out: Path) -> set[str]:
    """The checkpoint files a run wrote; a resume that writes a name the killed run wrote too gets ``-v1``."""
    return {re.sub(r"-v\d+(?=\.ckpt$)", "", f"{p.parent.name}/{p.name}") for p in out.glob("*ckpt/*.ckpt")}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each layout's uninterrupted run, made once (on first use) for the whole module."""
    root = tmp_path_factory.mktemp("references")

    class Lazy(dict):
        def __missing__(self, layout: str) -> Path:
            out = root / layout
            done = run_job(out, *COMMON, *LAYOUTS[layout], "--no-offload")
            assert done.returncode == 0, done.stderr[-3000:]
            self[layout] = out
            return out

    return Lazy()


def assert_same_run(reference: Path, resumed: Path) -> None:
    a = torch.load(reference / "final.pt", weights_only=True)
    b = torch.load(resumed / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    differ = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differ, f"{len(differ)}/{len(a)} tensors differ from the uninterrupted run, e.g. {differ[:3]}"
    assert trace(resumed) == trace(reference)  # same epoch, group and data at every batch
    assert checkpoint_names(resumed) == checkpoint_names(reference)  # no epoch skipped or repeated in the names
    for rank_file in resumed.glob("final_rank*.pt"):  # replicas agree
        other = torch.load(rank_file, weights_only=True)
        assert all(torch.equal(other[key], b[key]) for key in b), rank_file.name


CASES = [
    pytest.param(layout, offload, kill, marks=() if (layout, offload, kill) in SUBSET else pytest.mark.matrix)
    for layout in LAYOUTS
    for offload in (False, True)
    for kill in KILLS
]


@pytest.mark.parametrize(("layout", "offload", "kill"), CASES)
def test_killed_run_resumes_bit_identical(tmp_path, references, layout, offload, kill):
    step, micro, checkpoint = KILLS[kill]
    args = [*COMMON, *LAYOUTS[layout], *offload_args(offload)]
    out = tmp_path / "run"
    killed = run_job(out, *args, "--kill-at", str(step), "--kill-micro", str(micro))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "final.pt").exists()
    if kill == "after_checkpoint":
        assert torch.load(out / checkpoint, weights_only=True, map_location="cpu")["global_step"] == step
    resumed = run_job(out, *args, "--resume", str(out / checkpoint))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(references[layout], out)


@pytest.mark.matrix
@pytest.mark.parametrize("layout", ["single", "data_parallel"])
def test_plain_loader_resumes_bit_identical_at_epoch_ends(tmp_path, layout):
    """A plain ``DataLoader(shuffle=False)`` has no state to save; from a checkpoint at an epoch's end (Lightning's
    epoch checkpoint, or a step checkpoint on the last batch) the resumed run still trains the same batches."""
    args = [*COMMON, *LAYOUTS[layout], "--no-offload", "--loader", "ordered"]
    reference = tmp_path / "reference"
    done = run_job(reference, *args)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    killed = run_job(out, *args, "--kill-at", "7", "--kill-micro", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for run, checkpoint in ((out, "epoch_ckpt/epoch=0-step=4.ckpt"), (copy, "ckpt/epoch=0-step=4.ckpt")):
        resumed = run_job(run, *args, "--resume", str(run / checkpoint))
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert_same_run(reference, run)
