"""The per-group dashboard, read back from what each logger wrote: a wandb offline run (its ``.wandb`` file),
TensorBoard event files and CSVLogger's ``metrics.csv`` — keys, per-group points at exactly the steps a group
trained, memory and offload metrics, the partition in the hyper-parameters, the end-of-fit table, sample previews."""

from __future__ import annotations

import csv
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from tests.conftest import image_loader, tiny_dit, trainer_kwargs

STEPS, EVERY = 10, 4  # logging rows at steps 3 and 7: the other steps' points must still appear, once each
GROUPS = 3


# ---------------------------------------------------------------------- reading a wandb offline run back
def wandb_records(run_dir: Path) -> Iterator[Any]:
    """The protobuf records of an offline run's ``.wandb`` file (LevelDB log format: 32 KiB blocks of chunks with a
    7-byte header; a record may span chunks), read with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block is padded
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


class WandbRun:
    """History rows, config and metric definitions of one offline run."""

    def __init__(self, run_dir: Path) -> None:
        self.dir = run_dir
        self.history: list[dict[str, Any]] = []
        self.config: dict[str, Any] = {}
        self.metrics: dict[str, str] = {}  # metric name -> its step metric
        for record in wandb_records(run_dir):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row: dict[str, Any] = {}
                for item in record.history.item:  # a media value is spread over items keyed (name, field)
                    *parents, leaf = list(item.nested_key) or [item.key]
                    node = row
                    for parent in parents:
                        node = node.setdefault(parent, {})
                    node[leaf] = json.loads(item.value_json)
                self.history.append(row)
            elif kind == "run":
                self.config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                self.config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "metric" and record.metric.name:
                self.metrics[record.metric.name] = record.metric.step_metric

    def series(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[int, float]]:
        return [(int(row[step_key]), row[key]) for row in self.history if key in row]


# ---------------------------------------------------------------------- one fit, three loggers
class Recorder(L.Callback):
    """What the progress bar holds and each step's loss, after every training batch."""

    def __init__(self) -> None:
        self.bars: list[dict[str, Any]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.bars.append(dict(trainer.progress_bar_metrics))
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    import wandb
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    tmp = tmp_path_factory.mktemp("dashboard")
    module = ldb.DiffusionBlocksModule(tiny_dit(), ldb.tasks.ImageGeneration(), num_blocks=GROUPS)
    loggers = [
        CSVLogger(tmp, name="csv"),
        TensorBoardLogger(tmp, name="tb", default_hp_metric=False),
        WandbLogger(save_dir=str(tmp), offline=True, project="ldb-dashboard"),
    ]
    recorder, monitor = Recorder(), ldb.callbacks.BlockMemoryMonitor()
    samples = ldb.callbacks.SampleLogger(every_n_steps=5, steps=4, per_row=2, max_rows=3)
    callbacks = [ldb.callbacks.BlockOffload(directory=tmp / "offload"), monitor, samples, recorder]
    kwargs = trainer_kwargs(tmp, logger=loggers, log_every_n_steps=EVERY, callbacks=callbacks)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=STEPS, **kwargs)
    try:
        trainer.fit(module, image_loader(), image_loader(n=16))
    finally:
        wandb.finish()
    schedule = trainer.strategy.schedule
    return {
        "module": module,
        "trainer": trainer,
        "recorder": recorder,
        "monitor": monitor,
        "samples": samples,
        "groups": [schedule.group_at(s) for s in range(STEPS)],
        "csv": list(csv.DictReader((tmp / "csv" / "version_0" / "metrics.csv").open())),
        "csv_dir": tmp / "csv" / "version_0",
        "tb": _event_accumulator(tmp / "tb" / "version_0"),
        "tb_dir": tmp / "tb" / "version_0",
        "wandb": WandbRun(next((tmp / "wandb").glob("offline-run-*"))),
    }


