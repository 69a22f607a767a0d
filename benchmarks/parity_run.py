"""Running parity trainings: the examples' own code, given their settings as data.

The MNIST generation runs are the demo itself (``lightning_diffusionblocks.presets.MNISTDemo`` trained by
examples/mnist_generation.py's ``train``); each runs in a process of its own, so that ``--jobs`` trains several at
a time and one run's memory and global state never reach the next. Its settings travel as a JSON file beside the
run (``OUT/parity_settings.json``), which this module reads back when started as a script::

    python benchmarks/parity_run.py OUT/parity_settings.json

The classification and text rows are each one run of their example script, started with the settings below.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning_diffusionblocks.presets import MNISTDemo

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SETTINGS_FILE = "parity_settings.json"

#: --quick: the tiny sizes of each row (the tests run these)
QUICK_GENERATION = {"dim": 32, "depth": 3, "heads": 2, "batch_size": 16}
QUICK_ABLATION = {"dim": 32, "depth": 4, "heads": 2, "batch_size": 16}
QUICK_CLASSIFICATION = {"depth": 3, "dim": 24, "heads": 2, "batch_size": 16, "test_batches": 2}
QUICK_TEXT = {
    "masked": {"dim": 32, "depth": 3, "heads": 2, "batch_size": 8, "eval_batches": 2, "samples": 1, "seq_len": 32,
               "sample_steps": 4},
    "autoregressive": {"dim": 32, "depth": 4, "heads": 2, "batch_size": 8, "eval_batches": 2, "samples": 1,
                       "seq_len": 32, "sample_steps": 4, "new_chars": 8, "prompt_chars": 8},
}  # fmt: skip
#: CPU-sized defaults of the text rows (the examples' own defaults otherwise)
TEXT_SETTINGS = {
    "masked": {"seq_len": 128, "depth": 6, "eval_batches": 20, "sample_steps": 64},
    "autoregressive": {"seq_len": 64, "depth": 8, "num_blocks": 4, "eval_batches": 20, "new_chars": 120},
}
#: the generation runs' settings that parity fixes: a small grid of samples, the benchmark scores its own
PARITY_DEMO = {"sample_steps": 4, "per_class": 1}

#: the ablations: each variant changes some of the demo's settings (ABLATION_DEFAULTS fills in the rest)
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "partition": [{"partition": "equiprobable", "gamma": 0.0}, {"partition": "uniform_log", "gamma": 0.0}],
    "gamma": [{"gamma": 0.0}, {"gamma": 0.05}, {"gamma": 0.1}],
    "blocks": [{"num_blocks": 2}, {"num_blocks": 3}, {"num_blocks": 4}],
}
ABLATION_DEFAULTS = {name: getattr(MNISTDemo(), name) for name in ("partition", "gamma", "num_blocks")}  # the demo's


def option(name: str) -> str:
    """A setting's command-line option: ``num_blocks`` -> ``--num-blocks``."""
    return "--" + name.replace("_", "-")


def text_value(value: Any) -> str:
    """A setting as the command line spells it (``0.0`` -> ``0``, ``0.05`` -> ``0.05``)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def flags(settings: dict[str, Any]) -> list[str]:
    """A settings dictionary as command-line options, in its order."""
    return [part for name, value in settings.items() for part in (option(name), text_value(value))]


def variant_label(variant: dict[str, Any]) -> str:
    """How tables and result files name a variant: its options, e.g. ``--num-blocks 2``."""
    return " ".join(flags(variant))


def variant_key(variant: dict[str, Any]) -> str:
    """Folder name of a variant with the demo defaults filled in, so equal runs share one folder."""
    settings = {**ABLATION_DEFAULTS, **variant}
    return "_".join(f"{option(k).strip('-')}-{text_value(v)}" for k, v in sorted(settings.items()))


def ablation_steps(variant: dict[str, Any], gen_steps: int) -> int:
    """Steps that give a variant the demo's layer evaluations: each step runs depth / B layers, so steps ∝ B."""
    blocks = variant.get("num_blocks", ABLATION_DEFAULTS["num_blocks"])
    return round(gen_steps * blocks / ABLATION_DEFAULTS["num_blocks"])


def generation_demo(args: Any, mnist: Path, quick_sizes: dict[str, Any], **settings: Any) -> MNISTDemo:
    """The demo as parity trains it: the run's ``settings`` over parity's fixed ones and the command line's."""
    base: dict[str, Any] = {"data_dir": str(mnist), "formulation": args.formulation,
                            "accelerator": args.accelerator, **PARITY_DEMO}  # fmt: skip
    if args.formulation == "ddpm":  # the other formulations have neither option
        base |= {"prediction": args.prediction, "beta_schedule": args.beta_schedule}
    return replace(MNISTDemo(**base), **(quick_sizes if args.quick else {}), **settings)


def demo_job(demo: MNISTDemo, out: Path) -> tuple[str, list[str]]:
    """A training job of the demo: its settings written beside the run, and the command that trains from them."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SETTINGS_FILE
    path.write_text(json.dumps({"demo": demo.to_dict(), "out": str(out)}, indent=2))
    return str(out), [sys.executable, str(Path(__file__).resolve()), str(path)]


def run_example(script: str, settings: dict[str, Any]) -> None:
    """One run of an example script with ``settings`` as its options; exits with its error if it fails."""
    cmd = [sys.executable, str(EXAMPLES / script), *flags(settings)]
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-4000:]}")


def run_jobs(jobs: list[tuple[str, list[str]]], parallel: int, done: Callable[[int], None] | None = None) -> None:
    """Run ``(name, command)`` jobs, ``parallel`` at a time; ``done(index)`` is called as each one finishes, once
    its slot has gone to the next job, so that scoring a finished run overlaps the training of the others."""
    pending, running = list(enumerate(jobs)), dict[int, subprocess.Popen]()

    def fill() -> None:
        while pending and len(running) < max(1, parallel):
            i, (_, cmd) = pending.pop(0)
            print("$", " ".join(cmd), flush=True)
            running[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    fill()
    while running:  # a pending job always finds a slot, so nothing is left once no job runs
        finished = [i for i, proc in running.items() if proc.poll() is not None]
        for i in finished:
            proc = running.pop(i)
            if proc.returncode:
                err = proc.stderr.read() if proc.stderr else ""
                sys.exit(f"{jobs[i][0]} failed:\n{err[-4000:]}")
        fill()
        for i in finished:
            if done is not None:
                done(i)
        time.sleep(0.5)


def train_demo(settings_file: Path) -> dict:
    """Train the demo from a settings file written by :func:`demo_job` with examples/mnist_generation.py's code."""
    saved = json.loads(settings_file.read_text())
    example = runpy.run_path(str(EXAMPLES / "mnist_generation.py"), run_name="mnist_generation")
    return example["train"](MNISTDemo.from_dict(saved["demo"]), example["RunOptions"](out=saved["out"]))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {Path(__file__).name} OUT/{SETTINGS_FILE}")
    train_demo(Path(sys.argv[1]))
