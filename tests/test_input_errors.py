"""Small inputs a new user may hand over: each gets a clear error naming the fix (or works), never a raw traceback
from deep inside a step and never a silently wrong run."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks import checks
from lightning_diffusionblocks.models import ConditioningAdapter
from tests.conftest import fit, tiny_dit, trainer_kwargs

IMAGE_TASKS = (ldb.tasks.ImageGeneration, ldb.tasks.FlowMatching, ldb.tasks.DDPM)


def batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.arange(n) % 10


def fit_on(net: nn.Module, task: ldb.tasks.Task, images: torch.Tensor, labels: torch.Tensor, tmp_path: Path,
           max_steps: int = 1, **trainer: Any) -> ldb.DiffusionBlocksModule:  # noqa: ANN401  # fmt: skip
    """A two-group module of ``net`` and ``task`` trained on a user's own ``(images, labels)`` tensors."""
    module = ldb.DiffusionBlocksModule(net, task, num_blocks=2)
    fit(module, tmp_path, steps=max_steps, loader=DataLoader(TensorDataset(images, labels), batch_size=16), **trainer)
    return module


class LabelNet(nn.Module):
    """A user's denoiser with a label table of ``rows`` rows, declaring ``num_classes`` or not."""

    def __init__(self, rows: int, num_classes: int | None = None) -> None:
        super().__init__()
        if num_classes is not None:
            self.num_classes = num_classes
        self.label = nn.Embedding(rows, 8)
        self.inp, self.out = nn.Linear(64, 8), nn.Linear(8, 64)
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.inp(x.flatten(1)) + self.label(labels)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).view_as(x)


# ---------------------------------------------------------------------- training data
ONE_HOT = ("one-hot labels", lambda x, y: (x, nn.functional.one_hot(y, 10).float()), r"labels\.argmax\(-1\)")
FLOAT = ("float labels", lambda x, y: (x, y.float()), r"1-D integer tensor of class ids.*labels\.long\(\)")
UINT8 = ("uint8 images", lambda x, y: (((x + 1) * 127.5).to(torch.uint8), y), r"images\.float\(\) / 127\.5 - 1")


@pytest.mark.parametrize(
    ("task_class", "case"),
    [(task, ONE_HOT) for task in IMAGE_TASKS] + [(ldb.tasks.ImageGeneration, FLOAT), (ldb.tasks.DDPM, UINT8)],
    ids=lambda v: v[0].replace(" ", "_") if isinstance(v, tuple) else v.__name__,
)
def test_image_tasks_refuse_training_data_they_would_misread(tmp_path, task_class, case):
    """Float/one-hot labels and 0–255 integer images stop at the first step with the conversion to make (before: a
    raw dtype error from the embedding or the first convolution)."""
    _, convert, message = case
    images, labels = convert(*batch())
    with pytest.raises(ValueError, match=message):
        fit_on(tiny_dit(depth=2), task_class(), images, labels, tmp_path)


def test_unscaled_float_images_are_warned_about(tmp_path):
    images, labels = batch()
    with pytest.warns(UserWarning, match=r"range over \[.*255.*images / 127\.5 - 1"):
        fit_on(tiny_dit(depth=2), ldb.tasks.ImageGeneration(), (images + 1) * 127.5, labels, tmp_path)


def test_classification_names_argmax_for_one_hot_labels():
    task = ldb.tasks.Classification(num_classes=10)
    images, labels = batch()
    with pytest.raises(ValueError, match=r"shape \(16, 10\)\. For one-hot labels pass labels\.argmax\(-1\)\.$"):
        task.split((images, nn.functional.one_hot(labels, 10).float()))


# ---------------------------------------------------------------------- the null label
def test_a_null_label_the_label_table_lacks_is_refused_at_construction():
    """num_classes=10 with an Embedding(10): the 'no label' id 10 has no row (before: IndexError in training)."""
    with pytest.raises(
        ValueError, match=r"feeds label 10 for 'no label'.*has 10 rows.*nn\.Embedding\(num_classes \+ 1"
    ):
        ldb.DiffusionBlocksModule(LabelNet(10, num_classes=10), ldb.tasks.ImageGeneration(), num_blocks=2)
    # told which id means "no label", the task trusts the user
    ldb.DiffusionBlocksModule(LabelNet(10, num_classes=10), ldb.tasks.ImageGeneration(null_label=0), num_blocks=2)


