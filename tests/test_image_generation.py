"""The ImageGeneration task: the EDM denoiser loss (Eq. 6), dtypes, the clean-image estimate its subclasses
inherit, prediction, and what it refuses. Expected values come from ``tests/reference.py``, never from the package."""

from __future__ import annotations

import re
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.ddpm import DDPMSchedule
from lightning_diffusionblocks.tasks import DDPM, FlowMatching, ImageGeneration
from lightning_diffusionblocks.tasks.flow_matching import EXPECTED_CALL as FLOW_CALL
from lightning_diffusionblocks.tasks.image_generation import EXPECTED_CALL, CallConvention, discover_null_label
from tests.fakes import FakeDenoiser, FakeNet, Recorder, bound, router
from tests.reference import close, coefficient_tensors, gen, linear_alpha_bar, weight


def test_image_generation_loss() -> None:
    """EDM denoiser loss (Eq. 6, L2): F(c_in·z, c_noise), D = c_skip·z + c_out·F, λ(σ)·mean((D − y)²) per sample."""
    n, shape = 7, (1, 2, 3)
    images = torch.rand(n, *shape, generator=gen(0)) * 2 - 1
    sigma = torch.tensor([0.002, 0.02, 0.15, 0.5, 1.3, 9.0, 80.0])
    net_out = torch.randn(n, *shape, generator=gen(1))
    run = Recorder(net_out)
    loss = ImageGeneration(label_dropout=0.0).loss(run, images, sigma, gen(42))
    eps = torch.randn(images.shape, generator=gen(42)).double()  # no labels: the only draw is ε
    c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in coefficient_tensors(sigma))
    z = images.double() + sigma.double().view(-1, 1, 1, 1) * eps
    assert len(run.calls) == 1
    args, _ = run.calls[0]
    close(args[0], c_in * z, rtol=1e-5, atol=1e-7)  # the network sees c_in·z
    close(args[1].view(-1), c_noise.view(-1), rtol=1e-6)  # and c_noise = ¼ ln σ
    denoised = c_skip * z + c_out * net_out.double()
    expected = weight(sigma) * (denoised - images.double()).pow(2).flatten(1).mean(1)
    assert loss.shape == (n,)
    close(loss, expected, rtol=1e-3, atol=0.0)


def test_image_generation_keeps_the_data_dtype() -> None:
    """The network sees c_in·z in the data's dtype (bf16 data stays bf16: z = y + σε is formed in it)."""
    n = 3
    images = (torch.rand(n, 1, 2, 2, generator=gen(0)) * 2 - 1).to(torch.bfloat16)
    run = Recorder(torch.zeros(n, 1, 2, 2))
    ImageGeneration(label_dropout=0.0).loss(run, images, torch.tensor([0.1, 1.0, 10.0]), gen(1))
    assert run.calls[0][0][0].dtype == torch.bfloat16


def test_flow_and_ddpm_denoise_is_the_clean_image_estimate() -> None:
    """The inherited ``denoise``/``guided_denoise`` give x̂₀: flow z − t·v; DDPM (z − √(1−ᾱ)ε̂)/√ᾱ."""
    net = FakeNet(lambda x, t, y: 0.5 * x + 1.0)
    z, level = torch.randn(2, 1, 2, 2, generator=gen(0)), torch.tensor([0.3, 0.8])
    flow = bound(FlowMatching(), net)
    close(flow.guided_denoise(net, z, level, None), z - level.view(-1, 1, 1, 1) * (0.5 * z + 1))
    ddpm = bound(DDPM(DDPMSchedule(num_timesteps=10)), net)
    k = torch.tensor([2.0, 9.0])
    a = torch.tensor([linear_alpha_bar(10)[2], linear_alpha_bar(10)[9]]).view(-1, 1, 1, 1)
    close(ddpm.denoise(net, z, k, None), (z - (1 - a).sqrt() * (0.5 * z + 1)) / a.sqrt(), rtol=1e-4)


