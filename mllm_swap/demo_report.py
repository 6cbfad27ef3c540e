"""``report.md`` for the demo: every table and plot, and the command that made each."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mllm_swap.stages import StageRecord


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _image(root: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({os.path.relpath(path, root)})" if path.is_file() else ""


def score_section(root: Path) -> str:
    scores = _load(root / "score" / "scores.json")
    if not scores:
        return ""
    metrics = [k for k in scores["pairs"][0] if k not in ("vision", "text")]
    rows = [[p["vision"], p["text"], *[p[m] for m in metrics]] for p in scores["pairs"]]
    plots = " ".join(_image(root, root / "score" / f"heatmap_{m}.png", m) for m in metrics)
    return _table(["vision", "text", *metrics], rows) + "\n\n" + plots


def _accuracy(result: Any) -> float | None:
    """acc1 from a zero-shot result JSON, wherever the writer nests it."""
    if isinstance(result, dict):
        if isinstance(result.get("acc1"), int | float):
            return float(result["acc1"])
        for value in result.values():
            found = _accuracy(value)
            if found is not None:
                return found
    return None


def zeroshot_section(root: Path) -> str:
    folder = root / "zeroshot"
    if not folder.is_dir():
        return ""
    table: dict[str, dict[str, float | None]] = {}
    for run in sorted(p for p in folder.iterdir() if p.is_dir()):
        name, _, label = run.name.rpartition("-")
        result = next((_load(f) for f in sorted(run.glob("*.json"))), None)
        table.setdefault(name, {})[label] = _accuracy(result)
    colours, shapes = (
        json.loads((root / "shapes" / "classes.json").read_text())[k] for k in ("color", "shape")
    )
    rows = [[name, accs.get("color"), accs.get("shape")] for name, accs in table.items()]
    rows.append(["chance", 1 / len(colours), 1 / len(shapes)])
    return _table(["model", "colour acc1", "shape acc1"], rows)


def swap_section(root: Path) -> str:
    rows = []
    for name in ("kuea-dropin", "sail-rebuild"):
        report = _load(root / "mllm" / name / "swap_report.json")
        if not report:
            continue
        d, old, new = report["drift"], report["old_tower"], report["new_tower"]
        drift = d.get("cosine_mean", d.get("linear_cka"))
        rows.append(
            [
                name,
                report["mode"],
                f"{old.get('width')} -> {new.get('width')}",
                f"{old.get('image_tokens')} -> {new.get('image_tokens')}",
                drift if drift is not None else "-",
                d.get("next_token_kl", "-"),
                ", ".join(report["untrained"]) or "none",
            ]
        )
    header = [
        "swap",
        "mode",
        "width",
        "image tokens",
        "feature drift (cosine/CKA)",
        "next-token KL",
        "untrained",
    ]
    return _table(header, rows) if rows else ""


def eval_section(root: Path) -> str:
    md = root / "eval" / "comparison.md"
    if not md.is_file():
        return ""
    return md.read_text().strip() + "\n\n" + _image(root, root / "eval" / "comparison.png", "scores")


SECTIONS = {"score": score_section, "zeroshot": zeroshot_section, "swap": swap_section, "eval": eval_section}


def write_report(root: Path, records: list[StageRecord]) -> Path:
    """Write ``root/report.md`` from the stages' records and the files they produced."""
    total = sum(r.seconds for r in records)
    parts = [
        "# mllm-swap demo report",
        "",
        "The embedded default end to end: tiny encoders and a tiny LLaVA built offline, the procedural shapes "
        "world, every step run through the same `mllm-swap` commands a user types (listed per stage).",
        "",
        _table(
            ["stage", "seconds", "status"],
            [[r.title, r.seconds, "skipped (outputs verified)" if r.skipped else "ran"] for r in records],
        ),
        "",
        f"Total compute recorded: {total:.0f} s.",
    ]
    for record in records:
        parts += ["", f"## {record.title}", "", "```", record.command, "```"]
        body = SECTIONS.get(record.name)
        if body is not None:
            text = body(root)
            if text:
                parts += ["", text]
    report = root / "report.md"
    report.write_text("\n".join(parts) + "\n")
    return report
