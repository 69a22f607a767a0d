"""Class conditioning of image tasks: labels reach the network, label dropout to the null label (App. E.2), the
null label for unlabelled samples, and how the noise level and labels are passed to a network's forward."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import lightning_diffusionblocks as ldb
from lightning_diffusionblocks.conditioning import Conditioning
from lightning_diffusionblocks.tasks import ImageGeneration
from lightning_diffusionblocks.tasks.image_generation import CallConvention
from tests.fakes import FACTORS, FakeDenoiser, Recorder, Scale, labels_in_call
from tests.reference import close, coefficient_tensors, gen


def test_image_generation_label_dropout_uses_the_null_label() -> None:
    """CFG training (App. E.2): a share p of labels is replaced by the null label, the rest left unchanged."""
    n, p, num_classes = 4000, 0.3, 10
    labels = torch.arange(n) % num_classes
    task = ImageGeneration(label_dropout=p)
    run = Recorder(torch.zeros(n, 1, 1, 1))
    task.loss(run, (torch.zeros(n, 1, 1, 1), labels), torch.ones(n), gen(0))
    seen = labels_in_call(*run.calls[0])
    assert seen is not None
    dropped = seen != labels
    frac = float(dropped.float().mean())
    assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / n)
    nulls = seen[dropped].unique().tolist()
    assert len(nulls) == 1  # one null label
    documented = getattr(task, "null_label", None)
    assert nulls[0] == documented if documented is not None else not 0 <= nulls[0] < num_classes


def test_label_dropout_keeps_a_label_whose_draw_equals_p() -> None:
    """CFG training, exactly: a label becomes the null label iff its uniform draw u < p (Bernoulli(p) by inverse
    CDF, P(dropped) = p), so a label whose draw equals p is kept."""
    n = 64
    labels = torch.arange(n) % 4
    u = torch.rand(n, generator=gen(2))  # the dropout draws: the generator's first
    p = float(u[10])
    task = ImageGeneration(label_dropout=p)
    run = Recorder(torch.zeros(n, 1, 1, 1))
    task.loss(run, (torch.zeros(n, 1, 1, 1), labels), torch.ones(n), gen(2))
    seen = labels_in_call(*run.calls[0])
    assert seen is not None
    assert torch.equal(seen, torch.where(u < p, torch.full_like(labels, task.null_label), labels))
    assert int(seen[10]) == int(labels[10])
    assert 0 < int((seen != labels).sum()) < n


def test_image_generation_without_label_dropout_keeps_labels_and_draws_only_eps() -> None:
    """label_dropout = 0: labels reach the network unchanged and ε is the generator's first draw."""
    n, shape = 5, (1, 2, 2)
    images = torch.rand(n, *shape, generator=gen(0)) * 2 - 1
    labels = torch.tensor([3, 0, 1, 2, 1])
    sigma = torch.tensor([0.01, 0.2, 1.0, 5.0, 40.0])
    run = Recorder(torch.zeros(n, *shape))
    ImageGeneration(label_dropout=0.0).loss(run, (images, labels), sigma, gen(42))
    args, kwargs = run.calls[0]
    seen = labels_in_call(args, kwargs)
    assert seen is not None
    assert torch.equal(seen, labels)
    eps = torch.randn(images.shape, generator=gen(42)).double()
    c_in = coefficient_tensors(sigma)[2].view(-1, 1, 1, 1)
    close(args[0], c_in * (images.double() + sigma.double().view(-1, 1, 1, 1) * eps), rtol=1e-5, atol=1e-7)