def test_image_prediction_samples_one_image_per_label_seeded_by_the_batch_index() -> None:
    """ImageGeneration's predict_step is sample(labels=batch, seed=batch index) for a 1-D label tensor (or a
    1-tuple of one); anything else is refused and described."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    task, router = module.task, module.router()
    task.sample_shape = [1, 2, 2]
    labels = torch.tensor([0, 3, 1])
    expected = task.sample(router, labels=labels, steps=50, seed=4)
    assert not torch.equal(expected, task.sample(router, labels=labels, steps=50, seed=0))
    for batch in (labels, (labels,), [labels]):
        close(task.predict_step(router, batch, 4), expected, rtol=0.0, atol=0.0)
    described = (
        (torch.zeros(3, 1, 2, 2), r"a torch\.float32 tensor of shape \(3, 1, 2, 2\)"),
        (labels.float(), r"a torch\.float32 tensor of shape \(3,\)"),
        ((labels, labels), "a tuple of 2 items"),
        ("abc", "str"),
    )
    for batch, description in described:
        with pytest.raises(
            ValueError,
            match=r"^ImageGeneration's predict_step draws one sample per label, so a predict batch must be a 1-D"
            r" tensor of class ids \(e\.g\. DataLoader\(TensorDataset\(labels\)\)\)\. This batch holds something"
            rf" else \({description}\); images in a predict batch would be ignored, so they are refused\.$",
        ):
            task.predict_step(router, batch, 0)


class NoNoiseLevel(nn.Module):
    """forward(x) only: no slot for the noise level."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class Unconditional(nn.Module):
    """forward(x, c_noise): no labels."""

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        return x


class NoPositional(nn.Module):
    """forward(*, x): no positional slot for the noisy input."""

    def forward(self, *, x: Tensor) -> Tensor:
        return x


class NeedsMore(nn.Module):
    """forward(x, c_noise, labels, scale): a fourth argument without a default."""

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor, scale: float) -> Tensor:
        return x


def test_image_generation_refuses_what_it_cannot_train_or_sample() -> None:
    """ImageGeneration's batches are `images` or `(images, labels)`; sample() needs labels or a count, labels only for
    a conditional network, labels for guidance, a known shape and, for clip=True, a seen data range; a network
    without a noise-level slot is refused quoting the task's own call (FlowMatching's for FlowMatching)."""
    task = ImageGeneration()
    images = torch.zeros(5, 1, 2, 2)
    assert task.batch_size(images) == task.batch_size((images, torch.zeros(5, dtype=torch.long))) == 5
    for batch, shown in (((images, images, images), "tuple of length 3"), (3.5, r"float of length \?")):
        with pytest.raises(
            ValueError, match=rf"^ImageGeneration expects batches of `images` or `\(images, labels\)`, got {shown}\.$"
        ):
            task.split(batch)
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), task, num_blocks=3)
    router = module.router()
    labels, count, shape = task.sampling_inputs(router, [1, 2], None, 1.0, (1, 2, 2))
    assert labels is not None
    assert (labels.dtype, labels.tolist(), count, list(shape)) == (torch.long, [1, 2], 2, [1, 2, 2])
    int32 = task.sampling_inputs(router, torch.tensor([3, 0], dtype=torch.int32), None, 1.0, (1, 2, 2))[0]
    assert int32 is not None
    assert int32.dtype == torch.long
    refusals = (
        (([1, 2], None, 1.0, None), r"The sample shape is unknown: the network has no `channels`/`image_size`-style"
         r" attributes and no training batch was seen\. Pass shape=\(C, H, W\)\."),
        ((None, None, 1.0, (1, 2, 2)), r"Pass `labels` or `num_samples` to sample\(\)\."),
        ((None, 3, 2.0, (1, 2, 2)), r"Classifier-free guidance needs `labels`; pass labels or guidance=1\.0\."),
    )  # fmt: skip
    for arguments, message in refusals:
        with pytest.raises(ValueError, match=rf"^{message}$"):
            task.sampling_inputs(router, *arguments)
    unconditional = ImageGeneration()
    unconditional.bind(Unconditional())
    with pytest.raises(
        ValueError, match=r"^The network takes no labels; call sample\(num_samples=\.\.\.\) without labels\.$"
    ):
        unconditional.sampling_inputs(router, [1], None, 1.0, (1, 2, 2))
    x = torch.linspace(-2.0, 2.0, 9)
    assert task._clip(x, False) is x
    with pytest.raises(
        ValueError,
        match=r"^clip=True clamps to the training data's range, but none was seen; pass clip=\(lo, hi\)$",
    ):
        task._clip(x, True)
    task.data_range = [-0.5, 1.0]
    close(task._clip(x, True), x.clamp(-0.5, 1.0), rtol=0.0, atol=0.0)
    close(task._clip(x, (-1.0, 0.25)), x.clamp(-1.0, 0.25), rtol=0.0, atol=0.0)
    for refusing, call in ((ImageGeneration(), EXPECTED_CALL), (FlowMatching(), FLOW_CALL)):
        with pytest.raises(ValueError, match=rf"takes no noise level\. {re.escape(call)}; the noise level and the"):
            refusing.bind(NoNoiseLevel())
    refused = (
        (NoPositional, r"takes no positional input for the noisy image"),
        (NeedsMore, r"requires further arguments \['scale'\]"),
    )
    for network, why in refused:
        with pytest.raises(
            ValueError,
            match=rf"^{network.__name__}\.forward\(.* {why}\. {re.escape(EXPECTED_CALL)}; the noise level and the"
            r" labels may also be keyword-only arguments\.$",
        ):
            ImageGeneration().bind(network())


