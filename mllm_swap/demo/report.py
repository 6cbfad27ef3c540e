"""``report.md`` for the demo: headline findings, every table and plot, and the command that made each.

Everything here is read back from the files the stages wrote (scores.json, zero-shot JSONs, swap reports,
training metrics, lmms-eval results and samples), so a report rebuilt after a rerun that skipped every
stage says the same thing.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from align.io import atomic_path, read_jsonl
from align.paths import locate
from align.plots import pyplot, save_figure
from mllm_swap.demo.steps import StageRecord

TRAINING_RUNS = {  # run folder -> panel title
    "align/sail": "SAIL (sigmoid)",
    "align/freeze_align": "freeze_align (InfoNCE)",
    "align/kuea": "KUEA (kernel + anchor)",
    "tune/base-lora": "base LLaVA: LoRA",
    "tune/sail-connector": "SAIL rebuild: connector",
    "tune/sail-lora": "SAIL rebuild: LoRA",
    "tune/control-connector": "control (base): connector",
    "tune/control-lora": "control (base): LoRA",
}
SWAPS = ("kuea-dropin", "sail-rebuild")


def _table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _image(root: Path, path: Path, alt: str) -> str:
    return f"![{alt}]({os.path.relpath(path, root)})" if path.is_file() else ""


# ---- data read back from the stages' outputs ----


def zeroshot_results(root: Path) -> dict[str, dict[str, dict]]:
    """``{model: {label: result}}`` from ``zeroshot/<model>-<label>/*.json``."""
    table: dict[str, dict[str, dict]] = defaultdict(dict)
    folder = root / "zeroshot"
    for run in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
        name, _, label = run.name.rpartition("-")
        result = next((_load(f) for f in sorted(run.glob("*.json"))), None)
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
    path = root / "eval" / model / "samples_shapes_vqa.jsonl"
    return read_jsonl(path) if path.is_file() else []


# ---- headline ----


def findings(root: Path) -> list[str]:
    """The few sentences a reader wants first, each computed from the outputs."""
    out = []
    zs = zeroshot_results(root)
    for label in ("color", "shape"):
        accs = {m: r[label]["acc1"] for m, r in zs.items() if label in r}
        if accs:
            best = max(accs, key=accs.__getitem__)
            chance = next(r[label]["chance"] for r in zs.values() if label in r)
            ranked = ", ".join(f"{m} {a:.3f}" for m, a in sorted(accs.items(), key=lambda kv: -kv[1]))
            out.append(f"Zero-shot {label}: best is **{best}** ({ranked}; chance {chance:.3f}).")
    drop = _load(root / "mllm" / "kuea-dropin" / "swap_report.json")
    if drop:
        d = drop["drift"]
        out.append(
            f"KUEA drop-in: the aligned CLIP replaces the LLaVA tower with no new weights; its features keep "
            f"cosine {d['cosine_mean']:.3f} to the old tower's and the next-token distribution moves by "
            f"KL {d['next_token_kl']:.4f}."
        )
    scored = eval_scores(root).get(("shapes_vqa", "exact_match"), {})
    vqa, err = ({m: pair[i] for m, pair in scored.items()} for i in (0, 1))
    if {"base", "base-tuned", "kuea-dropin", "sail-rebuild", "sail-lora"} <= vqa.keys():
        path = " -> ".join(
            f"{vqa[m]:.3f}" for m in ("sail-rebuild", "sail-connector", "sail-lora") if m in vqa
        )
        gap = vqa["sail-lora"] - vqa["base-tuned"]
        noise = 2 * math.hypot(err["sail-lora"], err["base-tuned"])
        verdict = "within" if abs(gap) <= noise else "beyond"
        out.append(
            f"Shapes VQA (exact match): the original scores {vqa['base']:.3f}, the KUEA drop-in with no "
            f"tuning {vqa['kuea-dropin']:.3f}. Rebuilt with the SAIL tower it goes {path} (untuned -> "
            f"connector -> LoRA); the original given the same extra tuning (the control) reaches "
            f"{vqa['base-tuned']:.3f}. SAIL minus control = {gap:+.3f}, {verdict} two standard errors "
            f"({noise:.3f})."
        )
    return out


# ---- sections ----


def data_section(root: Path) -> str:
    meta = _load(root / "shapes" / "meta.json")
    test = root / "shapes" / "vqa_test.jsonl"
    if not meta or not test.is_file():
        return ""
    images = list(dict.fromkeys(row["image"] for row in read_jsonl(test)))[:6]
    gallery = " ".join(_image(root, root / "shapes" / image, Path(image).stem) for image in images)
    counts = meta["counts"]
    return (
        f"{meta['n']} scenes of {meta['size']}x{meta['size']} pixels: {counts['train']} train, "
        f"{counts['test']} held out; every score below is on held-out scenes. Some of them:\n\n{gallery}"
    )


def score_section(root: Path) -> str:
    scores = _load(root / "score" / "scores.json")
    if not scores:
        return ""
    from mllm_swap.commands.score import null_note, score_cell, table_columns

    metrics = scores["metrics"]
    columns = table_columns(metrics)
    rows = [[p["vision"], p["text"], *[score_cell(p, c) for c in columns]] for p in scores["pairs"]]
    plots = " ".join(_image(root, root / "score" / f"heatmap_{m}.png", m) for m in metrics)
    return (
        "How alike each vision/text pair's similarity structure is on the same scenes (linear CKA, mutual "
        "k-nearest neighbours; higher is more alike). freeze_align picks its pair from such a ranking.\n\n"
        + _table(["vision", "text", *columns], rows)
        + "\n\n"
        + null_note(scores)
        + "\n\n"
        + plots
    )


def training_section(root: Path, runs: list[str]) -> str:
    """Loss curves of ``runs`` (keys of TRAINING_RUNS) in one figure."""
    curves = {
        r: read_jsonl(root / r / "metrics.jsonl") for r in runs if (root / r / "metrics.jsonl").is_file()
    }
    curves = {r: rows for r, rows in curves.items() if any("loss" in row for row in rows)}
    if not curves:
        return ""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(3.3 * len(curves), 2.6), squeeze=False)
    for ax, (run, rows) in zip(axes.flat, curves.items(), strict=True):
        points = [(row["step"], row["loss"]) for row in rows if "loss" in row]
        ax.plot(*zip(*points, strict=True), marker=".", markersize=3)
        ax.set_title(TRAINING_RUNS[run], fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("training loss", fontsize=8)
    fig.tight_layout()
    name = "loss_" + "_".join(Path(r).name for r in curves) + ".png"
    path = save_figure(fig, root / "figures" / name, dpi=110)
    finals = ", ".join(f"{TRAINING_RUNS[r]} {rows[-1]['loss']:.3f}" for r, rows in curves.items())
    return f"{_image(root, path, 'training loss')}\n\nFinal logged loss: {finals}."


def zeroshot_section(root: Path) -> str:
    zs = zeroshot_results(root)
    if not zs:
        return ""
    labels = ("color", "shape")
    rows = [[m, *[r[label]["acc1"] if label in r else "-" for label in labels]] for m, r in zs.items()]
    any_result = next(iter(zs.values()))
    for base in ("chance", "majority"):
        rows.append([base, *[any_result[label][base] if label in any_result else "-" for label in labels]])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    width = 0.8 / len(labels)
    for j, label in enumerate(labels):
        values = [zs[m][label]["acc1"] if label in zs[m] else 0.0 for m in zs]
        ax.bar([i + j * width for i in range(len(zs))], values, width, label=label)
        if label in any_result:
            ax.axhline(any_result[label]["chance"], color=f"C{j}", linestyle=":", linewidth=1)
    ax.set_xticks([i + width / 2 for i in range(len(zs))], list(zs), fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("acc1 (dotted: chance)", fontsize=8)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = save_figure(fig, root / "figures" / "zeroshot.png", dpi=110)
    return (
        "Each model's image embedding against its own text tower's embeddings of class prompts "
        "(held-out scenes; `clip` is the CLIP the original LLaVA uses, the others are the three alignments).\n\n"
        + _table(["model", "colour acc1", "shape acc1"], rows)
        + "\n\n"
        + _image(root, path, "zero-shot accuracy")
    )


def swap_section(root: Path) -> str:
    rows = []
    for name in SWAPS:
        report = _load(root / "mllm" / name / "swap_report.json")
        if not report:
            continue
        d, old, new = report["drift"], report["old_tower"], report["new_tower"]
        rows.append(
            [
                name,
                report["mode"],
                f"{old.get('width')} -> {new.get('width')}",
                f"{old.get('image_tokens')} -> {new.get('image_tokens')}",
                d.get("cosine_mean"),
                d.get("next_token_kl"),
                ", ".join(report["untrained"]) or "none",
            ]
        )
    if not rows:
        return ""
    header = ["swap", "mode", "width", "image tokens", "feature cosine", "next-token KL", "untrained"]
    return (
        "A drop-in keeps the connector, so the new tower's features can be compared with the old one's "
        "(cosine) and so can the LLM's next-token distribution (KL). A rebuild changes the width, so the "
        "connector is new and untrained until the next stage: no drift is defined.\n\n" + _table(header, rows)
    )


def _vqa_by_kind(root: Path, models: list[str]) -> str:
    per: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in models}
    for m in models:
        for s in vqa_samples(root, m):
            per[m][s["doc"].get("kind") or "all"].append(float(s["exact_match"]))
    kinds = sorted({k for m in models for k in per[m]})
    if not kinds:
        return ""
    rows = [[k, *[sum(v) / len(v) if (v := per[m].get(k)) else "-" for m in models]] for k in kinds]
    return "Shapes VQA exact match by question kind:\n\n" + _table(["kind", *models], rows)


def _gallery(root: Path, models: list[str], n: int = 4) -> str:
    samples = {m: {s["doc"]["id"]: s for s in vqa_samples(root, m)} for m in models}
    shown = next((m for m in models if samples[m]), None)
    first = samples[shown] if shown else {}
    rows = []
    for doc_id in list(first)[:: max(1, len(first) // n)][:n]:
        doc = first[doc_id]["doc"]
        answers = [
            samples[m][doc_id]["filtered_resps"][0].strip() if doc_id in samples[m] else "-" for m in models
        ]
        image = Path(locate(doc["image"], root / "eval" / shown))  # recorded relative to its samples file
        rows.append([_image(root, image, doc["id"]), doc["question"], doc["answer"], *answers])
    return _table(["image", "question", "answer", *models], rows) if rows else ""


def eval_section(root: Path) -> str:
    md = root / "eval" / "comparison.md"
    if not md.is_file():
        return ""
    models, comparison = list(next(iter(eval_scores(root).values()), {})), md.read_text()
    parts = [
        "Every model scored by lmms-eval through the `mllm_swap` model plugin: `shapes_vqa` is open answer "
        "(exact match), `shapes_mc` picks one of four options by log-likelihood (chance 0.25).",
        comparison[comparison.find("\n|") + 1 :].strip(),  # its title and command are in this report
        _image(root, root / "eval" / "comparison.png", "scores"),
        _vqa_by_kind(root, models),
        _gallery(root, models),
    ]
    return "\n\n".join(p for p in parts if p)


def _curves(*runs: str) -> Callable[[Path], str]:
    return partial(training_section, runs=list(runs))


SECTIONS = {
    "data": data_section,
    "score": score_section,
    "align-sail": _curves("align/sail"),
    "align-freeze_align": _curves("align/freeze_align"),
    "align-kuea": _curves("align/kuea"),
    "zeroshot": zeroshot_section,
    "base": _curves("tune/base-lora"),
    "swap": swap_section,
    "tune": _curves("tune/sail-connector", "tune/sail-lora", "tune/control-connector", "tune/control-lora"),
    "eval": eval_section,
}


def write_report(root: Path, records: list[StageRecord]) -> Path:
    """Write ``root/report.md`` from the stages' records and the files they produced."""
    total = sum(r.seconds for r in records)
    parts = [
        "# mllm-swap demo report",
        "",
        "The embedded default end to end: tiny encoders and a tiny LLaVA built offline, the procedural shapes "
        "world, every step run through the same `mllm-swap` commands a user types (listed per stage, run from this "
        "directory).",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in findings(root)],
        "",
        "## Stages",
        "",
        _table(
            ["stage", "seconds", "status"],
            [
                [r.title, f"{r.seconds:.1f}", "skipped (outputs verified)" if r.skipped else "ran"]
                for r in records
            ],
        ),
        "",
        f"Total compute recorded: {total:.0f} s (time of the runs that made the outputs, skipped stages included).",
    ]
    for record in records:
        parts += ["", f"## {record.title}", "", "```", record.command, "```"]
        body = SECTIONS.get(record.name)
        text = body(root) if body else ""
        if text:
            parts += ["", text]
    report = root / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    return report
