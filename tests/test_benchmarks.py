"""The benchmark scripts run end to end on a tiny model (their real sizes are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dim", "32", "--depth", "4", "--heads", "2", "--batch-size", "4", "--image-size", "16"]


def run(script: str, *args: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *TINY, *args],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]


def test_memory_benchmark(tmp_path):
    run("memory.py", "--blocks-list", "2,4", "--out", str(tmp_path / "m.json"))
    result = json.loads((tmp_path / "m.json").read_text())
    rows = {(r["mode"], r["blocks"]): r for r in result["rows"]}
    e2e, b4 = rows[("end_to_end", 1)]["worst"], rows[("diffusionblocks", 4)]["worst"]
    assert b4["params"] < e2e["params"] / 2
    assert b4["activations"] < e2e["activations"] / 2
    assert "| DiffusionBlocks B=4 |" in result["table"]
    assert result["meta"]["command"].startswith("python benchmarks")


def test_memory_benchmark_decoder_lm(tmp_path):
    run("memory.py", "--model", "lm", "--blocks-list", "3", "--dim", "32", "--depth", "3", "--heads", "2",
        "--seq-len", "64", "--batch-size", "4", "--out", str(tmp_path / "lm.json"))  # fmt: skip
    rows = json.loads((tmp_path / "lm.json").read_text())["rows"]
    e2e, db = rows[0]["worst"], rows[1]["worst"]
    assert db["activations"] < 0.6 * e2e["activations"]  # one group of three: about a third
    assert db["total"] < 0.6 * e2e["total"]


def test_speed_benchmark(tmp_path):
    run("speed.py", "--steps", "3", "--steps-per-phase", "3", "--sample-steps", "4", "--out", str(tmp_path / "s.json"))
    result = json.loads((tmp_path / "s.json").read_text())["results"]
    assert result["offload_moves"] >= 4
    assert result["train_step_seconds_end_to_end"] > 0
    assert 0 < result["sample_ratio"] < 1.0  # routed sampling runs a third of the layers per step


def test_parity_quick(tmp_path, mnist_dir):
    """`--quick` runs the whole parity pipeline (training through the examples, FID, accuracy) on tiny data."""
    out = tmp_path / "parity.json"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("In the beginning was the word, and the word was with the sea.\n" * 400, encoding="utf-8")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--quick", "--task", "all", "--gen-steps", "6",
           "--cls-steps", "3", "--fid-samples", "20", "--sample-steps", "3", "--mnist-dir", str(mnist_dir),
           "--fashion-dir", str(mnist_dir), "--workdir", str(tmp_path / "work"), "--out", str(out),
           "--mdm-steps", "3", "--ar-steps", "2", "--text-file", str(corpus), "--ablation", "blocks",
           "--eval-seeds", "0", "1", "--jobs", "2"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = [r for r in report["generation"]["rows"] if r["eval_seed"] == 0]
    assert sorted(r["strategy"] for r in rows) == ["auto", "diffusionblocks"]
    assert rows[0]["layer_evaluations"] == rows[1]["layer_evaluations"]
    assert all(r["fid"] >= 0 and 0 <= r["class_accuracy"] <= 1 for r in rows)
    cls = report["classification"]["results"]
    assert cls["diffusionblocks"]["steps"] == 3 * cls["auto"]["steps"]
    assert cls["plain"]["steps"] == cls["auto"]["steps"]
    for strategy in ("diffusionblocks", "auto"):  # the evaluator's noise: the same model under 3 sampler seeds
        seeds = cls[strategy]["accuracy_eval_seeds"]
        assert len(seeds) == 3
        assert seeds[0] == cls[strategy]["accuracy"]
    assert "accuracy_eval_seeds" not in cls["plain"]  # its prediction has no noise
    for key, blocks in (("text_masked", 3), ("text_autoregressive", 4)):
        text = report[key]["results"]
        assert text["diffusionblocks"]["steps"] == blocks * text["auto"]["steps"]
        assert text["diffusionblocks"]["layer_evaluations"] == text["auto"]["layer_evaluations"]
        assert all(r["judge_bits_per_char"] > 0 and 0 <= r["word_validity"] <= 1 for r in text.values())
    assert report["text_masked"]["results"]["auto"]["bits_per_token"] > 0
    masked_noise = report["text_masked"]["results"]["diffusionblocks"]["eval_seeds"]["bits_per_token"]
    assert masked_noise[0] == report["text_masked"]["results"]["diffusionblocks"]["bits_per_token"]
    assert len(set(masked_noise)) == 3  # other masking times give other estimates of the same model's bound
    assert report["text_autoregressive"]["results"]["auto"]["ce_chain"] > 0
    ablation = report["ablation"]
    assert [r["variant"] for r in ablation["rows"]] == ["--num-blocks 2", "--num-blocks 3", "--num-blocks 4"]
    assert [r["steps"] for r in ablation["rows"]] == [4, 6, 8]  # steps ∝ B: depth 4 / B layers per step
    assert len({r["layer_evaluations"] for r in ablation["rows"]}) == 1
    noise = ablation["summary"]["evaluator_rows"]
    assert [r["eval_seed"] for r in noise] == [0, 1]
    assert len({r["run"] for r in noise}) == 1


def test_scaling_benchmark(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--worlds", "1,2", "--blocks", "2", "--dim", "32",
           "--depth", "4", "--global-batch", "8", "--steps", "2", "--warmup", "1", "--repeats", "1",
           "--out", str(tmp_path / "scaling.json")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {(r["mode"], r["world"]): r for r in json.loads((tmp_path / "scaling.json").read_text())["rows"]}
    assert len(rows) == 6
    e2e, dp, bp = rows[("e2e", 2)], rows[("dp", 2)], rows[("bp", 2)]
    assert 0 < dp["bytes_per_step"] < 0.75 * e2e["bytes_per_step"]  # one group of two, plus nothing else
    assert bp["bytes_per_step"] == 0  # one group per process: nothing to all-reduce
    assert bp["memory_total_mib"] < e2e["memory_total_mib"]
    for r in rows.values():  # each process's measured memory beside the accounting: start-up, training and peak RSS
        m = r["measured_mib"]
        assert len(m["rss_base"]) == len(m["rss_train"]) == len(m["rss_peak"]) == r["world"]
        assert all(0 < base < now <= peak for base, now, peak in zip(m["rss_base"], m["rss_train"], m["rss_peak"]))


def test_text_reference(tmp_path):
    """Real text scores far better than noise under the judge, and epochs follow from the steps and the split."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("And God said, Let there be light: and there was light.\n" * 600, encoding="utf-8")
    out = tmp_path / "ref.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "text_reference.py"), "--data", str(corpus), "--pieces", "4",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ref = json.loads(out.read_text())
    assert ref["corpus_chars"] == len(corpus.read_text(encoding="utf-8"))
    assert ref["judge_bits_per_char_real_test_text"] < 1.0 < ref["unigram_test_bits_per_char"]
    assert ref["judge_bits_per_char_uniform_noise"] > ref["unigram_test_bits_per_char"]
    assert ref["word_validity_real_test_text"] > 0.8
    n_train = ref["split_chars"]["train"]
    assert ref["epochs"]["masked"]["epochs_of_characters"] == 600 * 32 * 128 / n_train


