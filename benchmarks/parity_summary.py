"""Summarising parity results: spreads over seeds, the generation summary, merged result files, markdown tables.

Pure functions of the JSON rows that benchmarks/parity_score.py and the examples write; nothing here trains or
samples, so benchmarks/seed_summary.py and the tests use them on stored results.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation and range of a list of figures."""
    t = torch.tensor(values, dtype=torch.float64)
    std = float(t.std()) if len(values) > 1 else 0.0
    return {"mean": float(t.mean()), "std": std, "min": float(t.min()), "max": float(t.max()), "n": len(values)}


def summarize_generation(rows: list[dict]) -> dict:
    """Across training seeds: each strategy's FID and accuracy, the per-seed ratios, and the evaluator's noise
    (the spread of one checkpoint's FID over sampling seeds)."""
    first = [r for r in rows if r["eval_seed"] == min(x["eval_seed"] for x in rows)]
    out: dict = {}
    for strategy in ("diffusionblocks", "auto"):
        mine = [r for r in first if r["strategy"] == strategy]
        if mine:
            out[strategy] = {"fid": spread([r["fid"] for r in mine]),
                             "class_accuracy": spread([r["class_accuracy"] for r in mine])}  # fmt: skip
    by_seed = {(r["strategy"], r["seed"]): r for r in first}
    seeds = sorted({s for (k, s) in by_seed if ("auto", s) in by_seed and ("diffusionblocks", s) in by_seed})
    if seeds:
        out["fid_ratio"] = spread([by_seed["diffusionblocks", s]["fid"] / by_seed["auto", s]["fid"] for s in seeds])
        out["accuracy_ratio"] = spread(
            [by_seed["diffusionblocks", s]["class_accuracy"] / by_seed["auto", s]["class_accuracy"] for s in seeds]
        )
    evaluator = [
        spread([r["fid"] for r in rows if r["run"] == run])["std"]
        for run in {r["run"] for r in rows}
        if sum(r["run"] == run for r in rows) > 1
    ]
    if evaluator:
        out["evaluator_fid_std"] = spread(evaluator)
    return out


def merge_generation(paths: list[str]) -> dict:
    """One generation report from several result files (training seeds run at different times): their rows,
    each (run, sampling seed) once, summarised together."""
    rows: dict[tuple[str, int], dict] = {}
    for path in paths:
        report = json.loads(Path(path).read_text())
        if "generation" not in report:
            raise SystemExit(f"{path} holds no generation rows; pass result files written by --task generation")
        for row in report["generation"]["rows"]:
            rows.setdefault((row["run"], row["eval_seed"]), row)
    merged = sorted(rows.values(), key=lambda r: (r["seed"], r["strategy"], r["eval_seed"]))
    return {"rows": merged, "merged_from": list(paths), "summary": summarize_generation(merged)}


def figure(value: float | dict, digits: int) -> str:
    """A figure, or mean ± standard deviation over seeds."""
    if isinstance(value, dict):
        return (
            f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
            if value["n"] > 1
            else f"{value['mean']:.{digits}f}"
        )
    return f"{value:.{digits}f}"


def table_generation(result: dict) -> str:
    rows = result["rows"]
    lines = ["| run | seed | steps | layer evals | FID ↓ | class accuracy ↑ | val loss ↓ |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        name = f"{r['ablation']}: {r['variant']}" if "ablation" in r else r.get("variant") or r["strategy"]
        seed = ",".join(map(str, r["seeds"])) if "seeds" in r else f"{r.get('seed', 0)}/{r.get('eval_seed', 0)}"
        lines.append(
            f"| {name} | {seed} | {r['steps']} | {r['layer_evaluations']} | {figure(r['fid'], 3)} |"
            f" {figure(r['class_accuracy'], 3)} | {figure(r['val_loss'], 4)} |"
        )
    summary = result.get("summary") or {}
    if "fid_ratio" in summary:
        fid, acc = summary["fid_ratio"], summary["accuracy_ratio"]
        lines.append(f"\nFID ratio DiffusionBlocks / end-to-end over {fid['n']} seeds: {figure(fid, 3)}"
                     f" (target ≤ 1.10); class-accuracy ratio: {figure(acc, 3)}")  # fmt: skip
    if "evaluator_fid_std" in summary:
        lines.append(
            f"evaluator noise (FID std over sampling seeds, one checkpoint): {figure(summary['evaluator_fid_std'], 3)}"
        )
    return "\n".join(lines)


def table_text(result: dict) -> str:
    objective, rows = result["objective"], result["results"]
    if objective == "masked":
        lines = ["| run | steps | layer evals | test bits/char (ELBO) ↓ | sample judge bits/char ↓ | words valid ↑ |",
                 "|---|---|---|---|---|---|"]  # fmt: skip
        key = "bits_per_token"
    else:
        lines = ["| run | steps | layer evals | CE@σ_max bits/char ↓ | CE after chain bits/char ↓ | next-char acc ↑"
                 " | sample judge bits/char ↓ | words valid ↑ |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        key = "bits_per_char_chain"
    for name, r in rows.items():
        label = {"diffusionblocks": "DiffusionBlocks", "auto": "end-to-end", "plain": "plain next-token (CE)"}[name]
        if objective == "masked":
            middle = f"{r['bits_per_token']:.4f}"
        elif name == "plain":  # a true likelihood over the same positions; no σ_max column
            middle = f"— | {r['bits_per_char']:.4f} | {r['accuracy']:.3f}"
        else:
            middle = f"{r['bits_per_char_sigma_max']:.4f} | {r['bits_per_char_chain']:.4f} | {r['accuracy_chain']:.3f}"
        lines.append(f"| {label} | {r['steps']} | {r['layer_evaluations']} | {middle} |"
                     f" {r['judge_bits_per_char']:.3f} | {r['word_validity']:.3f} |")  # fmt: skip
    if {"diffusionblocks", "auto"} <= set(rows):
        ratio = rows["diffusionblocks"][key] / rows["auto"][key]
        lines.append(f"\n{key} ratio DiffusionBlocks / end-to-end: {ratio:.3f}")
    if "diffusionblocks_over_plain" in result.get("ratios", {}):
        ratio = result["ratios"]["diffusionblocks_over_plain"]
        lines.append(f"chain bits/char over the plain next-token model's bits/char: {ratio:.3f} (target ≤ 1.10)")
    return "\n".join(lines)