def _event_accumulator(folder: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def csv_series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def tb_series(accumulator: Any, key: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(key)]


def same_points(actual: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [s for s, _ in actual] == [s for s, _ in expected]
    assert [v for _, v in actual] == pytest.approx([v for _, v in expected], rel=1e-5)


def every_logger(run: dict[str, Any], key: str) -> dict[str, list[tuple[int, float]]]:
    return {
        "csv": csv_series(run["csv"], key),
        "tensorboard": tb_series(run["tb"], key),
        "wandb": run["wandb"].series(key),
    }


# ---------------------------------------------------------------------- per-group training loss
def test_group_loss_has_one_point_per_step_the_group_trained_in_every_logger(run: dict[str, Any]) -> None:
    groups, losses = run["groups"], run["recorder"].losses
    assert set(groups) == set(range(GROUPS))  # the random schedule visited every group in 10 steps
    for g in range(GROUPS):
        trained = [s for s in range(STEPS) if groups[s] == g]
        expected = [(s, losses[s]) for s in trained]
        own_steps = [(s, float(i + 1)) for i, s in enumerate(trained)]  # the group's own step count, this one included
        for name, points in every_logger(run, f"train/loss_group_{g}").items():
            assert [s for s, _ in points] == trained, (name, g)  # no stale repeats, none lost between logging rows
            assert [v for _, v in points] == pytest.approx([v for _, v in expected], rel=1e-5), (name, g)
        for name, points in every_logger(run, f"train/group_{g}/step").items():
            assert points == own_steps, (name, g)
        # the same loss against the group's own step: TensorBoard on its step axis, wandb with a step metric
        by_own_step = [(i + 1, v) for i, (_, v) in enumerate(expected)]
        same_points(tb_series(run["tb"], f"train/group_{g}/loss"), by_own_step)
        same_points(run["wandb"].series(f"train/group_{g}/loss", step_key=f"train/group_{g}/step"), by_own_step)
        assert run["wandb"].metrics[f"train/group_{g}/loss"] == f"train/group_{g}/step"


def test_mixed_loss_and_validation_loss_per_group_reach_every_logger(run: dict[str, Any]) -> None:
    for key in ("train/loss", "val/loss", *(f"val/loss_group_{g}" for g in range(GROUPS))):
        for name, points in every_logger(run, key).items():
            assert points, (name, key)
            assert all(math.isfinite(v) for _, v in points), (name, key)
    # validation ran at the end of each of the two full epochs (4 batches each)
    assert [s for s, _ in csv_series(run["csv"], "val/loss_group_0")] == [3, 7]


def test_progress_bar_shows_the_active_group_and_its_running_loss(run: dict[str, Any]) -> None:
    groups, losses, bars = run["groups"], run["recorder"].losses, run["recorder"].bars
    running: dict[int, float] = {}
    for step, bar in enumerate(bars):
        g = groups[step]
        running[g] = losses[step] if g not in running else running[g] + 0.1 * (losses[step] - running[g])
        assert bar["group"] == str(g)  # a string: shown as "group: 2", never "2.000"
        assert bar["loss_g"] == pytest.approx(running[g], rel=1e-5)
        assert "train/loss" not in bar  # the mixed-group loss stays in the loggers only


def test_group_losses_reach_model_checkpoint_and_early_stopping(tmp_path: Path) -> None:
    """Loggers get per-group points directly; callbacks read ``trainer.callback_metrics``, which must hold each
    group's latest loss for ``monitor="train/loss_group_{g}"`` to save and stop."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=GROUPS)
    recorder = Recorder()
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/loss_group_0", save_top_k=1, mode="min")
    stop = EarlyStopping(monitor="train/loss_group_0", stopping_threshold=1e9)  # stops at its first check
    strategy = ldb.DiffusionBlocksStrategy(schedule="sequential", steps_per_phase=2)
    kwargs = trainer_kwargs(tmp_path, callbacks=[recorder, best, stop], enable_checkpointing=True)
    trainer = L.Trainer(strategy=strategy, max_epochs=3, **kwargs)
    trainer.fit(module, image_loader())  # 4 batches an epoch: groups 0 0 1 1, then the end-of-epoch checks
    losses = recorder.losses
    assert trainer.global_step == 4  # EarlyStopping fired at the end of the first epoch
    assert stop.stopping_reason_message is not None
    assert Path(best.best_model_path).is_file()
    assert float(best.best_model_score) == pytest.approx(losses[1])  # group 0's latest loss at the epoch's end
    metrics = trainer.callback_metrics
    assert not any(f"train/loss_group_{g}" in metrics for g in range(2, GROUPS))  # only the groups that trained
    assert float(metrics["train/loss_group_0"]) == pytest.approx(losses[1])
    assert float(metrics["train/loss_group_1"]) == pytest.approx(losses[3])


def test_monitoring_a_group_loss_under_block_parallel_is_refused() -> None:
    """Under block parallel a group's loss exists on its own processes only: a monitor on it would leave the others
    waiting in the callbacks' joint decision, so it is refused, naming a loss every process has."""
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_diffusionblocks.dashboard import check_group_loss_monitors

    def trainer(gradient_group_size: int, monitor: str) -> Any:
        callbacks = [ModelCheckpoint(monitor="train/loss"), EarlyStopping(monitor=monitor)]
        strategy = SimpleNamespace(gradient_group_size=gradient_group_size)
        return SimpleNamespace(world_size=4, strategy=strategy, callbacks=callbacks)

    with pytest.raises(
        MisconfigurationException, match=r"EarlyStopping\(monitor='train/loss_group_1'\).*'val/loss_group_1'"
    ):
        check_group_loss_monitors(trainer(2, "train/loss_group_1"))  # 2 groups x 2 replicas
    check_group_loss_monitors(trainer(4, "train/loss_group_1"))  # data parallel: every process has every key
    check_group_loss_monitors(trainer(1, "val/loss_group_1"))


# ---------------------------------------------------------------------- memory and offload
def test_memory_of_every_group_and_offload_statistics_on_every_logging_row(run: dict[str, Any]) -> None:
    rows, groups, tb = run["csv"], run["groups"], run["tb"]
    logging_rows = (EVERY - 1, 2 * EVERY - 1)
    for previous, row in zip((-1, *logging_rows), logging_rows):
        trained = set(groups[previous + 1 : row + 1])  # the groups trained since the previous row
        memory = [r for r in rows if int(r["step"]) == row and any(k.startswith("memory/") and v for k, v in r.items())]
        assert len(memory) == 1
        for g in range(GROUPS):
            assert bool(memory[0].get(f"memory/group_{g}/total_mib")) == (g in trained), (row, g)
        for g in trained:
            assert float(memory[0][f"memory/group_{g}/total_mib"]) > 0
            assert float(memory[0][f"memory/group_{g}/activations_mib"]) > 0
    for g in range(GROUPS):
        shown = [row for previous, row in zip((-1, *logging_rows), logging_rows) if g in groups[previous + 1 : row + 1]]
        assert [s for s, _ in tb_series(tb, f"memory/group_{g}/total_mib")] == shown
        assert [s for s, _ in run["wandb"].series(f"memory/group_{g}/peak_rss_mib")] == shown
    for key in ("offload/seconds", "offload/mib_moved", "offload/offloads", "offload/loads"):
        for name, points in every_logger(run, key).items():
            assert [s for s, _ in points] == [3, 7, STEPS], (name, key)  # logging rows, then the end-of-fit totals
            values = [v for _, v in points]
            assert values == sorted(values), (name, key)  # running totals
            assert values[-1] > 0, (name, key)


# ---------------------------------------------------------------------- hyper-parameters and the table
def test_partition_schedule_task_and_network_are_in_the_hyperparameters(run: dict[str, Any]) -> None:
    module: ldb.DiffusionBlocksModule = run["module"]
    configs = {
        "wandb": run["wandb"].config["diffusionblocks"],
        "tensorboard": yaml.safe_load((run["tb_dir"] / "hparams.yaml").read_text().replace("!!python/tuple", ""))[
            "diffusionblocks"
        ],
        "csv": yaml.safe_load((run["csv_dir"] / "hparams.yaml").read_text().replace("!!python/tuple", ""))[
            "diffusionblocks"
        ],
    }
    per_group = [sum(p.numel() for p in module.network.group_parameters(g)) for g in range(GROUPS)]
    for name, config in configs.items():
        assert config["num_blocks"] == GROUPS, name
        assert config["group_sizes"] == [2, 2, 2], name
        assert config["boundaries"] == pytest.approx(module.boundaries.tolist()), name
        flat = [x for pair in config["sigma_ranges"] for x in pair]
        assert flat == pytest.approx([x for pair in module.ranges for x in pair]), name
        flat = [x for pair in config["nominal_sigma_ranges"] for x in pair]
        assert flat == pytest.approx([x for g in range(GROUPS) for x in module.nominal_range(g)]), name
        assert config["schedule"] == {"name": "RandomSchedule", "groups": [0, 1, 2], "seed": 0}, name
        assert config["task"]["class"] == "ImageGeneration", name
        assert config["network"]["class"] == "DiT", name
        assert config["network"]["init_args"]["depth"] == 6, name
        assert config["network"]["parameters_per_group"] == per_group, name
        assert config["network"]["parameters"] == sum(p.numel() for p in module.network.parameters()), name
    assert run["wandb"].config["lr"] == pytest.approx(1e-3)  # Lightning's own hyper-parameters are kept beside it


def test_table_of_sigma_ranges_and_memory_at_the_end_of_fit(run: dict[str, Any]) -> None:
    module: ldb.DiffusionBlocksModule = run["module"]
    monitor = run["monitor"]
    with (run["csv_dir"] / "diffusionblocks_groups.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["group"] for r in table] == ["0", "1", "2"]
    for g, row in enumerate(table):
        assert [float(row["sigma_min"]), float(row["sigma_max"])] == pytest.approx(list(module.ranges[g]))
        assert int(row["steps"]) == run["groups"].count(g) == int(module.group_steps[g])
        assert float(row["total_mib"]) == pytest.approx(monitor.groups[str(g)].total / 2**20, abs=1e-3)
    # wandb: a Table; its JSON is written beside the run
    files = list((run["wandb"].dir / "files" / "media" / "table").rglob("groups_*.table.json"))
    assert len(files) == 1
    logged = json.loads(files[0].read_text())
    assert logged["columns"][:4] == ["group", "layers", "sigma_min", "sigma_max"]
    assert "total_mib" in logged["columns"]
    assert len(logged["data"]) == GROUPS
    assert any(row.get("diffusionblocks/groups", {}).get("_type") == "table-file" for row in run["wandb"].history)
    # TensorBoard: markdown text
    text = run["tb"].Tensors("diffusionblocks/groups/text_summary")
    assert len(text) == 1
    assert text[0].step == STEPS
    markdown = text[0].tensor_proto.string_val[0].decode()
    assert markdown.startswith("| group | layers | sigma_min | sigma_max")
    assert markdown.count("\n") == GROUPS + 1


def test_sample_grids_are_logged_as_images_or_files(run: dict[str, Any]) -> None:
    shown = [4, STEPS - 1]  # global steps 5 and 10: the logging steps of batches 4 and 9 (10 is the last: no repeat)
    assert [e.step for e in run["tb"].Images("samples/images")] == shown
    image_rows = [r for r in run["wandb"].history if "samples/images" in r]
    assert [int(r["trainer/global_step"]) for r in image_rows] == shown
    assert all((run["wandb"].dir / "files" / r["samples/images"]["filenames"][0]).is_file() for r in image_rows)
    pngs = sorted(p.name for p in (run["csv_dir"] / "samples").glob("*.png"))
    assert pngs == [f"samples_images_step{s}.png" for s in shown]
    preview = run["samples"].last
    assert preview.rows == 3
    assert preview.images.shape == (6, 1, 8, 8)
    assert preview.caption.startswith("ImageGeneration: one row per class")


# ---------------------------------------------------------------------- other cadences, end to end, other tasks
@pytest.mark.parametrize("every", [1, 50])
def test_points_are_neither_lost_nor_repeated_at_any_logging_cadence(tmp_path: Path, every: int) -> None:
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=GROUPS)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        strategy="diffusionblocks", max_steps=7, **trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=every)
    )
    trainer.fit(module, image_loader())
    rows = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    points = sorted((int(r["step"]), g) for r in rows for g in range(GROUPS) if r.get(f"train/loss_group_{g}"))
    assert points == [(s, trainer.strategy.schedule.group_at(s)) for s in range(7)]