def test_seed_summary_takes_ratios_within_each_seed(tmp_path):
    """Per-seed runs are paired by seed: the ratio's mean is the mean of per-seed ratios, not a ratio of means."""
    db, plain = [0.80, 0.90, 0.60], [0.90, 0.90, 0.80]
    for seed, (a, b) in enumerate(zip(db, plain)):
        for name, acc in (("diffusionblocks", a), ("plain", b)):
            curve = [{"layer_evaluations": 100.0 * (i + 1), "accuracy": acc / (2 - i)} for i in range(2)]
            result = {"accuracy": acc, "epochs": 10.0, "curve": curve}
            if name == "diffusionblocks" and seed == 2:  # one checkpoint scored under three sampler seeds
                result["accuracy_eval_seeds"] = [acc, acc + 0.01, acc - 0.01]
            path = tmp_path / f"classification_{name}_seed{seed}_cpu.json"
            path.write_text(json.dumps({"results": {name: result}}))
            if seed < 2:  # a longer budget over two seeds, kept apart from the runs above
                longer = {"accuracy": acc + 0.05, "epochs": 20.0}
                (tmp_path / f"classification_{name}_16ep_seed{seed}_cpu.json").write_text(
                    json.dumps({"results": {name: longer}})
                )
        text = {"results": {"diffusionblocks": {"bits_per_token": 3.0 + seed}, "auto": {"bits_per_token": 4.0}},
                "ratios": {"diffusionblocks_over_auto": (3.0 + seed) / 4.0}}  # fmt: skip
        (tmp_path / f"text_masked_seed{seed}_cpu.json").write_text(json.dumps(text))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seed_summary.py"), "--dir", str(tmp_path), "--suffix", "_cpu"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "seed_summary_cpu.json").read_text())
    cls = report["classification"]
    ratios = [a / b for a, b in zip(db, plain)]
    mean = sum(ratios) / 3
    assert cls["seeds"] == [0, 1, 2]
    assert abs(cls["ratio"]["mean"] - mean) < 1e-12
    assert abs(cls["ratio"]["std"] - (sum((r - mean) ** 2 for r in ratios) / 2) ** 0.5) < 1e-12
    assert abs(cls["diffusionblocks"]["mean"] - sum(db) / 3) < 1e-12
    assert [p["layer_evaluations"] for p in cls["curve_ratio"]] == [100.0, 200.0]
    assert abs(cls["curve_ratio"][0]["ratio"]["mean"] - mean) < 1e-12
    assert cls["evaluator_noise"]["training_seeds"] == [2]
    assert abs(cls["evaluator_noise"]["std"] - 0.01) < 1e-12
    longer = report["classification_16ep"]
    assert longer["seeds"] == [0, 1]
    assert longer["epochs"] == 20.0
    assert abs(longer["ratio"]["mean"] - sum((a + 0.05) / (b + 0.05) for a, b in zip(db[:2], plain[:2])) / 2) < 1e-12
    masked = report["text_masked"]
    assert masked["diffusionblocks"]["bits_per_token"]["mean"] == 4.0
    assert masked["ratios"]["diffusionblocks_over_auto"]["max"] == 5.0 / 4.0
    assert report["text_ar"] is None


