"""The demo's stage outputs read back (zero-shot JSONs, probe and rank records, KUEA's compatibility report,
lmms-eval's logged samples), so that a report rebuilt after a rerun that skipped every stage says the same
thing."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from align.io import read_jsonl


def load_json(path: Path) -> Any:
    """The JSON in ``path``, or None when there is no such file."""
    return json.loads(path.read_text()) if path.is_file() else None


def zeroshot_results(folder: Path) -> dict[str, dict[str, dict]]:
    """``{model: {label: result}}`` from ``folder/<model>-<label>/*.json``."""
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        name, _, label = run.name.rpartition("-")
        result = next((load_json(f) for f in sorted(run.glob("*.json"))), None)
        if result is not None:
            table[name][label] = result
    return dict(table)


def samples(eval_dir: Path, model: str, task: str = "shapes_vqa") -> list[dict]:
    """lmms-eval's logged samples of ``task`` for ``model`` (none when it was not scored)."""
    path = eval_dir / model / f"samples_{task}.jsonl"
    return read_jsonl(path) if path.is_file() else []
