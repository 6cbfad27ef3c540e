"""Several demo runs side by side (e.g. two world seeds): the headline numbers of each run's
``findings.json`` as one table, one column per run, and whether every run reaches the same verdict.

An effect holds for the world, not for one seed, only when every run finds it: the ``same verdict``
column says ``yes`` when the verdict words agree across runs (``no`` otherwise; ``-`` for a row without a
verdict). Writes ``comparison.md`` and ``comparison.json`` (the rows with each run's cell, read from its
findings).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.io import atomic_path, read_json, write_json
from mllm_swap.demo.findings import GROUPS
from mllm_swap.demo.sections import markdown_table, num, sig

Row = tuple[str, dict | None, str]  # (finding, its cell in one run's findings, the key of its value)


def rows(found: dict) -> Iterator[Row]:
    """The headline cells of one run's findings record, in report order."""
    for name, features in found["probe_differences"].items():
        for attr, cell in features.get("patch_mean", {}).items():
            yield f"probe {name.replace('_vs_', ' - ')}, patch_mean, {attr}", cell, "diff"
    for text, cell in found["ranking"].get("dino_vs_random", {}).items():
        yield f"debiased CKA vs {text}: DINOv2 - best random tower", cell, "margin_over_best_random"
    if toy := found["ranking"].get("toy"):
        yield "toy: Pearson r (linear CKA, CLIP loss)", toy, "pearson_r"
    for model, labels in found["zeroshot"].items():
        for label, cell in labels.items():
            yield f"zero-shot {model}, {label}", cell, "acc1"
    for name, cell in found["mmvp_vlm"].items():
        yield f"MMVP-VLM {name.replace('_vs_', ' - ')}", cell, "diff" if "_vs_" in name else "score"
    for name, k in found["kuea"].items():
        kd = k["kernel_discrepancy"]
        yield f"{name}: kernel discrepancy to DINOv2, before -> after", kd, "after"
        for label, z in k["zeroshot"].items():
            yield f"{name}: zero-shot {label} lost", z, "drop"
    for arm, groups in found["vqa_arms"].items():
        for group in GROUPS:
            if group in groups:
                yield f"VQA {arm} (tuned arm), {group}", groups[group], "accuracy"
    yield from _vqa_rows(found["comparisons"])
    yield from swap_rows(found.get("swaps") or {})


def _vqa_rows(comparisons: dict) -> Iterator[Row]:
    """Each paired VQA comparison's difference per question group."""
    for name, c in comparisons.items():
        for group in GROUPS:
            if group in c["kinds"]:
                yield f"VQA {name.replace('_vs_', ' - ')}, {group}", c["kinds"][group], "diff"


def swap_rows(swaps: dict) -> Iterator[Row]:
    """Section 004's headline cells (``findings.json``'s ``swaps``; none in a run made before it): its VQA
    comparisons (bridge vs original and vs rebuild, fused vs control, ...), each swap's predicted change after
    tuning beside the measured one, the predictor's held-out rank correlation, and the cached stage 1's speed."""
    yield from _vqa_rows(swaps.get("comparisons", {}))
    for name, row in swaps.get("swaps", {}).items():
        yield f"swap {name} ({row['mode']}): predicted VQA change after tuning", row["predicted"], "change"
        yield f"swap {name} ({row['mode']}): measured VQA change after tuning", row["measured_tuned"], "diff"
    if calibration := swaps.get("calibration"):
        yield "predictor: leave-one-encoder-out Spearman", calibration, "spearman"
    if cached := swaps.get("cached_stage1"):
        yield "cached stage 1: speed ratio (live / cached)", cached, "speed_ratio"
        yield "cached stage 1: largest loss difference to the live tower", cached, "max_loss_diff"