def test_unlabelled_sampling_of_a_conditional_network_feeds_the_null_label() -> None:
    """sample(num_samples=n) on a class-conditional network conditions every call on the null label."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    module.sample(num_samples=3, steps=2, seed=0, shape=(1, 2, 2))
    assert len(net.calls) == 2
    for call in net.calls:
        assert call["labels"] is not None
        assert call["labels"].tolist() == [module.task.null_label] * 3
        assert not 0 <= module.task.null_label < net.num_classes


def test_call_convention_passes_the_noise_level_and_labels() -> None:
    """CallConvention.call passes the network input, then c_noise and the labels positionally or by the keywords the
    network's forward names; a network without labels gets none, and labelled batches are refused for it."""
    x, c_noise, labels = torch.zeros(2, 1), torch.ones(2), torch.tensor([1, 0])
    run = Recorder(torch.zeros(2, 1))
    CallConvention(takes_labels=False).call(run, x, c_noise, None)
    CallConvention("sigma", "y").call(run, x, c_noise, labels)
    (plain, plain_kw), (keyed, keyed_kw) = run.calls
    assert (len(plain), plain_kw, len(keyed), sorted(keyed_kw)) == (2, {}, 1, ["sigma", "y"])
    assert keyed_kw["sigma"] is c_noise
    assert keyed_kw["y"] is labels
    with pytest.raises(
        ValueError,
        match=r"^The batches carry labels but the network's forward takes none; use an unconditional data set or give"
        r" the network a labels argument \(forward\(x, c_noise, labels=None\)\)\.$",
    ):
        CallConvention(takes_labels=False).call(run, x, c_noise, labels)


class TextDenoiser(nn.Module):
    """F(x, c_noise, encoder_hidden_states) = s_g·x + mean of the states: keyword conditioning, no class labels."""

    diffusionblocks_takes_labels = False

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Scale(f) for f in FACTORS)
        self.calls: list[dict[str, Any]] = []

    def forward(
        self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, *, encoder_hidden_states: Tensor | None = None
    ) -> Tensor:
        assert labels is None
        assert encoder_hidden_states is not None
        self.calls.append({"x": x.clone(), "states": encoder_hidden_states.clone()})
        h = x
        for block in self.blocks:
            h = block(h)
        return h + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_sampling_with_keyword_conditioning_gives_each_call_the_rows_given() -> None:
    """sample(conditioning={...}) draws one sample per row, passes the values by name at every step (never
    'images'), and a network without labels gets none."""
    net = TextDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    states = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    out = module.sample(conditioning={"encoder_hidden_states": states, "images": torch.ones(9)}, steps=2, seed=0,
                        shape=(1, 2, 2))  # fmt: skip
    assert out.shape == (3, 1, 2, 2)
    assert len(net.calls) == 2
    for call in net.calls:
        assert torch.equal(call["states"], states)
        assert call["x"].shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match=r"Pass shape=\(C, H, W\)"):
        module.sample(conditioning={"encoder_hidden_states": states}, steps=2)  # the shape is needed when unknown


def test_sampling_conditioning_labels_come_from_the_dict_unless_given() -> None:
    """A class-conditional network gets the dict's 'labels', the explicit ``labels`` when both are given, and the
    null label (as long integers) when neither is; every other key reaches it by name."""
    net = FakeDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    extra = torch.zeros(3, 5)
    module.sample(conditioning={"extra": extra, "labels": torch.tensor([1, 2, 0])}, steps=1, seed=0, shape=(1, 2, 2))
    assert net.calls[-1]["labels"].tolist() == [1, 2, 0]
    module.sample(labels=[3, 3, 3], conditioning={"extra": extra, "labels": [1, 2, 0]}, steps=1, seed=0,
                  shape=(1, 2, 2))  # fmt: skip
    assert net.calls[-1]["labels"].tolist() == [3, 3, 3]
    module.sample(conditioning={"extra": extra}, steps=1, seed=0, shape=(1, 2, 2))
    null = net.calls[-1]["labels"]
    assert null.dtype == torch.long
    assert null.tolist() == [module.task.null_label] * 3
    module.sample(labels=[1, 0], conditioning={"extra": torch.zeros(2, 5)}, num_samples=2, steps=1, seed=0,
                  shape=(1, 2, 2))  # fmt: skip
    assert net.calls[-1]["labels"].tolist() == [1, 0]


