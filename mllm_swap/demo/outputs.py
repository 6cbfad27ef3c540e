"""The demo's stage outputs read back (zero-shot JSONs, lmms-eval's comparison and samples, any JSON file),
so that a report rebuilt after a rerun that skipped every stage says the same thing."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from align.io import read_jsonl


def load_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def zeroshot_results(root: Path) -> dict[str, dict[str, dict]]:
    """``{model: {label: result}}`` from ``zeroshot/<model>-<label>/*.json``."""
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    folder = root / "zeroshot"
    for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        name, _, label = run.name.rpartition("-")
        result = next((load_json(f) for f in sorted(run.glob("*.json"))), None)
        if result is not None:
            table[name][label] = result
    return dict(table)


def eval_scores(root: Path) -> dict[tuple[str, str], dict[str, tuple[float, float]]]:
    """``{(task, metric): {model: (value, stderr)}}`` from lmms-eval's comparison CSV, models in the
    order the eval stage listed them."""
    path = root / "eval" / "comparison.csv"
    scores: dict[tuple[str, str], dict[str, tuple[float, float]]] = defaultdict(dict)
    if path.is_file():
        with path.open() as f:
            for row in csv.DictReader(f):
                err = float(row["stderr"]) if row["stderr"] else math.nan
                scores[(row["task"], row["metric"])][row["model"]] = (float(row["value"]), err)
    return dict(scores)


def vqa_samples(root: Path, model: str) -> list[dict]:
    """lmms-eval's logged ``shapes_vqa`` samples of ``model`` (none when it was not scored)."""
    path = root / "eval" / model / "samples_shapes_vqa.jsonl"
    return read_jsonl(path) if path.is_file() else []