def test_a_real_class_equal_to_the_guessed_null_label_is_refused(tmp_path):
    """An Embedding(10) and no num_classes: the last row, 9, is guessed as 'no label'; data with class 9 is refused
    (before: the 9s were silently dropped to 'no label' and unguided samples were 9s). Without a 9 it trains."""
    images, labels = batch()
    with pytest.raises(
        ValueError, match=r"include 9.*guessed as the last row of the label embedding `label`.*null_label"
    ):
        fit_on(LabelNet(10), ldb.tasks.FlowMatching(), images, labels, tmp_path)
    module = fit_on(LabelNet(10), ldb.tasks.FlowMatching(), images, labels % 9, tmp_path)
    assert (module.task.null_label, int(module.step_count)) == (9, 1)


# ---------------------------------------------------------------------- networks made for another task
def test_xcit_gets_the_additive_layout():
    """XCiT's local patch interaction folds tokens back into the grid, so one extra token breaks it (before: the
    default layout chose 'token' and the first forward failed with a raw shape error)."""
    torch.manual_seed(0)
    xcit = timm.create_model("xcit_nano_12_p8_224", pretrained=False, num_classes=0, img_size=16, depth=2)
    adapter = ConditioningAdapter(xcit, num_classes=3, learn_embedding=False)
    assert adapter.layout == "additive"
    assert "local patch interaction" in adapter.layout_reason
    assert adapter(torch.randn(2, 3, 16, 16), torch.randn(2, adapter.dim), torch.ones(2)).shape == (2, 3)


@pytest.mark.parametrize("learn_embedding", [False, True])
def test_a_classifier_adapter_is_refused_by_image_generation(learn_embedding):
    """Before: a stem message (learned embedding), then a raw shape error in the first step."""
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, patch_size=4,
                            in_chans=1, depth=2, embed_dim=16, num_heads=2)  # fmt: skip
    adapter = ConditioningAdapter(vit, num_classes=10, learn_embedding=learn_embedding)
    with pytest.raises(ValueError, match=r"ConditioningAdapter returns class logits.*Train it with Classification"):
        ldb.DiffusionBlocksModule(adapter, ldb.tasks.ImageGeneration(), num_blocks=2)


# ---------------------------------------------------------------------- sampling arguments
SAMPLING_REFUSALS = [
    ({"num_samples": 2, "steps": 2.5}, TypeError, r"steps must be an integer, got 2\.5 \(float\); e\.g\. sample"),
    ({"num_samples": 2, "clip": (1, -1)}, ValueError, r"clip=\(1, -1\) is not an increasing.*clip=\(-1\.0, 1\.0\)"),
    ({"labels": [1, 2, 3, 4], "num_samples": 8}, ValueError, r"got 4 labels and num_samples=8.*repeat_interleave"),
    ({"labels": torch.tensor([1.0, 2.0])}, TypeError, r"labels must be integer class ids.*torch\.float32"),
    ({"labels": nn.functional.one_hot(torch.tensor([1, 2]), 10)}, ValueError, r"labels\.argmax\(-1\)"),
    ({"num_samples": 0}, ValueError, r"num_samples must be >= 1, got 0; e\.g\. sample\(num_samples=8\)"),
    ({"num_samples": 2, "seed": 1.5}, TypeError, r"seed must be an integer"),
]  # fmt: skip


#: plain test ids (mutmut runs each mutant's tests by id; ids holding quotes, brackets or backslashes it cannot name)
SAMPLING_REFUSAL_IDS = ["fractional_steps", "decreasing_clip", "labels_vs_num_samples", "float_labels",
                        "one_hot_labels", "no_samples", "fractional_seed"]  # fmt: skip


@pytest.mark.parametrize("task_class", IMAGE_TASKS, ids=lambda t: t.__name__)
@pytest.mark.parametrize(("kwargs", "error", "message"), SAMPLING_REFUSALS, ids=SAMPLING_REFUSAL_IDS)
def test_sampling_arguments_are_checked_once_for_every_image_task(task_class, kwargs, error, message):
    """Before: steps=2.5 and float labels ran (truncated), clip=(1, -1) clamped every pixel to one value, 4 labels with
    num_samples=8 gave 4 samples, num_samples=0 said to pass num_samples."""
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=2), task_class(), num_blocks=2)
    with pytest.raises(error, match=message):
        module.sample(**{"steps": 2, **kwargs})


