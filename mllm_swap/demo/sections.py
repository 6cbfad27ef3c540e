"""The demo report's per-stage sections (:data:`STAGE_SECTIONS`): markdown tables, figures and the prose
that says what they show. Every number in a table comes from ``findings.json``'s record
(:mod:`mllm_swap.demo.findings`), formatted with :func:`num`, so the two always agree."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from align.io import read_jsonl
from align.plots import pyplot, save_figure
from mllm_swap.demo.findings import GROUPS, MARGIN, MMVP
from mllm_swap.demo.outputs import load_json
from mllm_swap.demo.pipeline import EVAL, FREEZE, KINDS, KUEA, SAIL, SHAPES, SWAPS, WORLD, section_arms

Section = Callable[[Path, dict], str]


def num(v: Any) -> str:
    """A number as every table shows it: 3 decimals (``-`` for None)."""
    return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def sig(v: float) -> str:
    """A small positive quantity (a kernel discrepancy) with 4 significant digits."""
    return f"{v:.4g}"


def pm(cell: dict, key: str = "accuracy") -> str:
    """``value ± stderr``."""
    return f"{num(cell[key])} ± {num(cell['stderr'])}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; numbers through :func:`num`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(num(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def image_link(root: Path, path: Path, alt: str) -> str:
    """A markdown image of ``path`` relative to ``root`` (nothing when the file is missing)."""
    return f"![{alt}]({os.path.relpath(path, root)})" if path.is_file() else ""


def data_section(root: Path, found: dict) -> str:
    meta = load_json(root / SHAPES / "meta.json")
    test = root / SHAPES / "vqa_test.jsonl"
    if not meta or not test.is_file():
        return ""
    images = list(dict.fromkeys(row["image"] for row in read_jsonl(test)))[:6]
    gallery = " ".join(image_link(root, root / SHAPES / image, Path(image).stem) for image in images)
    counts = meta["counts"]
    return (
        f"{meta['n']} scenes of {meta['size']}x{meta['size']} pixels from seed {meta['seed']}: {counts['train']} "
        f"train, {counts['test']} held out; every score below is on held-out scenes. Some of them:\n\n{gallery}"
    )


def probe_section(root: Path, found: dict, folder: Path = WORLD) -> str:
    towers = {t: found["probe"][t] for t in found["probe"] if (folder == KUEA) == (t == "kuea")}
    if not towers:
        return ""
    any_feature = next(iter(next(iter(towers.values())).values()))
    labels = [a for a in KINDS if a in any_feature]  # the attributes probed
    rows = [[tower, feature, *[pm(attrs[a]) for a in labels]]
            for tower, features in towers.items() for feature, attrs in features.items()]  # fmt: skip
    rows.append(["chance", "", *[num(any_feature[a]["chance"]) for a in labels]])
    diffs = [[f"{name}: {feature}", *[f"{pm(c[a], 'diff')} ({c[a]['verdict']})" for a in labels]]
             for name, features in found["probe_differences"].items() if (folder == KUEA) == name.startswith("kuea")
             for feature, c in features.items()]  # fmt: skip
    return (
        "Linear probes (`mllm-swap probe`): a logistic regression on frozen features of the train split, scored "
        "on held-out scenes (accuracy ± standard error). `cls` is the global embedding, `patch_mean` the patch "
        "tokens the LLaVA's connector sees, mean-pooled.\n\n"
        + markdown_table(["tower", "feature", *labels], rows)
        + "\n\nDifferences (± combined standard error; a verdict needs more than two):\n\n"
        + markdown_table(["towers: feature", *labels], diffs)
        + "\n\n"
        + image_link(root, root / folder / "probe" / "probe.png", "probe accuracy")
    )


def rank_section(root: Path, found: dict) -> str:
    ranking = found["ranking"]
    if not ranking:
        return ""
    texts = list(ranking["cka"])
    visions = list(dict.fromkeys(v for t in texts for v in ranking["cka"][t]))
    rows = [[v, *[f"{num(c['cka'])} (null {num(c['null_mean'])} ± {num(c['null_sd'])})"
                  for t in texts if (c := ranking["cka"][t].get(v))]] for v in visions]  # fmt: skip
    lines = [f"- against {t}: DINOv2 minus the best random tower = {num(v['margin_over_best_random'])} "
             f"(two noise-floor sd: {num(v['two_null_sd'])}): {v['verdict']}."
             for t, v in ranking["dino_vs_random"].items()]  # fmt: skip
    toy = ranking["toy"]
    if toy:
        lines.append(f"- toy ({toy['instances']} instances): Pearson r between linear CKA and the CLIP loss "
                     f"reached = {num(toy['pearson_r'])} (95 % interval {num(toy['interval'][0])} to "
                     f"{num(toy['interval'][1])}): {toy['verdict']}.")  # fmt: skip
    plots = " ".join(
        image_link(root, root / FREEZE / "rank" / f"heatmap_{m}.png", m) for m in ("cka", "mknn")
    )
    return (
        "Debiased linear CKA (unbiased HSIC) of each vision tower's features against each text encoder's, on the "
        "same held-out scenes, with its noise floor (the CKA against row-shuffled text features, mean ± sd). "
        "`dino-random`-like ids are randomly initialised towers: the floor a tower must beat to have learned "
        "anything language can use.\n\n"
        + markdown_table(["vision", *texts], rows)
        + "\n\n" + "\n".join(lines) + "\n\n" + plots + " "
        + image_link(root, root / FREEZE / "toy" / "toy.png", "toy")
    )  # fmt: skip


def zeroshot_section(root: Path, found: dict, models: tuple[str, ...]) -> str:
    zs = {m: found["zeroshot"][m] for m in models if m in found["zeroshot"]}
    if not zs:
        return ""
    rows = [[m, *[f"{pm(r[label], 'acc1')} (chance {num(r[label]['chance'])}, {r[label]['verdict']})"
                  for label in ("color", "shape")]] for m, r in zs.items()]  # fmt: skip
    mmvp = [[m, f"{pm(v, 'score')} (chance {num(v['chance'])}, {v['n']} pairs)"]
            for m in models if (v := found["mmvp_vlm"].get(m))]  # fmt: skip
    vlm = (
        "\n\nMMVP-VLM on the Shapes-MMVP pairs (`zeroshot --task pairs`): a CLIP-blind pair counts when each "
        "image picks its own statement (± standard error).\n\n" + markdown_table(["model", "MMVP-VLM"], mmvp)
    )
    return (
        "Zero-shot classification of held-out scenes: each model's image embedding against its own text "
        "tower's class prompts (acc1 ± standard error).\n\n"
        + markdown_table(["model", "colour", "shape"], rows)
        + (vlm if mmvp else "")
    )


def training_section(root: Path, runs: list[str]) -> str:
    """Loss curves of the training ``runs`` (folders with a ``metrics.jsonl``) in one figure."""
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
        ax.set_title(run, fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes.flat[0].set_ylabel("training loss", fontsize=8)
    fig.tight_layout()
    name = "loss_" + "_".join(r.replace("/", "-") for r in curves) + ".png"
    path = save_figure(fig, root / "figures" / name, dpi=110)
    finals = ", ".join(f"{r} {num(rows[-1]['loss'])}" for r, rows in curves.items())
    return f"{image_link(root, path, 'training loss')}\n\nFinal logged loss: {finals}."


def vqa_section(
    root: Path, found: dict, section: Path, models: list[str], arms: list[str], comparisons: list[str]
) -> str:
    groups = [g for g in GROUPS if any(g in found["vqa"][m] for m in models if m in found["vqa"])]
    rows = [[m, *[pm(found["vqa"][m][g]) for g in groups]] for m in models if m in found["vqa"]]
    rows += [[f"{arm} (mean over {len(a['all']['per_seed'])} seed(s))",
              *[f"{pm(a[g])} (seed sd {num(a[g]['seed_sd'])})" for g in groups]]
             for arm in arms if (a := found["vqa_arms"].get(arm))]  # fmt: skip
    diffs = [[name, *[f"{pm(c['kinds'][g], 'diff')} (seed sd {num(c['kinds'][g]['seed_sd'])}; {c['kinds'][g]['verdict']})"
                      for g in groups]] for name in comparisons if (c := found["comparisons"].get(name))]  # fmt: skip
    if not rows:
        return ""
    return (
        "lmms-eval `shapes_vqa` (open answer, exact match) on held-out questions, by question kind "
        f"(`clip_blind`: {', '.join(found['clip_blind_kinds'])}); accuracy ± standard error over questions. A "
        "tuned arm is averaged over its tuning seeds (seed sd: the spread of the per-seed accuracies). "
        f"`{MMVP}`: lmms-eval `shapes_mmvp`, a CLIP-blind pair counts only when both answers are right "
        "(chance 0.25).\n\n"
        + markdown_table(["model", *groups], rows)
        + "\n\nSwapped minus control, paired per question (± standard error over questions; seed sd over tuning "
        "seeds; a verdict needs more than two standard errors and every seed agreeing):\n\n"
        + markdown_table(["comparison", *groups], diffs)
        + "\n\n" + image_link(root, root / EVAL[section.name] / "comparison.png", "scores")
    )  # fmt: skip


def kuea_section(root: Path, found: dict) -> str:
    rows = []
    for name, k in found["kuea"].items():
        kd = k["kernel_discrepancy"]
        zs = [
            f"{num(z['before'])} -> {num(z['after'])} ({'kept' if z['kept'] else 'lost'})"
            for z in k["zeroshot"].values()
        ]
        rows.append([name, sig(kd["before"]), sig(kd["after"]), sig(kd["after_initial_kernel"]),
                     num(k["cosine_to_original"]), *zs])  # fmt: skip
    if not rows:
        return ""
    labels = list(next(iter(found["kuea"].values()))["zeroshot"])
    return (
        "KUEA's compatibility report on held-out scenes: kernel discrepancy to DINOv2 (the training objective's "
        "kernel term) before, after, and after with the initial kernel parameters (what the embeddings "
        f"learned, not the trainable kernel); zero-shot before -> after through the frozen text tower (kept: "
        f"lost at most {MARGIN}). `kuea-noanchor` is the ablation with anchor weight 0.\n\n"
        + markdown_table(["model", "discrepancy before", "after", "after (initial kernel)", "cosine to CLIP",
                          *[f"zero-shot {label}" for label in labels]], rows)
        + "\n\n" + training_section(root, [str(KUEA / "align"), str(KUEA / "align-noanchor")])
    )  # fmt: skip


def _tuning(folder: Path, arms: tuple[str, ...]) -> Section:
    def section(root: Path, found: dict) -> str:
        runs = sorted(str(p.relative_to(root)) for p in (root / folder).glob("*") if p.name.startswith(arms))
        return training_section(root, runs)

    return section


def stage_sections(seeds: list[int]) -> dict[str, Section]:
    """Stage name -> its section renderer."""
    out: dict[str, Section] = {
        "000_world-data": data_section,
        "000_world-probe": probe_section,
        "001_freeze_align-rank": rank_section,
        "001_freeze_align-align": lambda root, f: "\n\n".join(
            [zeroshot_section(root, f, ("clip", "freeze_align")), training_section(root, [str(FREEZE / "align")])]),
        "002_sail-align": lambda root, f: "\n\n".join(
            [zeroshot_section(root, f, ("sail",)), training_section(root, [str(SAIL / "align")])]),
        "002_sail-base": lambda root, f: training_section(
            root, [str(SAIL / "tune" / run) for run in ("base-language", "base-connector", "base-lora")]),
        "002_sail-eval": partial(vqa_section, section=SAIL, models=["base", "sail-rebuild"], arms=section_arms(SAIL),
                                 comparisons=["sail_vs_control"]),
        "003_kuea-align": lambda root, f: "\n\n".join(
            [kuea_section(root, f), zeroshot_section(root, f, ("kuea", "kuea-noanchor")),
             probe_section(root, f, KUEA)]),
        "003_kuea-eval": partial(vqa_section, section=KUEA, models=["base", "kuea-dropin"], arms=section_arms(KUEA),
                                 comparisons=["kuea_dropin_vs_base", "kuea_vs_control"]),
    }  # fmt: skip
    for seed in seeds:
        for section in (SAIL, KUEA, SWAPS):
            out[f"{section.name}-tune-s{seed}"] = _tuning(
                section / "tune", tuple(f"{a}-s{seed}" for a in section_arms(section))
            )
    return out