def test_sampling_conditioning_is_refused_when_it_cannot_be_served() -> None:
    """Not a dict, an empty dict, a num_samples other than the rows, and rows that disagree are each refused."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    shape = (1, 2, 2)
    expected = (
        r"^conditioning must be a dict of the network's keyword conditioning, one row per sample, e\.g\. sample\("
        r"conditioning=\{'encoder_hidden_states': h, 'pooled_projections': p\}, guidance=4\.0\)\.$"
    )
    for bad in ({}, [torch.zeros(2)]):
        with pytest.raises(TypeError, match=expected):
            module.sample(conditioning=bad, steps=1, shape=shape)
    with pytest.raises(
        ValueError,
        match=r"^sample\(\) draws one sample per row of `conditioning` \(3 rows\) but got num_samples=2; leave"
        r" num_samples out or give that many rows\.$",
    ):
        module.sample(conditioning={"extra": torch.zeros(3, 5)}, num_samples=2, steps=1, shape=shape)
    with pytest.raises(ValueError, match=r"num_samples"):
        module.sample(conditioning={"extra": torch.zeros(3, 5)}, num_samples=0, steps=1, shape=shape)
    with pytest.raises(
        ValueError, match=r"The conditioning `extra` in sample\(conditioning=\.\.\.\) has shape \(3, 5\)"
    ):
        module.sample(labels=[1, 0], conditioning={"extra": torch.zeros(3, 5)}, steps=1, shape=shape)


class LabelledTextDenoiser(TextDenoiser):
    """TextDenoiser that also takes class labels by name."""

    diffusionblocks_takes_labels = True

    def forward(
        self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None, *, encoder_hidden_states: Tensor | None = None
    ) -> Tensor:
        assert labels is not None
        self.calls.append({"labels": labels.clone()})
        return super().forward(x, c_noise, encoder_hidden_states=encoder_hidden_states)


def test_sampling_conditioning_labels_reach_the_labels_argument_only() -> None:
    """A conditioning dict's 'labels' go to the network's labels argument, never as a keyword value as well."""
    net = LabelledTextDenoiser()
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    states = torch.zeros(3, 2, 4)
    module.sample(conditioning={"encoder_hidden_states": states, "labels": torch.tensor([1, 2, 0])}, steps=1, seed=0,
                  shape=(1, 2, 2))  # fmt: skip
    assert net.calls[0]["labels"].tolist() == [1, 2, 0]


def test_sampling_label_refusals_say_exactly_what_to_pass() -> None:
    """Float, boolean and one-hot labels are refused (the argmax hint only for 2-D rows); a column of ids (N, 1) is
    read as N labels; num_samples is named in its own message."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    shape = (1, 2, 2)
    with pytest.raises(TypeError, match=r"labels must be integer class ids[^\n]*torch\.float32[^\n]*\.$") as flat:
        module.sample(labels=torch.tensor([1.0, 2.0]), steps=1, shape=shape)
    assert "argmax" not in str(flat.value)
    with pytest.raises(TypeError, match=r"\(3, 3\)\. For one-hot rows pass labels\.argmax\(-1\)\. E\.g\. sample\("):
        module.sample(labels=torch.eye(3), steps=1, shape=shape)
    with pytest.raises(TypeError, match=r"labels must be integer class ids[^\n]*torch\.bool"):
        module.sample(labels=torch.tensor([True, False]), steps=1, shape=shape)
    out = module.sample(labels=torch.tensor([[1], [2], [0]]), steps=1, seed=0, shape=shape)
    assert out.shape[0] == 3
    with pytest.raises(ValueError, match=r"^num_samples must be >= 1, got 0"):
        module.sample(conditioning={"extra": torch.zeros(3, 5)}, num_samples=0, steps=1, shape=shape)


def test_sampling_label_messages_are_exact() -> None:
    """Each label refusal's whole message, so its advice cannot drift: float ids, integer rows, no ids, and ids
    that disagree with num_samples."""
    module = ldb.DiffusionBlocksModule(FakeDenoiser(), ImageGeneration(), num_blocks=3)
    shape = (1, 2, 2)
    cases = [
        ({"labels": torch.tensor([1.0, 2.0])}, TypeError,
         "labels must be integer class ids (one per sample), got a torch.float32 tensor of shape (2,). E.g."
         " sample(labels=torch.tensor([0, 1, 2]))."),
        ({"labels": torch.tensor([[0, 1, 2], [1, 0, 0]])}, ValueError,
         "labels must be a 1-D tensor of class ids, got shape (2, 3); for one-hot rows pass labels.argmax(-1)."),
        ({"labels": torch.tensor([], dtype=torch.long)}, ValueError,
         "labels is empty; pass at least one class id, or num_samples=N for unconditional samples."),
        ({"labels": [1, 2], "num_samples": 3}, ValueError,
         "sample() draws one sample per label, but got 2 labels and num_samples=3. Pass 3 labels (e.g."
         " labels.repeat_interleave(k) for k samples of each) or leave out num_samples."),
    ]  # fmt: skip
    for kwargs, error, message in cases:
        with pytest.raises(error) as refused:
            module.sample(steps=1, shape=shape, **kwargs)
        assert str(refused.value) == message


