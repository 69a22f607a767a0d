"""The benchmark scripts run end to end on a tiny model (their real sizes are in BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
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


def test_speed_benchmark(tmp_path):
    run("speed.py", "--steps", "3", "--steps-per-phase", "3", "--sample-steps", "4", "--out", str(tmp_path / "s.json"))
    result = json.loads((tmp_path / "s.json").read_text())["results"]
    assert result["offload_moves"] >= 4
    assert result["train_step_seconds_end_to_end"] > 0
    assert 0 < result["sample_ratio"] < 1.0  # routed sampling runs a third of the layers per step