def test_consistent_sampling_arguments_still_work():
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=2), ldb.tasks.DDPM(), num_blocks=2)
    assert module.sample(labels=[1, 2], num_samples=2, steps=1, clip=[-1, 1], seed=3).shape == (2, 1, 8, 8)


def test_classification_refuses_fractional_steps():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=8, patch_size=4,
                            in_chans=1, depth=2, embed_dim=16, num_heads=2)  # fmt: skip
    adapter = ConditioningAdapter(vit, num_classes=3, learn_embedding=False)
    module = ldb.DiffusionBlocksModule(adapter, ldb.tasks.Classification(3), num_blocks=2)
    with pytest.raises(TypeError, match=r"steps must be an integer, got 2\.5.*predict_proba\(steps=50\)"):
        module.predict_proba(torch.randn(2, 1, 8, 8), steps=2.5)


# ---------------------------------------------------------------------- fit set-up
def test_an_empty_training_loader_is_an_error_and_end_to_end_says_so(tmp_path, monkeypatch):
    """Before: Lightning's warning and a fit of 0 steps. The end-to-end baseline (strategy="auto") says in its log
    that it trains every group on the full noise range."""
    said: list[str] = []
    monkeypatch.setattr(checks, "rank_zero_info", said.append)
    images, labels = batch()
    with pytest.raises(MisconfigurationException, match=r"training dataloader has no batches.*batch_size"):
        fit_on(tiny_dit(depth=2), ldb.tasks.ImageGeneration(), images[:0], labels[:0], tmp_path, strategy="auto")
    assert any("training end to end" in s and "strategy='diffusionblocks'" in s for s in said)


@pytest.mark.parametrize(
    ("schedule", "max_steps", "counts"),
    [("sequential", 10, r"group 0: 4, group 1: 4, group 2: 2\).*max_steps=12"), ("random", 6, r"group 0: \d")],
)
def test_max_steps_that_leave_groups_unequal_steps_are_said(tmp_path, schedule, max_steps, counts):
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3)
    strategy = ldb.DiffusionBlocksStrategy(schedule=schedule)
    trainer = L.Trainer(max_steps=max_steps, **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match=rf"unequal steps \({counts}"):
        strategy.build_schedule(module, trainer)
    trainer = L.Trainer(max_steps=12, **trainer_kwargs(tmp_path))
    if schedule == "sequential":  # a multiple of B: equal phases, nothing to say
        strategy.build_schedule(module, trainer)


MULTI_PROCESS_REFUSAL = r'DDPStrategy over 2 processes.*end to end.*strategy="diffusionblocks", devices=2'


def test_a_multi_process_strategy_that_is_not_ours_is_refused_at_fit_start(tmp_path):
    """The check itself, on Lightning's own DDP strategy for 2 devices (not launched): no schedule was handed over
    and trainer.world_size is 2. Training end to end on one device stays allowed."""
    module = ldb.DiffusionBlocksModule(tiny_dit(depth=2), ldb.tasks.ImageGeneration(), num_blocks=2)
    module.trainer = L.Trainer(strategy="ddp_find_unused_parameters_true", devices=2, accelerator="cpu", logger=False)
    with pytest.raises(MisconfigurationException, match=MULTI_PROCESS_REFUSAL):
        module.on_fit_start()
    # num_blocks=1 is end to end by construction: a multi-process end-to-end baseline (benchmarks/scaling.py) may run
    whole = ldb.DiffusionBlocksModule(tiny_dit(depth=2), ldb.tasks.ImageGeneration(), num_blocks=1)
    whole.trainer = module.trainer
    whole.on_fit_start()
    assert not whole.blockwise


@pytest.mark.slow  # one launch of two spawned processes (fresh interpreters importing torch and Lightning)
def test_a_spawned_ddp_run_stops_in_every_process(tmp_path):
    """strategy="ddp_find_unused_parameters_true" (what DDP's own error advises) used to train end to end without a
    word; now every process stops at fit start naming strategy="diffusionblocks", devices=2."""
    strategy = DDPStrategy(start_method="spawn", process_group_backend="gloo", find_unused_parameters=True)
    images, labels = batch()
    run = partial(fit_on, tiny_dit(depth=2), ldb.tasks.ImageGeneration(), images, labels, tmp_path)
    with pytest.raises(Exception, match=MULTI_PROCESS_REFUSAL):
        run(strategy=strategy, devices=2)