def test_end_to_end_run_logs_one_loss_and_one_table_row(tmp_path: Path) -> None:
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=GROUPS)
    logger = CSVLogger(tmp_path, name="csv")
    kwargs = trainer_kwargs(
        tmp_path, logger=logger, log_every_n_steps=1, callbacks=[ldb.callbacks.BlockMemoryMonitor()]
    )
    L.Trainer(strategy="auto", max_steps=3, **kwargs).fit(module, image_loader())
    folder = tmp_path / "csv" / "version_0"
    header = (folder / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header
    assert not any(k.startswith("train/loss_group_") for k in header)
    assert "memory/group_all/total_mib" in header
    config = yaml.safe_load((folder / "hparams.yaml").read_text().replace("!!python/tuple", ""))["diffusionblocks"]
    assert config["schedule"] == {"name": "end_to_end"}
    assert config["trained_blockwise"] is False
    table = list(csv.DictReader((folder / "diffusionblocks_groups.csv").open()))
    assert [(r["group"], int(r["steps"]), float(r["sigma_max"])) for r in table] == [("all", 3, 80.0)]
    assert float(table[0]["total_mib"]) > 0


def test_classification_preview_is_a_confusion_matrix_and_accuracy_per_sigma_step(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=16, patch_size=4, in_chans=1, depth=3,
        embed_dim=32, num_heads=2,
    )  # fmt: skip
    net = ldb.models.ConditioningAdapter(backbone, num_classes=4)
    module = ldb.DiffusionBlocksModule(net, ldb.tasks.Classification(4), num_blocks=GROUPS, stem="shared")
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (32,), generator=g)
    data = DataLoader(TensorDataset(torch.randn(32, 1, 16, 16, generator=g), labels), batch_size=16)
    samples = ldb.callbacks.SampleLogger(every_n_steps=0)  # only at the end
    logger = CSVLogger(tmp_path, name="csv")
    kwargs = trainer_kwargs(tmp_path, logger=logger, log_every_n_steps=1, callbacks=[samples])
    L.Trainer(strategy="diffusionblocks", max_steps=2, **kwargs).fit(module, data)
    folder = tmp_path / "csv" / "version_0"
    matrix = list(csv.reader((folder / "samples" / "samples_table_step2.csv").open()))
    assert matrix[0] == ["true/predicted", "0", "1", "2", "3"]
    counts = [[int(c) for c in row[1:]] for row in matrix[1:]]
    assert [sum(row) for row in counts] == torch.bincount(labels[:16], minlength=4).tolist()  # the first batch
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    accuracy = [
        float(r[f"samples/accuracy_step_{i}"])
        for i in range(GROUPS)
        for r in rows
        if r.get(f"samples/accuracy_step_{i}")
    ]
    assert len(accuracy) == GROUPS
    assert all(0.0 <= a <= 1.0 for a in accuracy)
    assert accuracy[-1] == pytest.approx(sum(counts[c][c] for c in range(4)) / 16)
    lines = (folder / "samples" / "samples_text_step2.txt").read_text().splitlines()
    assert lines[0].startswith("Classification:")
    assert len(lines) == 1 + GROUPS


