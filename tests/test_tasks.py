"""What tasks share: argument checks and defaults, refusals naming what a task offers, how predictions are written, and
the embedding bridge of Classification and AutoregressiveLM (σ_data from the schedule, the embeddings' dtype)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from lightning_diffusionblocks.noise import NoiseSchedule
from lightning_diffusionblocks.tasks import AutoregressiveLM, Classification, ImageGeneration, MaskedLM
from lightning_diffusionblocks.tasks.base import Task, _task_classes
from tests.fakes import Declares, Recorder
from tests.reference import close, cross_entropy, gen


def test_task_arguments_and_defaults_are_checked() -> None:
    """Tasks refuse < 2 classes or tokens, label dropout outside [0, 1), a non-integer null label and an unknown
    weighting; the smallest legal values pass. The null label is the given one, else the network's, else −1."""
    assert Classification(2).num_classes == MaskedLM(2).vocab_size == AutoregressiveLM(2).vocab_size == 2
    with pytest.raises(ValueError, match=r"^num_classes must be >= 2, got 1\.$"):
        Classification(1)
    for language_task in (MaskedLM, AutoregressiveLM):
        with pytest.raises(ValueError, match=r"^vocab_size must be >= 2, got 1\.$"):
            language_task(1)
        assert language_task(3).context_length is None
    with pytest.raises(ValueError, match=r"^weighting must be 'per_sample', 'batch_mean' or 'none', got 'mean'\.$"):
        AutoregressiveLM(4, weighting="mean")  # type: ignore[arg-type]
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=rf"^label_dropout must be in \[0, 1\), got {p}\.$"):
            ImageGeneration(label_dropout=p)
    with pytest.raises(ValueError, match=r"^null_label must be an integer label id, got 2\.5\.$"):
        ImageGeneration(null_label=2.5)  # type: ignore[arg-type]
    fresh = ImageGeneration()
    assert (fresh.null_label, fresh.sample_shape) == (-1, None)
    explicit = ImageGeneration(null_label=7)
    assert explicit.null_label == 7
    explicit.bind(Declares(num_classes=4))
    assert explicit.null_label == 7  # given: kept
    fresh.bind(Declares(num_classes=4))
    assert fresh.null_label == 4  # declared by the network: the extra row of num_classes + 1
    undeclared = ImageGeneration()
    undeclared.bind(Declares())
    assert undeclared.null_label == -1


def test_tasks_name_what_they_do_not_offer() -> None:
    """A task without a prediction refuses trainer.predict; a public call a task does not answer names what it
    offers."""

    class Bare(Task):
        def batch_size(self, batch: Any) -> int:
            return 0

        def loss(self, run: Any, batch: Any, sigma: Tensor, generator: torch.Generator) -> Tensor:
            return sigma

    router: Any = None
    with pytest.raises(TypeError, match=r"^Bare has no prediction; trainer\.predict cannot run it\.$"):
        Bare().predict_step(router, None, 0)
    assert str(Bare().unsupported("sample")) == "sample() is not offered by the Bare task (it offers: none)."
    offers = "(it offers: evaluate_batch(), generate())."
    assert str(MaskedLM(3).unsupported("sample")) == f"sample() is not offered by the MaskedLM task {offers}"


@pytest.mark.parametrize("weighting", ["per_sample", "batch_mean", "none"])
def test_bridges_use_the_schedules_sigma_data(weighting: str) -> None:
    """Classification and AR pass the schedule's σ_d to the network and weight by λ(σ) = (σ² + σ_d²)/(σσ_d)²."""
    sigma_data = 0.8
    schedule = NoiseSchedule(sigma_data=sigma_data)
    sigma = torch.tensor([0.01, 0.3, 2.0, 60.0])
    lam = (sigma.double() ** 2 + sigma_data**2) / (sigma.double() * sigma_data) ** 2
    scale = {"per_sample": lam, "batch_mean": lam.mean(), "none": torch.tensor(1.0, dtype=torch.float64)}[weighting]
    n, num_classes, dim = 4, 3, 5
    table = F.normalize(torch.randn(num_classes, dim, generator=gen(0)), dim=-1)
    labels = torch.tensor([2, 0, 1, 1])
    logits = torch.randn(n, num_classes, generator=gen(1)) * 2
    run = Recorder(logits, table)
    task = Classification(num_classes, noise=schedule, weighting=weighting)  # type: ignore[arg-type]
    loss = task.loss(run, (torch.randn(n, 2, generator=gen(2)), labels), sigma, gen(3))
    assert run.calls[0][1]["sigma_data"] == sigma_data
    close(loss, scale * cross_entropy(logits, labels), rtol=1e-5)
    tokens = torch.randint(0, num_classes, (n, 6), generator=gen(4))
    ar_out = torch.randn(n, 6, num_classes, generator=gen(5)) * 2
    run = Recorder(ar_out, table)
    loss = AutoregressiveLM(num_classes, noise=schedule, weighting=weighting).loss(run, tokens, sigma, gen(6))  # type: ignore[arg-type]
    assert run.calls[0][1]["sigma_data"] == sigma_data
    close(loss, scale * cross_entropy(ar_out, tokens).mean(1), rtol=1e-5)


