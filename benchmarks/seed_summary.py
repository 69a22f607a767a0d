"""Mean and spread over training seeds of the per-seed classification and text runs (``benchmarks/gpu_quality.sh``
writes them; so does any loop over ``--seed`` with ``--json``).

    python benchmarks/seed_summary.py --dir benchmarks/results --suffix _cuda

Reads ``classification_{diffusionblocks,plain}_seed{S}{suffix}.json`` and ``text_{masked,ar}_seed{S}{suffix}.json``
(or one text file per strategy, ``text_ar_plain_seed{S}{suffix}.json``); each ratio is taken within a seed (the runs
share its data order), then summarised. AR runs with f_in(x) targets (``text_ar_input_targets_{strategy}_seed{S}``)
are summarised apart, against the same seeds' plain LM, and so are classification runs at twice the budget
(``classification_{strategy}_16ep_seed{S}``). Writes ``seed_summary{suffix}.json`` beside them (or
``--out``) and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parity_summary import figure, spread  # noqa: E402


def seeds_of(directory: Path, pattern: str) -> dict[int, dict]:
    """``{seed: parsed JSON}`` of the files matching ``pattern`` (which holds one ``(\\d+)`` for the seed)."""
    found = {}
    for path in sorted(directory.iterdir()):
        match = re.fullmatch(pattern, path.name)
        if match:
            found[int(match.group(1))] = json.loads(path.read_text())
    return found


def evaluator_noise(per_run: dict[int, list[float]]) -> dict | None:
    """The evaluator's own noise: each checkpoint's standard deviation over evaluation seeds, averaged over the
    checkpoints that recorded several (``{training seed: [figure per evaluation seed]}``)."""
    stds = {seed: spread(values)["std"] for seed, values in per_run.items() if len(values) > 1}
    if not stds:
        return None
    return {"std": sum(stds.values()) / len(stds), "training_seeds": sorted(stds), "per_checkpoint": stds,
            "evaluation_seeds": max(len(v) for v in per_run.values())}  # fmt: skip


def classification(directory: Path, suffix: str, budget: str | None = None) -> dict | None:
    """DiffusionBlocks against the plain ViT, paired by seed; ``budget`` (``16ep``) reads the runs of another length,
    ``classification_{strategy}_{budget}_seed{S}``."""
    tag = f"_{budget}" if budget else ""
    runs = {s: seeds_of(directory, rf"classification_{s}{tag}_seed(\d+){re.escape(suffix)}\.json")
            for s in ("diffusionblocks", "plain")}  # fmt: skip
    seeds = sorted(set(runs["diffusionblocks"]) & set(runs["plain"]))
    if not seeds:
        return None
    acc = {s: [runs[s][k]["results"][s]["accuracy"] for k in seeds] for s in runs}
    out = {"seeds": seeds, **{s: spread(v) for s, v in acc.items()},
           "ratio": spread([d / p for d, p in zip(acc["diffusionblocks"], acc["plain"])]),
           "epochs": runs["plain"][seeds[0]]["results"]["plain"].get("epochs")}  # fmt: skip
    noise = evaluator_noise({k: runs["diffusionblocks"][k]["results"]["diffusionblocks"].get("accuracy_eval_seeds", [])
                             for k in seeds})  # fmt: skip
    if noise:
        out["evaluator_noise"] = noise
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


STRATEGIES = ("diffusionblocks", "auto", "plain")
TEXT_KEYS = {
    "masked": ["bits_per_token"],
    "ar": ["bits_per_char_sigma_max", "bits_per_char_chain", "bits_per_char", "accuracy",
           *(f"accuracy_step_{i}" for i in range(8))],
}  # fmt: skip
TEXT_RATIOS = {  # name: (strategy, its figure, baseline, the baseline's figure); each taken within a seed
    "masked": {"diffusionblocks_over_auto": ("diffusionblocks", "bits_per_token", "auto", "bits_per_token")},
    "ar": {
        "diffusionblocks_over_auto": ("diffusionblocks", "bits_per_char_chain", "auto", "bits_per_char_chain"),
        "diffusionblocks_over_plain": ("diffusionblocks", "bits_per_char_chain", "plain", "bits_per_char"),
        "diffusionblocks_sigma_max_over_plain": ("diffusionblocks", "bits_per_char_sigma_max", "plain",
                                                 "bits_per_char"),
        "auto_over_plain": ("auto", "bits_per_char_chain", "plain", "bits_per_char"),
    },
}  # fmt: skip


def text_runs(directory: Path, suffix: str, stem: str) -> dict[int, dict]:
    """``{seed: {strategy: figures}}`` from one file per seed (``{stem}_seed{S}``) or one per strategy and seed
    (``{stem}_{strategy}_seed{S}``), merged by seed."""
    merged: dict[int, dict] = {}
    for prefix in ("", *(f"{s}_" for s in STRATEGIES)):
        for seed, run in seeds_of(directory, rf"{stem}_{prefix}seed(\d+){re.escape(suffix)}\.json").items():
            merged.setdefault(seed, {}).update(run["results"])
    return merged


def text(directory: Path, suffix: str, objective: str, variant: str | None = None) -> dict | None:
    """Per-seed text figures of ``text_{objective}`` runs, merged by seed. A ``variant`` (``input_targets``) takes
    the σ-conditioned runs from ``text_{objective}_{variant}`` files and the plain LM from the ordinary ones, so
    a variant of the diffusion runs is compared with the same plain baseline, seed by seed."""
    merged = text_runs(directory, suffix, f"text_{objective}")
    if variant:
        runs = text_runs(directory, suffix, f"text_{objective}_{variant}")
        merged = {seed: {**{k: v for k, v in merged.get(seed, {}).items() if k == "plain"}, **run}
                  for seed, run in runs.items()}  # fmt: skip
    if not merged:
        return None
    out: dict = {"seeds": sorted(merged)}
    for strategy in STRATEGIES:
        have = [s for s in out["seeds"] if strategy in merged[s]]
        figures = {k: spread([merged[s][strategy][k] for s in have]) for k in TEXT_KEYS[objective]
                   if have and all(k in merged[s][strategy] for s in have)}  # fmt: skip
        if figures:
            out[strategy] = {"seeds": have, **figures}
            noise = {k: evaluator_noise({s: merged[s][strategy].get("eval_seeds", {}).get(k, []) for s in have})
                     for k in figures}  # fmt: skip
            if any(noise.values()):
                out[strategy]["evaluator_noise"] = {k: v for k, v in noise.items() if v}
    for name, (strategy, key, baseline, base_key) in TEXT_RATIOS[objective].items():
        have = [s for s in out["seeds"] if strategy in merged[s] and baseline in merged[s]]
        if have:
            values = [merged[s][strategy][key] / merged[s][baseline][base_key] for s in have]
            out.setdefault("ratios", {})[name] = {"seeds": have, **spread(values)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="benchmarks/results")
    p.add_argument("--suffix", default="_cuda", help="file-name suffix before .json (e.g. _cuda, _cpu)")
    p.add_argument("--out", default=None, help="summary JSON (default: seed_summary{suffix}.json in --dir)")
    args = p.parse_args()
    directory = Path(args.dir)
    report = {"command": "python benchmarks/seed_summary.py " + " ".join(sys.argv[1:]),
              "classification": classification(directory, args.suffix),
              "classification_16ep": classification(directory, args.suffix, budget="16ep"),
              "text_masked": text(directory, args.suffix, "masked"),
              "text_ar": text(directory, args.suffix, "ar"),
              "text_ar_input_targets": text(directory, args.suffix, "ar", variant="input_targets")}  # fmt: skip
    for cls in (report["classification"], report["classification_16ep"]):
        if not cls:
            continue
        print(f"classification over seeds {cls['seeds']} ({cls['epochs']} epochs): DiffusionBlocks"
              f" {figure(cls['diffusionblocks'], 4)}, plain ViT {figure(cls['plain'], 4)},"
              f" ratio {figure(cls['ratio'], 3)} (target ≥ 0.97)")  # fmt: skip
        if "evaluator_noise" in cls:
            noise = cls["evaluator_noise"]["std"]
            print(f"  evaluator noise (DiffusionBlocks accuracy std over sampler seeds): {noise:.4f}")
    for key in ("text_masked", "text_ar", "text_ar_input_targets"):
        if report[key]:
            print(f"{key} over seeds {report[key]['seeds']}:")
            for name, value in report[key].items():
                if name != "seeds":
                    print(f"  {name}: " + ", ".join(f"{k} {figure(v, 4)}" for k, v in value.items() if "mean" in v))
                    for k, v in value.get("evaluator_noise", {}).items():
                        print(f"    evaluator noise of {k}: std {v['std']:.4f} over {v['evaluation_seeds']} seeds")
    out = Path(args.out) if args.out else directory / f"seed_summary{args.suffix}.json"
    out.write_text(json.dumps(report, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
