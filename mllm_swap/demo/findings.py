"""``findings.json``: every headline number of the demo with its uncertainty, read from the files the tools
wrote, and the verdict words derived from those numbers (never written in advance).

Uncertainty: a score over held-out questions carries its standard error (sample sd / sqrt(n), as
lmms-eval reports it). A difference between two MLLMs is paired per question: per tuning seed the mean
of ``swapped - control`` over the same questions; across seeds the mean of the per-question differences
averaged over seeds, its standard error over questions (``stderr``), and the sd of the per-seed
differences (``seed_sd``, the spread over tuning seeds). A difference counts as an effect only when it
exceeds two standard errors and every seed agrees on its sign; otherwise the verdict says no clear
difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mllm_swap.demo.outputs import load_json, samples, zeroshot_results
from mllm_swap.demo.pipeline import (
    ARMS,
    CLIP_BLIND,
    EVAL,
    FREEZE,
    KINDS,
    KUEA,
    RANDOM_TOWERS,
    TEXT_ENCODERS,
    Plan,
    arm_model,
    eval_models,
    probe_towers,
    zeroshot_models,
)  # fmt: skip

MARGIN = 0.05  # zero-shot accuracy KUEA may lose and still count as kept
MMVP = "mmvp_pairs"  # the kind of a Shapes-MMVP pair (both of its questions right)
GROUPS = {**{k: (k,) for k in KINDS}, "clip_blind": CLIP_BLIND, "all": KINDS, MMVP: (MMVP,)}


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def sd(xs: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None below two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean, ``sd / sqrt(n)`` (0 below two values)."""
    s = sd(xs)
    return s / math.sqrt(len(xs)) if s is not None else 0.0


def verdict(diff: float, se: float, per_seed: Sequence[float] = ()) -> str:
    """``higher`` / ``lower`` when ``diff`` exceeds two standard errors and every seed agrees, else
    ``no clear difference``."""
    signs = list(per_seed) or [diff]
    if diff > 2 * se and all(d > 0 for d in signs):
        return "higher"
    if diff < -2 * se and all(d < 0 for d in signs):
        return "lower"
    return "no clear difference"


def vqa_scores(root: Path, plan: Plan) -> dict[str, dict[str, tuple[str, float]]]:
    """``{model: {question id: (kind, score)}}`` from lmms-eval's logged samples: ``shapes_vqa``'s exact
    match per question, and per Shapes-MMVP pair (kind :data:`MMVP`) whether both of its answers are right."""
    out = {}
    for section, models in eval_models(plan).items():
        for name in models:
            rows = samples(root / EVAL[section], name)
            out[name] = {s["doc"]["id"]: (s["doc"]["kind"], float(s["exact_match"])) for s in rows}
            pairs: dict[str, list[float]] = {}
            for s in samples(root / EVAL[section], name, "shapes_mmvp"):
                pairs.setdefault(f"mmvp-{s['doc']['pair']}", []).append(s["question_acc"])
            out[name].update({p: (MMVP, float(all(xs))) for p, xs in pairs.items() if len(xs) == 2})
    return out


def _ids(scores: dict, models: Sequence[str], kinds: Sequence[str]) -> list[str]:
    common = set.intersection(*(set(scores.get(m, {})) for m in models))
    return sorted(i for i in common if scores[models[0]][i][0] in kinds)


def vqa_table(scores: dict, groups: dict = GROUPS) -> dict[str, dict[str, dict]]:
    """Per model and question kind (and the CLIP-blind kinds, and all): accuracy, stderr, n."""
    out = {}
    for model, rows in scores.items():
        out[model] = {}
        for group, kinds in groups.items():
            xs = [x for kind, x in rows.values() if kind in kinds]
            if not xs:  # e.g. no Shapes-MMVP task was scored
                continue
            out[model][group] = {"accuracy": mean(xs), "stderr": stderr(xs), "n": len(xs)}
    return out


def arm_table(scores: dict, plan: Plan) -> dict[str, dict[str, dict]]:
    """Each tuned arm over its tuning seeds: accuracy (mean over seeds), stderr over questions of the
    seed-averaged answers, seed_sd, per kind."""
    out: dict[str, dict[str, dict]] = {}
    for arm in ARMS:
        models = [arm_model(arm, s)[0] for s in plan.tune_seeds]
        if not all(scores.get(m) for m in models):
            continue
        out[arm] = {}
        for group, kinds in GROUPS.items():
            ids = _ids(scores, models, kinds)
            if not ids:
                continue
            per_q = [mean([scores[m][i][1] for m in models]) for i in ids]
            per_seed = [mean([scores[m][i][1] for i in ids]) for m in models]
            out[arm][group] = {"accuracy": mean(per_q), "stderr": stderr(per_q), "seed_sd": sd(per_seed),
                               "per_seed": per_seed, "n": len(ids)}  # fmt: skip
    return out