@pytest.mark.parametrize("objective", ["masked", "autoregressive"])
def test_language_model_previews_are_generated_lines(tmp_path: Path, objective: str) -> None:
    """Masked: no logger, the lines are written to the callback's folder. Autoregressive: TensorBoard text."""
    vocab = 12
    net = ldb.models.TransformerLM(vocab, objective, dim=32, depth=3, heads=2, context_length=32)
    task = ldb.tasks.MaskedLM(vocab) if objective == "masked" else ldb.tasks.AutoregressiveLM(vocab)
    module = ldb.DiffusionBlocksModule(net, task, num_blocks=GROUPS)
    tokens = torch.randint(0, vocab, (16, 12), generator=torch.Generator().manual_seed(0))
    alphabet = "abcdefghijkl"
    options = {"steps": 3} if objective == "masked" else {"prompt_length": 4, "max_new_tokens": 5}
    decode = lambda ids: "".join(alphabet[i] for i in ids)  # noqa: E731
    samples = ldb.callbacks.SampleLogger(every_n_steps=0, decode=decode, num_samples=3, **options)
    if objective == "masked":
        logger: Any = False
    else:
        from lightning.pytorch.loggers import TensorBoardLogger

        pytest.importorskip("tensorboard")
        logger = TensorBoardLogger(tmp_path, name="tb")
    kwargs = trainer_kwargs(tmp_path, callbacks=[samples], logger=logger)
    L.Trainer(strategy="diffusionblocks", max_steps=2, **kwargs).fit(module, DataLoader(tokens, batch_size=8))
    if objective == "masked":
        lines = (tmp_path / "samples" / "samples_text_step2.txt").read_text().splitlines()
        assert lines[0] == samples.last.caption
        assert len(lines) == 4
        assert all(len(line) == 12 for line in lines[1:])
        assert all(set(line) <= set(alphabet) for line in lines[1:])
        return
    text = _event_accumulator(tmp_path / "tb" / "version_0").Tensors("samples/text/text_summary")
    assert [t.step for t in text] == [2]
    lines = [line.strip() for line in text[0].tensor_proto.string_val[0].decode().splitlines()]
    assert lines[0] == samples.last.caption
    prompts = ["".join(alphabet[i] for i in row[:4]) for row in tokens[:3].tolist()]
    assert [line.split(" | ")[0] for line in lines[1:]] == prompts
    assert all(len(line.split(" | ")[1]) == 5 for line in lines[1:])


