"""Mean and spread over training seeds of the per-seed classification and text runs (``benchmarks/gpu_quality.sh``
writes them; so does any loop over ``--seed`` with ``--json``).

    python benchmarks/seed_summary.py --dir benchmarks/results --suffix _cuda

Reads ``classification_{diffusionblocks,plain}_seed{S}{suffix}.json``, ``text_masked_seed{S}{suffix}.json`` and
``text_ar_seed{S}{suffix}.json``; each ratio is taken within a seed (the two runs share its data order), then
summarised. Writes ``seed_summary{suffix}.json`` beside them and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity import figure, spread  # noqa: E402


def seeds_of(directory: Path, pattern: str) -> dict[int, dict]:
    """``{seed: parsed JSON}`` of the files matching ``pattern`` (which holds one ``(\\d+)`` for the seed)."""
    found = {}
    for path in sorted(directory.iterdir()):
        match = re.fullmatch(pattern, path.name)
        if match:
            found[int(match.group(1))] = json.loads(path.read_text())
    return found


def classification(directory: Path, suffix: str) -> dict | None:
    runs = {s: seeds_of(directory, rf"classification_{s}_seed(\d+){re.escape(suffix)}\.json")
            for s in ("diffusionblocks", "plain")}  # fmt: skip
    seeds = sorted(set(runs["diffusionblocks"]) & set(runs["plain"]))
    if not seeds:
        return None
    acc = {s: [runs[s][k]["results"][s]["accuracy"] for k in seeds] for s in runs}
    out = {"seeds": seeds, **{s: spread(v) for s, v in acc.items()},
           "ratio": spread([d / p for d, p in zip(acc["diffusionblocks"], acc["plain"])]),
           "epochs": runs["plain"][seeds[0]]["results"]["plain"].get("epochs")}  # fmt: skip
    curves = [(runs["diffusionblocks"][k]["results"]["diffusionblocks"].get("curve"),
               runs["plain"][k]["results"]["plain"].get("curve")) for k in seeds]  # fmt: skip
    if all(d and p for d, p in curves):
        points = min(min(len(d), len(p)) for d, p in curves)
        out["curve_ratio"] = [
            {"layer_evaluations": curves[0][1][i]["layer_evaluations"],
             "ratio": spread([d[i]["accuracy"] / p[i]["accuracy"] for d, p in curves])}
            for i in range(points)
        ]  # fmt: skip
    return out


def text(directory: Path, suffix: str, objective: str) -> dict | None:
    runs = seeds_of(directory, rf"text_{objective}_seed(\d+){re.escape(suffix)}\.json")
    if not runs:
        return None
    seeds = sorted(runs)
    keys = {"masked": ["bits_per_token"], "ar": ["bits_per_char_sigma_max", "bits_per_char_chain", "bits_per_char"]}
    out: dict = {"seeds": seeds}
    for strategy in runs[seeds[0]]["results"]:
        out[strategy] = {k: spread([runs[s]["results"][strategy][k] for s in seeds])
                         for k in keys[objective] if k in runs[seeds[0]]["results"][strategy]}  # fmt: skip
    for ratio in runs[seeds[0]].get("ratios", {}):
        out.setdefault("ratios", {})[ratio] = spread([runs[s]["ratios"][ratio] for s in seeds])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="benchmarks/results")
    p.add_argument("--suffix", default="_cuda", help="file-name suffix before .json (e.g. _cuda, _cpu)")
    args = p.parse_args()
    directory = Path(args.dir)
    report = {"command": "python benchmarks/seed_summary.py " + " ".join(sys.argv[1:]),
              "classification": classification(directory, args.suffix),
              "text_masked": text(directory, args.suffix, "masked"),
              "text_ar": text(directory, args.suffix, "ar")}  # fmt: skip
    cls = report["classification"]
    if cls:
        print(f"classification over seeds {cls['seeds']} ({cls['epochs']} epochs): DiffusionBlocks"
              f" {figure(cls['diffusionblocks'], 4)}, plain ViT {figure(cls['plain'], 4)},"
              f" ratio {figure(cls['ratio'], 3)} (target ≥ 0.97)")  # fmt: skip
    for key in ("text_masked", "text_ar"):
        if report[key]:
            print(f"{key} over seeds {report[key]['seeds']}:")
            for name, value in report[key].items():
                if name != "seeds":
                    print(f"  {name}: " + ", ".join(f"{k} {figure(v, 4)}" for k, v in value.items()))
    out = directory / f"seed_summary{args.suffix}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
