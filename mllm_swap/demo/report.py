"""``report.md`` and ``findings.json`` for the demo: the headline findings (sentences whose every word of
judgement comes from the numbers, :mod:`mllm_swap.demo.findings`), the stages' table, then per story section
each stage's command and its tables and plots (:mod:`mllm_swap.demo.sections`).

Everything here is read back from the files the stages wrote, so a report rebuilt after a rerun that
skipped every stage says the same thing.
"""

from __future__ import annotations

from pathlib import Path

from align.io import atomic_path, write_json
from mllm_swap.demo.findings import MARGIN, MMVP, collect
from mllm_swap.demo.pipeline import CLIP_BLIND, SECTIONS, Plan
from mllm_swap.demo.sections import markdown_table, num, pm, sig, stage_sections
from mllm_swap.demo.stages import StageRecord
from mllm_swap.demo.swaps import swap_findings, swap_sections

EFFECT = {
    "higher": "higher, beyond two standard errors with every seed agreeing",
    "lower": "lower, beyond two standard errors with every seed agreeing",
    "no clear difference": "no clear difference: the effect does not appear at this scale",
}


def headlines(found: dict) -> list[str]:
    """The sentences a reader wants first, each computed from ``found`` (the findings record)."""
    out = []
    for name, cells in found["probe_differences"].items():
        feature = cells.get("patch_mean", {})
        parts = [
            f"{a} {pm(feature[a], 'diff')} ({feature[a]['verdict']})" for a in CLIP_BLIND if a in feature
        ]
        out.append(f"Probe accuracy, {name.replace('_vs_', ' minus ')} (patch tokens the connector sees): "
                   + "; ".join(parts) + ".")  # fmt: skip
    ranking = found["ranking"]
    for text, v in ranking.get("dino_vs_random", {}).items():
        out.append(f"Debiased CKA against {text}: the DINOv2 is {v['verdict']} (margin "
                   f"{num(v['margin_over_best_random'])}, two noise-floor sd {num(v['two_null_sd'])}).")  # fmt: skip
    if toy := ranking.get("toy"):
        out.append(f"Toy CKA vs CLIP loss: Pearson r {num(toy['pearson_r'])} over {toy['instances']} instances "
                   f"({toy['verdict']}).")  # fmt: skip
    for model in ("freeze_align", "sail"):
        if zs := found["zeroshot"].get(model):
            cells = "; ".join(f"{label} {pm(c, 'acc1')} vs chance {num(c['chance'])}: {c['verdict']}"
                              for label, c in zs.items())  # fmt: skip
            out.append(f"Zero-shot {model}: {cells}.")
    for name, k in found["kuea"].items():
        kd = k["kernel_discrepancy"]
        zs = "; ".join(
            f"{label} {num(z['before'])} -> {num(z['after'])}" for label, z in k["zeroshot"].items()
        )
        kept = (f"kept within {MARGIN}" if k["zeroshot_kept"]
                else f"lost more than {MARGIN}" + (" (the ablation collapses)" if name == "kuea-noanchor" else ""))  # fmt: skip
        drops = {True: "drops", False: "does not drop"}
        out.append(f"{name}: kernel discrepancy to DINOv2 {sig(kd['before'])} -> {sig(kd['after'])} with the "
                   f"trained kernel ({drops[k['kernel_drops']]}), {sig(kd['after_initial_kernel'])} with the initial "
                   f"kernel, i.e. what the embeddings learned ({drops[k['embeddings_drop']]}); zero-shot {zs}: "
                   f"{kept}; cosine to the original CLIP {num(k['cosine_to_original'])}.")  # fmt: skip
    for name, v in found.get("mmvp_vlm", {}).items():
        if "_vs_" in name:
            out.append(f"MMVP-VLM on the Shapes-MMVP pairs, {name.replace('_vs_', ' minus ')}: {pm(v, 'diff')} "
                       f"({v['verdict']}).")  # fmt: skip
    seeds = len(found["tune_seeds"])
    where = {
        "color": "on colour (what the CLIP's captions name)",
        "shape": "on shape (what the CLIP's captions name)",
        "clip_blind": f"on the CLIP-blind questions ({', '.join(CLIP_BLIND)})",
        MMVP: "on the Shapes-MMVP pairs",
    }
    for c in found["comparisons"].values():
        for group, words in where.items():
            if not (d := c["kinds"].get(group)):
                continue
            spread = (
                f"seed sd {num(d['seed_sd'])} over {seeds} tuning seeds"
                if d["seed_sd"] is not None
                else "1 seed"
            )
            out.append(f"{c['what']}, {words}: {pm(d, 'diff')} over {d['n']} "
                       f"{'pairs' if group == MMVP else 'questions'} ({spread}): {EFFECT[d['verdict']]}.")  # fmt: skip
    return out


def write_report(root: Path, records: list[StageRecord], plan: Plan) -> Path:
    """Write ``root/findings.json`` and ``root/report.md`` from the stages' records and the files they wrote."""
    found = collect(root, plan)
    found["swaps"] = swap_findings(root, plan, found["comparisons"])
    write_json(root / "findings.json", found)
    total = sum(r.seconds for r in records)
    parts = [
        "# mllm-swap demo report",
        "",
        f"The embedded default end to end, generated from seed {plan.seed} (the shapes world, every alignment "
        f"and the LLaVA; tuning seeds {', '.join(map(str, plan.tune_seeds))}): tiny models built offline, every "
        "step run through the same `mllm-swap` commands a user types (listed per stage, run from this "
        "directory). Every number below is in `findings.json`.",
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in headlines(found)],
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
        f"Total compute recorded: {total:.0f} s (time of the runs that made the outputs, skipped stages included; "
        "stages that ran at once, `--jobs`, each counted whole).",
    ]
    bodies = stage_sections(plan.tune_seeds) | swap_sections()
    for folder, story in SECTIONS.items():
        parts += ["", f"## {folder}: {story}"]
        for record in (r for r in records if r.name.startswith(folder)):
            parts += ["", f"### {record.title}", "", "```", record.command, "```"]
            if text := bodies.get(record.name, lambda root, f: "")(root, found):
                parts += ["", text]
    report = root / "report.md"
    with atomic_path(report) as tmp:
        tmp.write_text("\n".join(parts) + "\n")
    return report
