"""``report.md`` for the demo: headline findings, the stages' table, then per stage the command that made it
and its section (:mod:`mllm_swap.demo.sections`).

Everything here is read back from the files the stages wrote (:mod:`mllm_swap.demo.outputs`), so a report
rebuilt after a rerun that skipped every stage says the same thing.
"""

from __future__ import annotations

import math
from pathlib import Path

from align.io import atomic_path
from mllm_swap.demo.outputs import eval_scores, load_json, zeroshot_results
from mllm_swap.demo.sections import SECTIONS, markdown_table
from mllm_swap.demo.stages import StageRecord


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
    drop = load_json(root / "mllm" / "kuea-dropin" / "swap_report.json")
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
        markdown_table(
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