def test_seed_summary_merges_per_strategy_text_files(tmp_path):
    """AR runs stored one file per strategy are paired by seed; chain and σ_max figures are over the plain LM's."""
    chain, sigma_max, plain = [27.0, 20.0, 24.0], [3.1, 3.0, 3.3], [2.6, 2.5, 2.7]
    for seed in range(3):
        db = {"bits_per_char_chain": chain[seed], "bits_per_char_sigma_max": sigma_max[seed], "accuracy_step_0": 0.4,
              "eval_seeds": {"bits_per_char_chain": [chain[seed], chain[seed] + 2 * seed]}}  # fmt: skip
        (tmp_path / f"text_ar_diffusionblocks_seed{seed}_cpu.json").write_text(
            json.dumps({"results": {"diffusionblocks": db}})
        )
        (tmp_path / f"text_ar_plain_seed{seed}_cpu.json").write_text(
            json.dumps({"results": {"plain": {"bits_per_char": plain[seed], "accuracy": 0.47}}})
        )
        if seed:  # an f_in(x) variant over seeds 1 and 2, against the same plain runs
            fin = {"bits_per_char_chain": chain[seed] / 2, "bits_per_char_sigma_max": sigma_max[seed]}
            (tmp_path / f"text_ar_input_targets_diffusionblocks_seed{seed}_cpu.json").write_text(
                json.dumps({"results": {"diffusionblocks": fin}})
            )
    out = tmp_path / "summary.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "seed_summary.py"), "--dir", str(tmp_path), "--suffix", "_cpu",
           "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ar = json.loads(out.read_text())["text_ar"]
    assert ar["seeds"] == [0, 1, 2]
    assert ar["plain"]["seeds"] == [0, 1, 2]
    over_plain = [c / p for c, p in zip(chain, plain)]
    assert abs(ar["ratios"]["diffusionblocks_over_plain"]["mean"] - sum(over_plain) / 3) < 1e-12
    assert ar["ratios"]["diffusionblocks_sigma_max_over_plain"]["max"] == max(s / p for s, p in zip(sigma_max, plain))
    assert "diffusionblocks_over_auto" not in ar["ratios"]
    assert abs(ar["diffusionblocks"]["accuracy_step_0"]["mean"] - 0.4) < 1e-12
    noise = ar["diffusionblocks"]["evaluator_noise"]["bits_per_char_chain"]  # std of [c, c + 2s] is s·√2
    assert abs(noise["std"] - sum(s * 2**0.5 for s in range(3)) / 3) < 1e-12
    assert "evaluator_noise" not in ar["plain"]
    fin = json.loads(out.read_text())["text_ar_input_targets"]
    assert fin["seeds"] == [1, 2]
    assert abs(fin["ratios"]["diffusionblocks_over_plain"]["mean"] - sum(over_plain[1:]) / 4) < 1e-12
    assert abs(fin["diffusionblocks"]["bits_per_char_chain"]["mean"] - (chain[1] + chain[2]) / 4) < 1e-12