def test_bridges_keep_the_embedding_dtype() -> None:
    """Classification and AR form z = Ê[y] + σε in the embeddings' dtype (bf16 tables give bf16 targets)."""
    table = F.normalize(torch.randn(3, 4, generator=gen(0)), dim=-1).to(torch.bfloat16)
    sigma = torch.tensor([0.1, 1.0])
    run = Recorder(torch.zeros(2, 3), table)
    Classification(3).loss(run, (torch.zeros(2, 2), torch.tensor([0, 2])), sigma, gen(1))
    assert run.calls[0][0][1].dtype == torch.bfloat16
    run = Recorder(torch.zeros(2, 5, 3), table)
    AutoregressiveLM(3).loss(run, torch.randint(0, 3, (2, 5), generator=gen(2)), sigma, gen(3))
    assert run.calls[0][0][1].dtype == torch.bfloat16


def test_prediction_files_follow_the_form_of_the_prediction() -> None:
    """How ``PredictionWriter`` writes a batch of predictions is read from its form (the writer knows no task):
    images as a grid of the largest row length up to 8 that divides the batch, over the data's range; float (N, K)
    as a table with the arg-max; integer (N, L) as token lines; a dict's 1-D tensors as columns; else nothing."""
    task = ImageGeneration()
    for n, rows in ((12, 2), (16, 2), (7, 1), (9, 3), (1, 1), (11, 11)):
        images = torch.rand(n, 1, 4, 4)
        preview = task.prediction_preview(images, None)
        assert preview is not None
        assert preview.images is not None
        assert torch.equal(preview.images, images)
        assert (preview.rows, preview.value_range) == (rows, (-1.0, 1.0))
    task.data_range = [0.0, 255.0]
    assert task.prediction_preview(torch.zeros(2, 3, 4, 4), None).value_range == (0.0, 255.0)
    probabilities = torch.tensor([[0.25, 0.5, 0.25], [0.625, 0.125, 0.25]], dtype=torch.float64)  # exact in fp32
    assert task.prediction_preview(probabilities, None).table == (
        ["row", "argmax", "0", "1", "2"],
        [[0, 1, 0.25, 0.5, 0.25], [1, 0, 0.625, 0.125, 0.25]],
    )
    ids = task.prediction_preview(torch.tensor([[1, 2], [3, 4]]), None)
    assert (ids.tokens, ids.table, ids.images) == ([[1, 2], [3, 4]], None, None)
    metrics = {"nelbo": torch.tensor([1.0, 2.0]), "total": torch.tensor(3.0), "bits": torch.tensor([0.5, 0.25])}
    assert task.prediction_preview(metrics, None).table == (["row", "nelbo", "bits"], [[0, 1.0, 0.5], [1, 2.0, 0.25]])
    for nothing in ("text", {}, {"total": torch.tensor(3.0)}, {"nelbo": [1.0]}, torch.zeros(2, 3, 4),
                    torch.zeros(2, 1, 4, 4, dtype=torch.long), torch.zeros(3)):  # fmt: skip
        assert task.prediction_preview(nothing, None) is None


def test_a_network_declaring_what_another_task_reads_is_refused_naming_the_tasks_that_read_it() -> None:
    """``diffusionblocks_outputs`` other than what the task reads is refused at bind: the message names the tasks
    that read it (else says to pair it with one), and the task's own call when it has one; an empty or non-string
    declaration declares nothing."""
    image_reads = "image-shaped outputs (a denoised image, a velocity or a noise estimate)"
    call = (
        ": ImageGeneration calls the network as forward(x, c_noise, labels=None) (x = c_in·z, c_noise = ¼·ln σ,"
        " labels = class ids)."
    )
    # every task class that reads images, test-defined subclasses included (the suite defines a few)
    readers = sorted({c.__name__ for c in _task_classes() if c.reads == image_reads})
    assert {"DDPM", "FlowMatching", "ImageGeneration"} <= set(readers)
    image_tasks = " or ".join(readers)
    logit_tasks = " or ".join(sorted({c.__name__ for c in _task_classes() if c.reads == "class logits"}))
    assert logit_tasks.startswith("Classification")
    cases = (
        (ImageGeneration(), "class logits",
         f"Declares returns class logits (its `diffusionblocks_outputs`), but the ImageGeneration task reads"
         f" {image_reads} from the network{call} Train it with {logit_tasks}, or give ImageGeneration a network made"
         " for it."),
        (ImageGeneration(), "spectra",
         f"Declares returns spectra (its `diffusionblocks_outputs`), but the ImageGeneration task reads {image_reads}"
         f" from the network{call} Pair it with a task that reads spectra, or give ImageGeneration a network made for"
         " it."),
        (Classification(3), image_reads,
         f"Declares returns {image_reads} (its `diffusionblocks_outputs`), but the Classification task reads class"
         f" logits from the network. Train it with {image_tasks}, or give Classification a network made for it."),
    )  # fmt: skip
    for task, declared, message in cases:
        with pytest.raises(ValueError, match=r"^Declares returns ") as refused:
            task.bind(Declares(diffusionblocks_outputs=declared))
        assert str(refused.value) == message
    for nothing in ("", 3, None):
        ImageGeneration().bind(Declares(diffusionblocks_outputs=nothing))