def test_binned_losses_draw_the_levels_of_each_bin_and_noise_fixed_by_the_batch_index() -> None:
    """Each bin's loss is Eq. 6 at levels drawn in that bin (a one-level bin: exactly that σ), with ε from the
    generator of ``batch_idx`` (10 007 + batch_idx), so every validation sees the same noise."""
    images = torch.rand(4, 1, 2, 2, generator=gen(0)) * 2 - 1
    net = FakeNet(lambda x, t, y: 0.5 * x)
    task = bound(ImageGeneration(label_dropout=0.0), net)
    bins = [("low", 0.3, 0.3 + 1e-9), ("high", 7.0, 7.0 + 1e-9)]  # each bin holds one level (to float precision)
    got = task.binned_losses(router(net, task.noise), images, 3, bins)
    eps = torch.randn(images.shape, generator=gen(10_010)).double()
    for name, sigma_value, _ in bins:
        sigma = torch.full((4,), sigma_value, dtype=torch.float64)
        c_skip, c_out, c_in, _ = (c.view(-1, 1, 1, 1) for c in coefficient_tensors(sigma))
        z = images.double() + sigma.view(-1, 1, 1, 1) * eps
        denoised = c_skip * z + c_out * 0.5 * c_in * z
        expected = (weight(sigma) * (denoised - images.double()).pow(2).flatten(1).mean(1)).mean()
        close(got[name].double().view(1), expected.view(1), rtol=1e-4, atol=0.0)


def test_task_state_round_trips_and_an_empty_state_keeps_what_was_seen() -> None:
    """state() is plain data naming the sample shape and the data range; load_state restores them, and a state
    without them keeps the task's own."""
    seen = ImageGeneration()
    seen.sample_shape, seen.data_range = [1, 2, 2], (-1.0, 1.0)
    assert seen.state() == {"sample_shape": [1, 2, 2], "data_range": (-1.0, 1.0)}
    fresh = ImageGeneration()
    fresh.load_state(seen.state())
    assert (fresh.sample_shape, fresh.data_range) == ([1, 2, 2], (-1.0, 1.0))
    fresh.load_state({"sample_shape": None, "data_range": None})
    assert (fresh.sample_shape, fresh.data_range) == ([1, 2, 2], (-1.0, 1.0))