def cell_text(cell: dict | None, key: str) -> str:
    """``value ± stderr (verdict)``, as much of it as the cell has (``-`` when the run lacks the row)."""
    if cell is None:
        return "-"
    v = cell[key]
    small = isinstance(v, float) and 0 < abs(v) < 1e-3  # e.g. a loss difference: 3 decimals would say 0
    value = f"{sig(cell['before'])} -> {sig(v)}" if key == "after" else sig(v) if small else num(v)
    se = f" ± {num(cell['stderr'])}" if "stderr" in cell else ""
    interval = f" [{num(cell['interval'][0])}, {num(cell['interval'][1])}]" if key == "change" else ""  # predicted
    verdict = verdict_of(cell)
    word = verdict if isinstance(verdict, str) else WORDS[key].get(verdict, "") if key in WORDS else ""
    return f"{value}{se}{interval}" + (f" ({word})" if word else "")


WORDS = {"drop": {True: "kept", False: "lost"}, "change": {True: "measured inside", False: "measured outside"}}


def verdict_of(cell: dict | None) -> str | bool | None:
    """A cell's verdict: its words, whether a zero-shot accuracy was kept, or whether a prediction's interval
    held the measured change (None: none)."""
    if cell is None:
        return None
    return cell.get("verdict", cell.get("kept", cell.get("measured_inside_interval")))


def read_findings(runs: Sequence[str | os.PathLike]) -> dict[str, dict]:
    """``{label: findings}`` of each run directory, labelled ``seed S`` (by the folder when seeds repeat)."""
    found = {}
    for run in runs:
        path = Path(run) / "findings.json"
        if not path.is_file():
            raise UserError(f"{run}: no findings.json; expected a finished `mllm-swap demo` run directory")
        found[str(run)] = read_json(path)
    seeds = [f["seed"] for f in found.values()]
    if len(set(seeds)) < len(seeds):
        return found
    return {f"seed {f['seed']}": f for f in found.values()}


def compare(found: dict[str, dict]) -> list[dict[str, Any]]:
    """One row per headline finding: each run's value and cell text, and whether their verdicts agree."""
    table: dict[str, dict[str, Any]] = {}
    for label, record in found.items():
        for name, cell, key in rows(record):
            row = table.setdefault(name, {"finding": name, "key": key, "values": {}, "cells": {}, "verdicts": {}})
            row["values"][label] = None if cell is None else cell[key]
            row["cells"][label] = cell_text(cell, key)
            row["verdicts"][label] = verdict_of(cell)
    for row in table.values():
        words = [row["verdicts"].get(label) for label in found]
        row["same_verdict"] = None if all(w is None for w in words) else len(set(words)) == 1
    return list(table.values())


def write_comparison(out: str | os.PathLike, runs: Sequence[str | os.PathLike]) -> Path:
    """Write ``out/comparison.md`` and ``out/comparison.json`` for the demo ``runs``; returns the markdown."""
    if len(runs) < 2:
        raise UserError(f"--compare: expected at least two demo run directories, found {len(runs)}")
    found = read_findings(runs)
    table = compare(found)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "comparison.json", {"runs": {label: os.path.relpath(run, out) for label, run in
                                                  zip(found, runs, strict=True)}, "rows": table})  # fmt: skip
    agree = {True: "yes", False: "no", None: "-"}
    body = markdown_table(["finding", *found, "same verdict"],
                          [[r["finding"], *[r["cells"].get(label, "-") for label in found], agree[r["same_verdict"]]]
                           for r in table])  # fmt: skip
    lines = [
        "# mllm-swap demo: runs side by side",
        "",
        "Each column is one demo run's `findings.json` (" + ", ".join(
            f"{label}: `{os.path.relpath(run, out)}`" for label, run in zip(found, runs, strict=True)) + "). "
        "Values ± standard error over held-out questions (or scenes), with each run's verdict; `same verdict`: "
        "whether every run reaches the same one (an effect of the method holds for every world seed, not one).",
        "",
        body,
    ]  # fmt: skip
    path = out / "comparison.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path