def test_parity_merge_pairs_seeds_across_files(tmp_path):
    """--merge joins generation files run at different times: each seed's ratio comes from its own pair, a row
    repeated in two files counts once, and the evaluator's noise comes from the checkpoint with two sampling seeds."""

    def row(strategy: str, seed: int, eval_seed: int, fid: float, acc: float) -> dict:
        return {"run": f"gen_{strategy}_seed{seed}", "strategy": strategy, "seed": seed, "eval_seed": eval_seed,
                "steps": 1, "layer_evaluations": 6, "fid": fid, "class_accuracy": acc, "val_loss": 0.1}  # fmt: skip

    first = [row("auto", 0, 0, 60.0, 0.9), row("auto", 0, 1, 64.0, 0.9), row("diffusionblocks", 0, 0, 30.0, 0.8)]
    second = [row("auto", 1, 0, 40.0, 1.0), row("diffusionblocks", 1, 0, 40.0, 0.9), first[0]]
    for name, rows in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps({"command": "x", "generation": {"rows": rows}}))
    out = tmp_path / "merged.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "parity.py"), "--merge", str(tmp_path / "a.json"),
           str(tmp_path / "b.json"), "--workdir", str(tmp_path / "w"), "--out", str(out)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    merged = json.loads(out.read_text())["generation"]
    assert len(merged["rows"]) == 5
    summary = merged["summary"]
    assert summary["fid_ratio"]["n"] == 2
    assert abs(summary["fid_ratio"]["mean"] - (30 / 60 + 40 / 40) / 2) < 1e-12  # not (30 + 40) / (60 + 40)
    assert abs(summary["accuracy_ratio"]["mean"] - (0.8 / 0.9 + 0.9 / 1.0) / 2) < 1e-12
    assert abs(summary["evaluator_fid_std"]["mean"] - 8**0.5) < 1e-9  # std of (60, 64), sample std
    assert summary["auto"]["fid"]["mean"] == 50.0  # first sampling seed of each checkpoint only

    bad = subprocess.run(cmd[:-2] + ["--task", "all"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0
    assert "--merge only summarises generation files" in bad.stderr


def test_parity_trains_the_demo_from_a_settings_file(tmp_path):
    """A generation job is the demo's settings as data: its file reads back to the same ``MNISTDemo``, --quick
    shrinks only the sizes, and ablation variants keep the folder names and labels earlier runs were stored under."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import argparse

    import parity_run

    import lightning_diffusionblocks as ldb

    args = argparse.Namespace(formulation="ddpm", prediction="v", beta_schedule="cosine", accelerator="cpu", quick=True)
    demo = parity_run.generation_demo(args, tmp_path, parity_run.QUICK_GENERATION, steps=5, strategy="auto", seed=2)
    expected = ldb.presets.MNISTDemo(strategy="auto", formulation="ddpm", prediction="v", beta_schedule="cosine",
                                     steps=5, dim=32, depth=3, heads=2, batch_size=16, sample_steps=4, per_class=1,
                                     data_dir=str(tmp_path), seed=2)  # fmt: skip
    assert demo == expected
    name, cmd = parity_run.demo_job(demo, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / parity_run.SETTINGS_FILE).read_text())
    assert ldb.presets.MNISTDemo.from_dict(saved["demo"]) == demo
    assert cmd[-2:] == [str(ROOT / "benchmarks" / "parity_run.py"), str(tmp_path / "run" / parity_run.SETTINGS_FILE)]
    keys = [(parity_run.variant_key(v), parity_run.variant_label(v)) for v in parity_run.ABLATIONS["gamma"]]
    assert keys == [("gamma-0_num-blocks-3_partition-equiprobable", "--gamma 0"),
                    ("gamma-0.05_num-blocks-3_partition-equiprobable", "--gamma 0.05"),
                    ("gamma-0.1_num-blocks-3_partition-equiprobable", "--gamma 0.1")]  # fmt: skip


def test_run_jobs_starts_the_next_job_before_scoring(tmp_path):
    """A finished run is scored only after its slot went to the next job, so scoring overlaps training."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import parity_run

    def command(name: str) -> tuple[str, list[str]]:  # each job leaves a file as it starts
        return name, [sys.executable, "-c", f"open({str(tmp_path / name)!r}, 'w').close()"]

    seen: list[tuple[int, bool]] = []

    def done(i: int) -> None:
        deadline = time.monotonic() + 30
        while i == 0 and not (tmp_path / "second").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        seen.append((i, (tmp_path / "second").exists()))

    parity_run.run_jobs([command("first"), command("second")], parallel=1, done=done)
    assert seen == [(0, True), (1, True)]


class _WordEncoder:
    """A stand-in text encoder (384-d, one state per word, seeded by the word): the script's plumbing without
    loading MiniLM."""

    digest = "words-384"

    def encode(self, texts):  # noqa: ANN001, ANN201
        import zlib

        import torch

        from lightning_diffusionblocks.data.captions import TextEmbeddings

        words = [t.split() for t in texts]
        length = max(1, *(len(w) for w in words))
        states, mask = torch.zeros(len(texts), length, 384), torch.zeros(len(texts), length, dtype=torch.long)
        for i, text in enumerate(words):
            for j, word in enumerate(text):
                states[i, j] = torch.randn(384, generator=torch.Generator().manual_seed(zlib.crc32(word.encode())))
                mask[i, j] = 1
        pooled = states.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextEmbeddings(states, mask, pooled)


def test_text_to_image_toy_run(tmp_path, mnist_dir):
    """The text-to-image benchmark end to end on a toy configuration: both strategies train at equal layer
    evaluations, every (digit, paraphrase) prompt is sampled and scored, the ratios are block-wise / end to end per
    seed, and the report (JSON + table) is written."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import text_to_image as t2i

    s = t2i.Settings(width=32, head_dim=16, depth=3, num_blocks=3, e2e_steps=2, batch_size=4, warmup=0,
                     sample_steps=2, per_prompt=1, templates=("a handwritten {name}", "the number {digit}"),
                     fid_real=20, feature_steps=3, seeds=(0,), data_dir=str(mnist_dir))  # fmt: skip
    texts, digits, kinds = t2i.prompts(s)
    assert texts[:3] == ["a handwritten zero", "the number 0", "a handwritten one"]
    assert digits.tolist() == [d for d in range(10) for _ in range(2)]
    assert kinds.tolist() == [0, 1] * 10
    out = tmp_path / "t2i.json"
    report = t2i.run(s, out, tmp_path / "work", encoder=_WordEncoder(), cache_dir=tmp_path / "cache", command="x")
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["partial"] is False
    rows = {r["strategy"]: r for r in report["rows"]}
    assert (rows["auto"]["steps"], rows["diffusionblocks"]["steps"]) == (2, 6)
    assert rows["auto"]["layer_evaluations"] == rows["diffusionblocks"]["layer_evaluations"] == 6
    assert rows["auto"]["groups"] == [[0, 1, 2]]
    assert rows["diffusionblocks"]["groups"] == [[0], [1], [2]]
    for row in rows.values():
        assert row["samples"] == 20
        assert 0 <= row["class_accuracy"] <= 1
        assert row["fid"] == row["fid"]
    ratio = report["summary"]["fid_ratio"]["per_seed"][0]
    assert abs(ratio - rows["diffusionblocks"]["fid"] / rows["auto"]["fid"]) < 1e-9
    assert "| DiffusionBlocks B=3 |" in report["table"]
    assert "| 6 |" in report["table"]
    assert (tmp_path / "work" / "feature_net.pt").exists()  # the classifier is trained once and kept


def _bench_module(name: str):  # noqa: ANN202
    """A benchmark script imported as a module (its folder first on the path, as when it runs)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_largest_model_bisection_brackets_the_limit() -> None:
    """The bisection grows the depth until a probe fails, then narrows to the largest that fits (within the
    tolerance), probing each depth once; nothing fits: depth 0."""
    lm = _bench_module("largest_model")
    limit, seen = 37, []

    def probe(args, mode, depth):  # noqa: ANN001, ANN202
        seen.append(depth)
        return {"mode": mode, "depth": depth, "fits": depth <= limit, "params": depth}

    original, lm.probe = lm.probe, probe
    try:
        args = type("Args", (), {"tolerance": 0.0})()
        depth, rows = lm.bisect(args, "end_to_end", 4, 8)
        assert depth == limit
        assert len(seen) == len(set(seen))
        assert seen[:4] == [4, 8, 16, 32]
        assert lm.bisect(args, "end_to_end", 40, 80)[0] == 0
    finally:
        lm.probe = original


def test_state_quality_ratios_are_per_seed_against_fp32() -> None:
    """Each configuration's ratio is taken against the fp32 run of the same seed, then averaged over seeds."""
    sq = _bench_module("state_quality")
    rows = [
        {"config": c, "seed": s, "fid": fid, "class_accuracy": acc, "train_seconds": 10.0}
        for c, s, fid, acc in [("fp32", 0, 10.0, 0.5), ("fp32", 1, 20.0, 0.8), ("8bit", 0, 12.0, 0.4),
                               ("8bit", 1, 20.0, 0.8), ("bf16", 1, 30.0, 0.4)]
    ]  # fmt: skip
    summary = sq.summarize(rows)
    assert summary["8bit"]["fid_ratio"]["per_seed"] == [1.2, 1.0]
    assert abs(summary["8bit"]["fid_ratio"]["mean"] - 1.1) < 1e-12
    assert summary["8bit"]["class_accuracy_ratio"]["per_seed"] == [0.8, 1.0]
    assert summary["bf16"]["fid_ratio"]["per_seed"] == [1.5]
    assert "fid_ratio" not in summary["fp32"]
    assert "| 8bit |" in sq.markdown(summary)