def test_dict_batches_are_checked_like_label_batches() -> None:
    """A dict batch's labels are checked against the network's label embedding (ids 0..rows-1, the null id
    refused), its conditioning rows against the images; a network without labels ignores the batch's labels."""
    net = FakeNet(lambda x, t, y: x, num_classes=10)
    net.label_embedding = nn.Embedding(11, 2)  # 11 rows: 10 classes and the null label (10)
    task = bound(ImageGeneration(), net)
    images = torch.zeros(2, 1, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"^ImageGeneration got label 11, but the network's label embedding has 11 rows \(ids 0\.\.10\)\. Build"
        r" the network for the data set's number of classes\.$",
    ):
        task.observe({"images": images, "labels": torch.tensor([0, 11]), "extra": torch.zeros(2, 3)})
    with pytest.raises(
        ValueError, match=r"^The training labels include 10, the id ImageGeneration feeds for 'no label'"
    ):
        task.observe({"images": images, "labels": torch.tensor([10, 1]), "extra": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match=r"The conditioning `extra` in the training batch has shape \(3, 3\)"):
        task.observe({"images": images, "labels": torch.tensor([0, 1]), "extra": torch.zeros(3, 3)})
    task.observe({"images": images, "labels": torch.tensor([0, 9]), "extra": torch.zeros(2, 3)})
    assert task.sample_shape == [1, 2, 2]


def test_predict_step_samples_a_dict_batch_of_conditioning_seeded_by_the_batch_index() -> None:
    """A dict batch without images is conditioning: one sample per row, seeded by the batch index, equal to
    sample(conditioning=batch, seed=batch_idx)."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    module.task.sample_shape = [1, 2, 2]
    batch = {"labels": torch.tensor([1, 2, 0]), "extra": torch.zeros(3, 5)}
    got = module.predict_step(batch, 5)
    assert net.calls[-1]["labels"].tolist() == [1, 2, 0]
    assert torch.equal(got, module.sample(conditioning=batch, seed=5))
    assert not torch.equal(got, module.sample(conditioning=batch, seed=6))
    with pytest.raises(ValueError, match="predict batch must be a 1-D tensor of class ids"):
        module.predict_step({"images": torch.zeros(3, 1, 2, 2), "labels": torch.tensor([1, 2, 0])}, 0)


def test_guided_sampling_with_conditioning_pairs_each_row_with_its_null() -> None:
    """Guidance with a conditioning dict runs each row conditioned and with its null (null label, zeroed values)."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    null = module.task.null_label
    module.sample(conditioning={"extra": torch.ones(3, 5), "labels": torch.tensor([1, 2, 0])}, guidance=2.0,
                  steps=1, seed=0, shape=(1, 2, 2))  # fmt: skip
    assert sorted(net.calls[-1]["labels"].tolist()) == sorted([1, 2, 0, null, null, null])


class Unlabelled(FakeDenoiser):
    """FakeDenoiser that declares it takes no class labels."""

    diffusionblocks_takes_labels = False


def test_image_preview_draws_one_row_per_class_of_the_batch() -> None:
    """One row of ``per_row`` samples per class in the batch (sorted, the null label left out, at most ``max_rows``),
    each drawn by sample() with the preview's steps, guidance and seed, shown over the data's range."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    task, null = module.task, module.task.null_label
    task.sample_shape, task.data_range = [1, 2, 2], [-0.5, 2.0]
    batch = (torch.zeros(7, 1, 2, 2), torch.tensor([3, 1, null, 3, 0, 2, null]))
    with module.evaluating() as router:
        preview = task.preview(router, batch, per_row=2, max_rows=3, steps=3, guidance=2.0, seed=5)
        want = task.sample(router, labels=torch.tensor([0, 0, 1, 1, 2, 2]), steps=3, guidance=2.0, seed=5)
    assert preview.images is not None
    assert torch.equal(preview.images, want)
    assert (preview.rows, preview.value_range) == (3, (-0.5, 2.0))
    assert preview.caption == "ImageGeneration: one row per class (0, 1, 2), guidance 2.0, 3 sampling steps"
    assert (preview.tokens, preview.text, preview.table, preview.scalars) == (None, None, None, {})


def test_image_preview_defaults_are_eight_a_row_ten_rows_32_steps_unguided_seed_0() -> None:
    module = ldb.DiffusionBlocksModule(FakeDenoiser(num_classes=12), ImageGeneration(), num_blocks=3)
    task = module.task
    task.sample_shape = [1, 2, 2]
    batch = (torch.zeros(12, 1, 2, 2), torch.arange(11, -1, -1))
    with module.evaluating() as router:
        preview = task.preview(router, batch)
        want = task.sample(router, labels=torch.arange(10).repeat_interleave(8), steps=32, guidance=1.0, seed=0)
    assert preview.images is not None
    assert torch.equal(preview.images, want)
    assert (preview.rows, preview.value_range) == (10, (-1.0, 1.0))  # no data seen: the range images are scaled to
    classes = ", ".join(map(str, range(10)))
    assert preview.caption == f"ImageGeneration: one row per class ({classes}), guidance 1.0, 32 sampling steps"


@pytest.mark.parametrize("case", ["images only", "only null labels", "network takes no labels"])
def test_image_preview_without_classes_draws_max_rows_of_unconditional_samples(case: str) -> None:
    module = ldb.DiffusionBlocksModule(Unlabelled() if case.startswith("network") else FakeDenoiser(),
                                       ImageGeneration(), num_blocks=3)  # fmt: skip
    task = module.task
    task.sample_shape, task.data_range = [1, 2, 2], [0.0, 1.0]
    images = torch.zeros(4, 1, 2, 2)
    labels = torch.full((4,), task.null_label) if case == "only null labels" else torch.tensor([0, 1, 1, 2])
    with module.evaluating() as router:
        preview = task.preview(router, images if case == "images only" else (images, labels), per_row=3, max_rows=2,
                               steps=4, guidance=3.0, seed=1)  # fmt: skip
        want = task.sample(router, num_samples=6, steps=4, seed=1)
    assert preview.images is not None
    assert torch.equal(preview.images, want)
    assert (preview.rows, preview.value_range) == (2, (0.0, 1.0))
    assert preview.caption == "ImageGeneration: unconditional samples, 4 sampling steps"


def test_a_network_that_declares_it_takes_no_labels_gets_none_whatever_its_signature() -> None:
    """``diffusionblocks_takes_labels = False`` holds for a ``forward(x, c_noise, *args, **kwargs)`` too (0.3.0 read
    it only from signatures it could parse slot by slot, and passed such a network labels)."""
    assert CallConvention.of(FakeDenoiser()).takes_labels
    assert not CallConvention.of(Unlabelled()).takes_labels
    odd = FakeDenoiser()
    odd.diffusionblocks_takes_labels = "no"  # not a bool: ignored
    assert CallConvention.of(odd).takes_labels
    module = ldb.DiffusionBlocksModule(Unlabelled(), ImageGeneration(), num_blocks=3)
    module.sample(num_samples=2, steps=1, shape=(1, 2, 2))
    assert module.network.net.calls[-1]["labels"] is None


def test_training_batches_it_would_misread_are_refused_with_the_conversion_to_make() -> None:
    """Integer images, labels that are not one integer id per image (floats, booleans, one-hot or other 2-D rows)
    and a label count other than the image count: each refused with its own exact message."""
    task = DDPM()  # the messages name the task that refuses
    images = torch.zeros(3, 1, 2, 2)
    with pytest.raises(
        ValueError,
        match=r"^DDPM got torch\.uint8 images \(pixel values such as 0–255\), but it denoises float images scaled to"
        r" about \[-1, 1\]\. Convert them in the data pipeline: images\.float\(\) / 127\.5 - 1 \(or torchvision's"
        r" ToTensor\(\) then Normalize\(0\.5, 0\.5\)\)\.$",
    ):
        task.observe(images.to(torch.uint8))
    one_hot = r"For one-hot labels pass labels\.argmax\(-1\)\."
    column = r"For a column of class ids pass labels\.squeeze\(1\)"
    to_long, per_image = r"Convert them with labels\.long\(\)\.", r"Pass one class id per image\."
    refusals = (
        (torch.zeros(3, 4), r"torch\.float32 of shape \(3, 4\)\. " + one_hot),
        (torch.zeros(3), r"torch\.float32 of shape \(3,\)\. " + to_long),
        (torch.zeros(3, dtype=torch.bool), r"torch\.bool of shape \(3,\)\. " + to_long),
        (torch.zeros(3, 4, dtype=torch.bool), r"torch\.bool of shape \(3, 4\)\. " + one_hot),
        (torch.zeros(3, 1, dtype=torch.long), r"torch\.int64 of shape \(3, 1\)\. " + column + r"\."),
        (torch.zeros(3, 1), r"torch\.float32 of shape \(3, 1\)\. " + column + r"\.long\(\)\."),
        (torch.zeros(2, 3, dtype=torch.long), r"torch\.int64 of shape \(2, 3\)\. " + per_image),
        (torch.zeros(3, 2, 2, dtype=torch.long), r"torch\.int64 of shape \(3, 2, 2\)\. " + per_image),
        (torch.zeros(2, 3), r"torch\.float32 of shape \(2, 3\)\. " + to_long),
    )
    for labels, rest in refusals:
        with pytest.raises(ValueError, match=r"^DDPM expects labels as a 1-D integer tensor of class ids, one per"
                           r" image; got " + rest + "$"):  # fmt: skip
            task.observe((images, labels))
    with pytest.raises(
        ValueError,
        match=r"^DDPM got 2 labels for 3 images; a batch is \(images, labels\) with one class id per image\.$",
    ):
        task.observe((images, torch.tensor([0, 1])))
    with pytest.raises(
        ValueError,
        match=r"^DDPM got a dict batch with keys \['labels', 'x'\] but no 'images': a dict batch is \{'images': x,"
        r" 'labels': y \(optional\), <network keyword>: <one row per sample>, \.\.\.\}\.$",
    ):
        task.observe({"x": images, "labels": torch.tensor([0, 1, 2])})


def test_observing_batches_keeps_their_union_range_and_warns_once_about_unscaled_images() -> None:
    """The data range is the union over every batch seen; images beyond ±20 (0–255 pixels as floats) warn once, with
    the scaling to apply; exactly ±20 does not warn."""
    task = ImageGeneration()
    task.observe(torch.full((2, 1, 2, 2), -20.0))
    assert task.data_range == [-20.0, -20.0]
    task.observe(torch.full((2, 1, 2, 2), 20.0))
    assert task.data_range == [-20.0, 20.0]
    unscaled = torch.tensor([0.0, 255.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    message = (
        r"^Training images range over \[0, 255\], but ImageGeneration expects images scaled to about \[-1, 1\] \(its"
        r" noise levels and loss weights assume it\)\. Scale them in the data pipeline, e\.g\. images / 127\.5 - 1"
        r" for 0–255 pixels\.$"
    )
    with pytest.warns(UserWarning, match=message):
        task.observe(unscaled)
    assert task.data_range == [-20.0, 255.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task.observe(unscaled + 1)  # warned once already
    assert task.data_range == [-20.0, 256.0]
    fresh = ImageGeneration()
    fresh.observe(torch.full((1, 1, 2, 2), 0.5))
    fresh.observe(torch.full((1, 1, 2, 2), -0.25))
    assert fresh.data_range == [-0.25, 0.5]


def test_dict_batches_split_into_images_and_the_networks_conditioning() -> None:
    """'images' are the images; 'labels' are labels, never conditioning; other keys are conditioning (only the
    ``conditioning_keys`` when given). A dict of images and labels alone is a labelled batch."""
    images, labels, h, other = torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]), torch.ones(2, 3), torch.ones(2)
    task = ImageGeneration()
    assert task.split({"images": images})[1] is None
    got_images, got_labels = task.split({"images": images, "labels": labels})
    assert got_images is images
    assert got_labels is labels
    cond = task.split({"images": images, "labels": labels, "h": h, "other": other})[1]
    assert cond.labels is labels
    assert list(cond.values) == ["h", "other"]
    keyed = ImageGeneration(conditioning_keys=["h"]).split({"images": images, "labels": labels, "h": h, "other": other})
    assert keyed[1].labels is labels
    assert list(keyed[1].values) == ["h"]
    assert ImageGeneration(conditioning_keys=["h"]).split({"images": images, "other": other})[1] is None


def test_the_null_label_is_discovered_from_what_the_network_declares() -> None:
    """``discover_null_label``: the network's ``num_classes`` (the extra row of its embedding), or None."""
    assert discover_null_label(FakeDenoiser(num_classes=6)) == 6
    assert discover_null_label(nn.Linear(2, 2)) is None


def test_where_the_null_label_comes_from_is_said_in_words() -> None:
    """find_null_label: the network's own ``null_label`` or ``num_classes`` (positive), then a label-named submodule's,
    then the last row of a label embedding; each with the words the refusals quote."""
    from lightning_diffusionblocks.tasks.image_generation import find_null_label

    class Net(nn.Module):
        def __init__(self, **declared: Any) -> None:
            super().__init__()
            for name, value in declared.items():
                setattr(self, name, value)

    assert find_null_label(Net(null_label=0)) == (0, "declared as the network's null_label")
    assert find_null_label(Net(num_classes=1)) == (1, "the extra row after the network's num_classes=1")
    assert find_null_label(Net(num_classes=0, null_label=None)) == (None, "none declared")
    inner = Net(label_head=Net(num_classes=5), other=Net(num_classes=9))
    assert find_null_label(inner) == (5, "the extra row after `label_head.`num_classes=5")
    assert find_null_label(Net(class_table=Net(null_label=2))) == (2, "declared as `class_table.`null_label")
    table = Net(y_embedder=nn.Embedding(7, 2))
    assert find_null_label(table) == (
        6,
        "guessed as the last row of the label embedding `y_embedder` (Embedding(7, ...)), as the network declares no"
        " `num_classes` or `null_label`",
    )
    assert ImageGeneration().null_label_origin == "none declared"
    assert ImageGeneration(null_label=3).null_label_origin == "given as null_label=3"


def test_binding_reads_the_networks_declarations_and_refuses_a_null_label_beyond_its_embedding() -> None:
    """bind hands a network that maps noise levels itself (``diffusionblocks_noise_input``) the task's convention,
    and refuses a declared null label its label embedding has no row for, saying exactly why; a label equal to the
    embedding's row count is refused when sampling."""
    seen: list[Any] = []
    net = FakeDenoiser(num_classes=4)
    net.diffusionblocks_noise_input = seen.append
    task = ImageGeneration(label_dropout=0.1)
    task.bind(net)
    assert seen == [task.noise_input()]
    net = FakeDenoiser(num_classes=4)
    net.label_table = nn.Embedding(4, 2)  # no row for the null label 4
    with pytest.raises(ValueError) as refused:  # noqa: PT011 - the whole message is compared below
        DDPM(label_dropout=0.1).bind(net)
    assert str(refused.value) == (
        "DDPM feeds label 4 for 'no label' (the extra row after the network's num_classes=4): a share"
        " label_dropout=0.1 of training labels and every unguided sample get it. But the label embedding `label_table`"
        " has 4 rows (ids 0..3), so that id would fail with an IndexError. Give the network a row for 'no label'"
        " (nn.Embedding(num_classes + 1, dim)), or tell the task which id the network reads as 'no label':"
        " DDPM(null_label=<id>)."
    )
    net.label_table = nn.Embedding(5, 2)
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    with pytest.raises(ValueError, match=r"^sample\(\) got labels \[5\] beyond"):
        module.sample(labels=[5], steps=1, shape=(1, 2, 2))
    with pytest.raises(
        ValueError,
        match=r"^conditioning_keys must be a list of dict-batch keys, got 'h'; e\.g\. conditioning_keys=\["
        r"'encoder_hidden_states', 'pooled_projections'\]\.$",
    ):
        ImageGeneration(conditioning_keys="h")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"got \['h', 3\]"):
        ImageGeneration(conditioning_keys=["h", 3])  # type: ignore[list-item]


def test_a_training_label_equal_to_the_null_label_is_refused_with_the_whole_reason() -> None:
    task = ImageGeneration()
    task.bind(FakeDenoiser(num_classes=4))
    with pytest.raises(ValueError) as refused:  # noqa: PT011 - the whole message is compared below
        task.observe((torch.zeros(2, 1, 2, 2), torch.tensor([4, 1])))
    assert str(refused.value) == (
        "The training labels include 4, the id ImageGeneration feeds for 'no label' (classifier-free guidance; the"
        " extra row after the network's num_classes=4). That class would be treated as 'no label': its images"
        " unconditional and unguided samples of that class. Give the network a row for 'no label'"
        " (nn.Embedding(num_classes + 1, dim) and a `num_classes` attribute), or tell the task which id no class"
        " uses: ImageGeneration(null_label=<id>)."
    )