@pytest.mark.parametrize("task", [ldb.tasks.FlowMatching, ldb.tasks.DDPM])
def test_every_image_formulation_previews_a_class_grid(task: type[ldb.tasks.ImageGeneration]) -> None:
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), task(), num_blocks=GROUPS)
    images, labels = next(iter(image_loader()))
    module.task.observe((images, labels))
    with module.evaluating() as router:
        preview = module.task.preview(router, (images, labels), per_row=2, max_rows=4, steps=3)
    assert preview.rows == 4
    assert preview.images.shape == (8, 1, 8, 8)
    assert preview.caption.startswith(f"{task.__name__}: one row per class")
    assert torch.isfinite(preview.images).all()


class OffloadFolder(L.Callback):
    """Writes where this process's ``BlockOffload`` keeps its files (spawned processes return nothing else)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        offload = next(cb for cb in trainer.callbacks if isinstance(cb, ldb.callbacks.BlockOffload))
        (self.out / f"rank{trainer.global_rank}.txt").write_text(str(offload.directory))


@pytest.mark.slow  # two spawned processes: ~25 s on two cores, the rest of this file ~7 s
def test_block_parallel_points_of_every_process_reach_rank_zeros_logger(tmp_path: Path) -> None:
    """Under block parallel each process trains its own groups (rank 0: 0 and 1, rank 1: 2 and 3): the loss points
    and the memory figures are gathered before rank 0 writes them. Both processes offload into one directory, each
    in a folder of its own."""
    strategy = ldb.BlockParallelStrategy(start_method="spawn", process_group_backend="gloo")
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=4), ldb.tasks.ImageGeneration(), num_blocks=4)
    samples = ldb.callbacks.SampleLogger(every_n_steps=0, steps=2, per_row=1, max_rows=2)
    monitor, offload = ldb.callbacks.BlockMemoryMonitor(), ldb.callbacks.BlockOffload(directory=tmp_path / "offload")
    logger = CSVLogger(tmp_path, name="csv")
    callbacks = [offload, monitor, samples, OffloadFolder(tmp_path)]
    kwargs = trainer_kwargs(tmp_path, devices=2, logger=logger, log_every_n_steps=2, callbacks=callbacks)
    L.Trainer(strategy=strategy, max_steps=3, **kwargs).fit(module, image_loader(n=32, batch_size=4))
    folder = tmp_path / "csv" / "version_0"
    rows = list(csv.DictReader((folder / "metrics.csv").open()))
    trained = {(s, g) for g in range(4) for s, _ in csv_series(rows, f"train/loss_group_{g}")}
    for owned in ((0, 1), (2, 3)):  # each process trains one of its own groups at every step
        steps = sorted(s for s, g in trained if g in owned)
        assert steps == [0, 1, 2]
        for g in owned:
            own = [s for s, gg in sorted(trained) if gg == g]
            assert csv_series(rows, f"train/group_{g}/step") == [(s, float(i + 1)) for i, s in enumerate(own)]
    assert [p.name for p in (folder / "samples").glob("*.png")] == ["samples_images_step3.png"]
    # memory: the logging row after steps 0 and 1 shows the groups trained there, by whichever process
    memory = {k.split("/")[1] for r in rows if r["step"] == "1" for k, v in r.items() if k.startswith("memory/") and v}
    assert memory == {f"group_{g}" for s, g in trained if s <= 1}
    table = list(csv.DictReader((folder / "diffusionblocks_groups.csv").open()))
    assert [bool(r["total_mib"]) for r in table] == [g in {g for _, g in trained} for g in range(4)]
    folders = [Path((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert [f.parent for f in folders] == [tmp_path / "offload"] * 2
    assert [f.name.startswith(f"ldb-offload-rank{r}-") for r, f in enumerate(folders)] == [True, True]
    assert list((tmp_path / "offload").iterdir()) == []  # each removed its own at the end