def difference(scores: dict, pairs: Sequence[tuple[str, str]], kinds: Sequence[str]) -> dict[str, Any] | None:
    """Paired difference ``a - b`` over the same questions of ``kinds``, for each (a, b) of ``pairs`` (one per
    tuning seed): diff, stderr over questions, seed_sd, per_seed, n, verdict."""
    models = [m for pair in pairs for m in pair]
    if not all(scores.get(m) for m in models):
        return None
    ids = _ids(scores, models, kinds)
    if not ids:
        return None
    per_seed = [mean([scores[a][i][1] - scores[b][i][1] for i in ids]) for a, b in pairs]
    per_q = [mean([scores[a][i][1] - scores[b][i][1] for a, b in pairs]) for i in ids]
    diff, se = mean(per_q), stderr(per_q)
    return {"diff": diff, "stderr": se, "seed_sd": sd(per_seed), "per_seed": per_seed, "n": len(ids),
            "verdict": verdict(diff, se, per_seed)}  # fmt: skip


COMPARISONS = {  # name -> (swapped arm or model, control arm or model, what it is)
    "sail_vs_control": ("sail", "clip-rebuild", "SAIL tower rebuilt into the LLaVA vs the CLIP rebuilt the same "
                        "way, both tuned alike (connector, LoRA)"),
    "kuea_dropin_vs_base": ("kuea-dropin", "base", "KUEA CLIP dropped in with no tuning vs the original"),
    "kuea_vs_control": ("kuea", "clip", "KUEA drop-in vs the original, both given the same LoRA"),
}  # fmt: skip


def comparisons(scores: dict, plan: Plan, table: dict = COMPARISONS) -> dict[str, dict]:
    """Each swapped-vs-control difference of ``table`` (like :data:`COMPARISONS`) per question kind."""
    out = {}
    for name, (a, b, what) in table.items():
        if a in ARMS:
            pairs = [(arm_model(a, s)[0], arm_model(b, s)[0]) for s in plan.tune_seeds]
        else:
            pairs = [(a, b)]
        by_group = {g: cell for g, kinds in GROUPS.items() if (cell := difference(scores, pairs, kinds))}
        if by_group:
            out[name] = {"what": what, "pairs": [list(p) for p in pairs], "kinds": by_group}
    return out


def probes(root: Path, plan: Plan) -> dict[str, dict[str, dict[str, dict]]]:
    """``{tower: {feature: {attribute: {accuracy, stderr, chance, n_test}}}}`` from each ``probe.json``."""
    out: dict[str, dict] = {}
    for folder, towers in probe_towers(plan).items():
        record = load_json(root / folder / "probe.json")
        if not record:
            continue
        names = {str(spec): name for name, spec in towers.items()}
        for row in record["results"]:
            cell = {k: row[k] for k in ("accuracy", "stderr", "chance", "n_test")}
            out.setdefault(names[row["encoder"]], {}).setdefault(row["feature"], {})[row["attribute"]] = cell
    return out


def probe_differences(table: dict) -> dict[str, dict]:
    """Tower-vs-tower probe differences per feature and attribute (independent stderrs combined)."""
    out = {}
    for a, b in (("dino", "clip"), ("dino", "dino-random"), ("kuea", "clip")):
        if a not in table or b not in table:
            continue
        cells = {}
        for feature, attrs in table[a].items():
            for attr, x in attrs.items():
                y = table[b][feature][attr]
                diff, se = x["accuracy"] - y["accuracy"], math.hypot(x["stderr"], y["stderr"])
                cells.setdefault(feature, {})[attr] = {
                    "diff": diff,
                    "stderr": se,
                    "verdict": verdict(diff, se),
                }
        out[f"{a}_vs_{b}"] = cells
    return out


def zeroshot(root: Path, plan: Plan) -> dict[str, dict[str, dict]]:
    """Zero-shot accuracy per model and label with its stderr and chance, and whether it beats chance."""
    out = {}
    for section in zeroshot_models(plan):
        for model, labels in zeroshot_results(root / section / "zeroshot").items():
            out[model] = {}
            for label, r in labels.items():
                if label == "pairs":  # MMVP-VLM, in its own table
                    continue
                se = math.sqrt(r["acc1"] * (1 - r["acc1"]) / r["n"])
                above = "above chance" if r["acc1"] - r["chance"] > 2 * se else "not above chance"
                out[model][label] = {"acc1": r["acc1"], "stderr": se, "chance": r["chance"], "n": r["n"],
                                     "verdict": above}  # fmt: skip
    return out