@pytest.mark.parametrize("net", [TextDenoiser, LabelledTextDenoiser])
def test_image_preview_of_a_conditioned_batch_draws_one_row_per_conditioning_row(net: type[TextDenoiser]) -> None:
    """A dict batch with keyword conditioning previews its first ``max_rows`` rows, each repeated ``per_row`` times
    (their labels too, for a network that takes labels), by sample() with the preview's steps, guidance and seed."""
    module = ldb.DiffusionBlocksModule(net(), ImageGeneration(), num_blocks=3)
    task = module.task
    task.sample_shape, task.data_range = [1, 2, 2], [-2.0, 0.5]
    states = torch.arange(5 * 2 * 4, dtype=torch.float32).view(5, 2, 4)
    labels = torch.tensor([1, 2, 0, 3, 1])
    batch = {"images": torch.zeros(5, 1, 2, 2), "labels": labels, "encoder_hidden_states": states}
    with module.evaluating() as router:
        for max_rows, rows in ((2, 2), (7, 5)):
            preview = task.preview(router, batch, per_row=3, max_rows=max_rows, steps=2, guidance=1.5, seed=4)
            want = task.sample(
                router, labels=labels[:rows].repeat_interleave(3) if net is LabelledTextDenoiser else None,
                conditioning={"encoder_hidden_states": states[:rows].repeat_interleave(3, dim=0)}, steps=2,
                guidance=1.5, seed=4,
            )  # fmt: skip
            assert preview.images is not None
            assert torch.equal(preview.images, want)
            if net is LabelledTextDenoiser:  # the rows' own labels reach the network, not only the null one
                seen = {int(v) for call in module.network.net.calls if "labels" in call for v in call["labels"]}
                assert set(labels[:rows].tolist()) <= seen
            assert (preview.rows, preview.value_range) == (rows, (-2.0, 0.5))
            caption = "ImageGeneration: one row per conditioning of the batch, guidance 1.5, 2 sampling steps"
            assert preview.caption == caption
        task.data_range = None
        assert task.preview(router, batch, per_row=1, max_rows=1, steps=1).value_range == (-1.0, 1.0)


def test_call_convention_reads_keyword_only_slots_and_names_unknown_conditioning() -> None:
    """The noise level and the labels may be keyword-only (their names are used, in order); ``**kwargs`` gives an
    absent labels slot the keyword ``labels``; conditioning a network does not take is refused by name."""

    class KeywordOnly(nn.Module):
        def forward(self, x: Tensor, *, timestep: Tensor, class_labels: Tensor | None = None, h: Any = None) -> Tensor:
            return x

    class Flexible(nn.Module):
        def forward(self, x: Tensor, t: Tensor, **conditioning: Any) -> Tensor:
            return x

    class NoiseOnly(nn.Module):
        def forward(self, x: Tensor, t: Tensor, *, scale: float = 1.0) -> Tensor:
            return x

    assert CallConvention.of(KeywordOnly()) == CallConvention("timestep", "class_labels", takes_labels=True)
    assert CallConvention.of(KeywordOnly()).keywords == ("h",)  # what conditioning it can take
    assert CallConvention.of(Flexible()) == CallConvention(None, "labels", takes_labels=True)
    assert CallConvention.of(Flexible()).keywords is None
    assert CallConvention.of(NoiseOnly()) == CallConvention(None, "scale", takes_labels=True)
    run = Recorder(torch.zeros(2, 1))
    x, c_noise, labels = torch.zeros(2, 1), torch.ones(2), torch.tensor([1, 0])
    CallConvention.of(KeywordOnly()).call(run, x, c_noise, Conditioning(labels, {"h": torch.ones(2, 3)}))
    args, kwargs = run.calls[-1]
    assert (len(args), sorted(kwargs)) == (1, ["class_labels", "h", "timestep"])
    with pytest.raises(
        ValueError,
        match=r"^The batches carry the conditioning \['extra', 'more'\] \(every key of a dict batch but 'images' and"
        r" 'labels' is passed to the network by name\), but the network's forward takes no such argument \(it takes"
        r" \['h'\]\)\. Remove those keys from the batches, or give the network those"
        r" keyword arguments \(or \*\*conditioning\)\.$",
    ):
        CallConvention.of(KeywordOnly()).call(run, x, c_noise, Conditioning(labels, {"more": 1, "h": 2, "extra": 3}))
    CallConvention.of(Flexible()).call(run, x, c_noise, Conditioning(labels, {"anything": 1}))
    assert sorted(run.calls[-1][1]) == ["anything", "labels"]


