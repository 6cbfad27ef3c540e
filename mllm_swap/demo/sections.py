"""The demo report's sections, one per stage (:data:`SECTIONS`): markdown tables, figures and the prose
that says what they show, each built from the files that stage wrote."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from align.evals.pairs import null_note, score_cell, table_columns
from align.io import read_jsonl
from align.paths import locate
from align.plots import pyplot, save_figure
from mllm_swap.demo.outputs import eval_scores, load_json, vqa_samples, zeroshot_results

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


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; floats with 3 decimals, None as ``-``."""

    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image_link(root: Path, path: Path, alt: str) -> str:
    """A markdown image of ``path`` relative to ``root`` (nothing when the file is missing)."""
    return f"![{alt}]({os.path.relpath(path, root)})" if path.is_file() else ""


def data_section(root: Path) -> str:
    meta = load_json(root / "shapes" / "meta.json")
    test = root / "shapes" / "vqa_test.jsonl"
    if not meta or not test.is_file():
        return ""
    images = list(dict.fromkeys(row["image"] for row in read_jsonl(test)))[:6]
    gallery = " ".join(image_link(root, root / "shapes" / image, Path(image).stem) for image in images)
    counts = meta["counts"]
    return (
        f"{meta['n']} scenes of {meta['size']}x{meta['size']} pixels: {counts['train']} train, "
        f"{counts['test']} held out; every score below is on held-out scenes. Some of them:\n\n{gallery}"
    )


def score_section(root: Path) -> str:
    scores = load_json(root / "score" / "scores.json")
    if not scores:
        return ""
    metrics = scores["metrics"]
    columns = table_columns(metrics)
    rows = [[p["vision"], p["text"], *[score_cell(p, c) for c in columns]] for p in scores["pairs"]]
    plots = " ".join(image_link(root, root / "score" / f"heatmap_{m}.png", m) for m in metrics)
    return (
        "How alike each vision/text pair's similarity structure is on the same scenes (linear CKA, mutual "
        "k-nearest neighbours; higher is more alike). freeze_align picks its pair from such a ranking.\n\n"
        + markdown_table(["vision", "text", *columns], rows)
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
    return f"{image_link(root, path, 'training loss')}\n\nFinal logged loss: {finals}."


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
        + markdown_table(["model", "colour acc1", "shape acc1"], rows)
        + "\n\n"
        + image_link(root, path, "zero-shot accuracy")
    )


def swap_section(root: Path) -> str:
    rows = []
    for name in SWAPS:
        report = load_json(root / "mllm" / name / "swap_report.json")
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
        "connector is new and untrained until the next stage: no drift is defined.\n\n"
        + markdown_table(header, rows)
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
    return "Shapes VQA exact match by question kind:\n\n" + markdown_table(["kind", *models], rows)


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
        rows.append([image_link(root, image, doc["id"]), doc["question"], doc["answer"], *answers])
    return markdown_table(["image", "question", "answer", *models], rows) if rows else ""


def eval_section(root: Path) -> str:
    md = root / "eval" / "comparison.md"
    if not md.is_file():
        return ""
    models, comparison = list(next(iter(eval_scores(root).values()), {})), md.read_text()
    parts = [
        "Every model scored by lmms-eval through the `mllm_swap` model plugin: `shapes_vqa` is open answer "
        "(exact match), `shapes_mc` picks one of four options by log-likelihood (chance 0.25).",
        comparison[comparison.find("\n|") + 1 :].strip(),  # its title and command are in this report
        image_link(root, root / "eval" / "comparison.png", "scores"),
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