def mmvp_vlm(root: Path, plan: Plan) -> dict[str, dict]:
    """MMVP-VLM of every dual encoder on the Shapes-MMVP pairs (``zeroshot --task pairs``)."""
    out = {}
    for section in zeroshot_models(plan):
        for model, labels in zeroshot_results(root / section / "zeroshot").items():
            if r := labels.get("pairs"):
                out[model] = {"score": r["mmvp_vlm"], "stderr": r["mmvp_vlm_stderr"], "chance": r["chance"],
                              "n": r["n"]}  # fmt: skip
    for a, b in (("kuea", "clip"), ("sail", "clip")):
        if a in out and b in out:  # the same pairs: independent stderrs combined (conservative)
            diff, se = out[a]["score"] - out[b]["score"], math.hypot(out[a]["stderr"], out[b]["stderr"])
            out[f"{a}_vs_{b}"] = {"diff": diff, "stderr": se, "verdict": verdict(diff, se)}
    return out


def kuea(root: Path) -> dict[str, dict]:
    """KUEA and its no-anchor ablation: kernel discrepancy to DINOv2 before/after, cosine to the original
    CLIP, zero-shot before/after with whether it stayed within :data:`MARGIN`."""
    out = {}
    for name, folder in (("kuea", "align"), ("kuea-noanchor", "align-noanchor")):
        report = load_json(root / KUEA / folder / "compat_report.json")
        if not report:
            continue
        kd = report["kernel_discrepancy"]
        zs = {label: {"before": z["acc_before"], "after": z["acc_after"], "drop": z["acc_before"] - z["acc_after"],
                      "chance": z["chance"], "kept": z["acc_before"] - z["acc_after"] <= MARGIN}
              for label, z in report["zeroshot"].items()}  # fmt: skip
        out[name] = {
            "kernel_discrepancy": {k: kd[k] for k in ("before", "after", "after_initial_kernel")},
            "kernel_drops": kd["after"] < kd["before"],  # with the trained kernel parameters
            "embeddings_drop": kd["after_initial_kernel"] < kd["before"],  # what the embeddings learned
            "cosine_to_original": report["cosine_to_original"]["mean"],
            "zeroshot": zs,
            "zeroshot_kept": all(z["kept"] for z in zs.values()),
        }
    return out


def ranking(root: Path, plan: Plan) -> dict[str, Any]:
    """Debiased CKA of every tower against each text encoder with its noise floor, and whether the tower
    ranks above every random one by more than twice the largest noise-floor sd."""
    scores = load_json(root / FREEZE / "rank" / "scores.json")
    if not scores:
        return {}
    names = {plan.clip: "clip", plan.dino: "dino"}
    table: dict[str, dict[str, dict]] = {}
    for p in scores["pairs"]:
        null = p["null"]["cka"]
        table.setdefault(p["text"], {})[names.get(p["vision"], p["vision"])] = {
            "cka": p["cka"], "null_mean": null["mean"], "null_sd": null["sd"]}  # fmt: skip
    verdicts = {}
    randoms = [r for r in RANDOM_TOWERS if r != plan.dino]  # none is the DINOv2 itself
    for text in TEXT_ENCODERS:
        rows = table.get(text, {})
        if "dino" not in rows or plan.dino in RANDOM_TOWERS or not all(r in rows for r in randoms):
            continue
        margin = rows["dino"]["cka"] - max(rows[r]["cka"] for r in randoms)
        floor = 2 * max(r["null_sd"] for r in rows.values())
        verdicts[text] = {"margin_over_best_random": margin, "two_null_sd": floor,
                          "verdict": "above every random tower" if margin > floor else "not clearly above"}  # fmt: skip
    toy = load_json(root / FREEZE / "toy" / "toy.json")
    toy_cell = None
    if toy:
        n, r = len(toy["points"]), toy["pearson_r"]
        half = 2 / math.sqrt(n - 3) if n > 3 else math.inf  # Fisher z interval, about 95 %
        low, high = math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)
        word = "negative" if high < 0 else "positive" if low > 0 else "not distinguishable from zero"
        toy_cell = {"pearson_r": r, "instances": n, "interval": [low, high], "verdict": word}
    return {"cka": table, "dino_vs_random": verdicts, "toy": toy_cell}


def collect(root: Path, plan: Plan) -> dict[str, Any]:
    """Every headline number, as written to ``findings.json``."""
    scores = vqa_scores(root, plan)
    probe = probes(root, plan)
    return {
        "seed": plan.seed,
        "tune_seeds": plan.tune_seeds,
        "probe": probe,
        "probe_differences": probe_differences(probe),
        "ranking": ranking(root, plan),
        "zeroshot": zeroshot(root, plan),
        "mmvp_vlm": mmvp_vlm(root, plan),
        "kuea": kuea(root),
        "vqa": vqa_table(scores),
        "vqa_arms": arm_table(scores, plan),
        "comparisons": comparisons(scores, plan),
        "clip_blind_kinds": list(CLIP_BLIND),
        "zeroshot_margin": MARGIN,
    }