def test_sampled_labels_must_index_the_networks_label_embedding() -> None:
    """Labels up to the embedding's last row (the null label included) are drawn; the ids beyond it are named."""
    net = FakeDenoiser(num_classes=10)
    net.label_embedding = nn.Embedding(11, 2)  # 11 rows: 10 classes and the null label (10)
    module = ldb.DiffusionBlocksModule(net, ImageGeneration(), num_blocks=3)
    assert module.sample(labels=[0, 9, 10], steps=1, shape=(1, 2, 2)).shape == (3, 1, 2, 2)
    labels = [0] * 8 + [12, 11, 12] + list(range(13, 20))
    with pytest.raises(
        ValueError,
        match=r"^sample\(\) got labels \[11, 12, 13, 14, 15, 16, 17, 18\] beyond the network's label embedding, which"
        r" has 11 rows \(ids 0\.\.10; 10 means 'no label'\)\.$",
    ):
        module.sample(labels=labels, steps=1, shape=(1, 2, 2))


@pytest.mark.parametrize("leading_one", [False, True])
@pytest.mark.parametrize("net", [TextDenoiser, LabelledTextDenoiser])
def test_unconditional_samples_of_a_keyword_conditioned_network_get_its_null_conditioning(
    net: type[TextDenoiser], leading_one: bool
) -> None:
    """sample(num_samples=n) without conditioning gives the network the task's null conditioning, one row per sample
    (and the null label, for a network that takes labels); the null may be given with a leading 1 or without."""
    null = torch.tensor([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, 0.0, -0.5]])
    denoiser = net()
    given = null[None] if leading_one else null
    module = ldb.DiffusionBlocksModule(denoiser, ImageGeneration(null_conditioning={"encoder_hidden_states": given}),
                                       num_blocks=3)  # fmt: skip
    out = module.sample(num_samples=3, steps=2, seed=0, shape=(1, 2, 2))
    assert out.shape == (3, 1, 2, 2)
    states = [call["states"] for call in denoiser.calls if "states" in call]
    assert len(states) == 2
    for seen in states:
        assert torch.equal(seen, null.expand(3, 2, 4))
    if net is LabelledTextDenoiser:
        assert [call["labels"].tolist() for call in denoiser.calls if "labels" in call] == [[-1] * 3] * 2


def test_a_network_without_labels_trains_on_dict_batches_whatever_their_labels_hold() -> None:
    """A captioned batch's labels are only data for a network that takes none: observing such a batch checks its
    conditioning rows, not its labels (float scores, say, or ids beyond any embedding)."""
    task = ldb.DiffusionBlocksModule(TextDenoiser(), ImageGeneration(), num_blocks=3).task
    batch = {
        "images": torch.zeros(2, 1, 2, 2),
        "labels": torch.tensor([0.25, 7.5]),
        "encoder_hidden_states": torch.ones(2, 2, 4),
    }
    task.observe(batch)
    assert (task.sample_shape, task.data_range) == ([1, 2, 2], [0.0, 0.0])
