"""Section ``004_swaps`` of the demo: swap without retraining, and know before you train.

The run's pretrained DINOv2 goes into the base LLaVA three ways: bridged (``swap --mode bridge``: a token
adapter trained on images only maps its tokens onto the CLIP's, so the kept connector and LLM answer at
once), rebuilt (a new connector input layer, untrained) and fused with the CLIP (``swap --mode fuse``).
SAIL's tower is the same frozen DINOv2 with SAIL's image head, which a bridge refuses (it maps a backbone's
tokens), so the DINOv2 bridge is also the bridge of SAIL's backbone. The bridge is scored at zero LLM tuning
beside the rebuilds, and after tuning like a drop-in (it keeps the connector: the LoRA alone, against the
original given the same LoRA, section 003's control); the fused tower is tuned like a rebuild (connector,
then LoRA, against the CLIP rebuilt the same way, section 002's control); the tuned arms are
:data:`~mllm_swap.demo.pipeline.ARMS`, paired per question with :func:`~mllm_swap.demo.findings.difference`.
These are the controls the swap-success predictor's calibration uses. Stage 1 of the CLIP rebuild is rerun
with the tower's tokens read from a cache (``tower_cache``, ``encode --pool tokens``) on the same data, seed
and steps: its speed against the live run, and its losses. Stages, findings (``findings.json``'s
``swaps``) and report section.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from align.io import read_jsonl
from mllm_swap.demo.findings import comparisons, vqa_scores
from mllm_swap.demo.outputs import load_json
from mllm_swap.demo.pipeline import (
    AFTER_KUEA,
    ARMS,
    ARTIFACTS,
    BASE,
    SHAPES,
    SWAPS,
    Plan,
    arm_model,
    section_arms,
)
from mllm_swap.demo.sections import Section, markdown_table, num, pm, vqa_section
from mllm_swap.demo.stages import Stage

MLLM = SWAPS / "mllm"
PREDICT = SWAPS / "predict"
CACHE = SWAPS / "cache" / "clip-tokens"
CONTROL = "clip-rebuild"  # the arm whose stage 1 is rerun from the cache
COMPARISONS = {  # name -> (swapped, control, what it is), as findings.COMPARISONS
    "dino_bridge_vs_base": ("dino-bridge", "base", "DINOv2 bridged into the LLaVA, no LLM tuning, vs the original"),
    "dino_rebuild_vs_base": ("dino-rebuild", "base", "DINOv2 rebuilt into the LLaVA, no tuning, vs the original"),
    "sail_rebuild_vs_base": ("sail-rebuild", "base", "SAIL's tower rebuilt into the LLaVA, no tuning, vs the original"),
    "dino_bridge_vs_rebuild": ("dino-bridge", "dino-rebuild", "DINOv2 bridge vs the same DINOv2 rebuilt, no tuning"),
    "bridge_vs_control": ("bridge", "clip", "DINOv2 bridge vs the original, both given the same LoRA"),
    "bridge_vs_sail": ("bridge", "sail", "DINOv2 bridge given the LoRA vs SAIL's tower (the same DINOv2 with "
                       "SAIL's head) rebuilt, given its connector stage and the same LoRA"),
    "fuse_vs_control": ("fuse", CONTROL, "CLIP+DINOv2 fused vs the CLIP rebuilt the same way, both tuned alike "
                        "(connector, LoRA)"),
}  # fmt: skip


def demo_swaps(plan: Plan) -> dict[str, dict[str, Any]]:
    """Every swap of the demo: its mode, encoder, folder, the ``mllm-swap predict`` run that predicts it (its
    folder under :data:`PREDICT`), and the comparisons that measure it at zero LLM tuning (vs the original) and
    after tuning (vs its control; None where the demo does not tune it)."""
    rows = {
        "sail-rebuild": ("rebuild", ARTIFACTS["sail"], ARMS["sail"][1], "sail", "sail_rebuild_vs_base",
                         "sail_vs_control"),
        "kuea-dropin": ("dropin", ARTIFACTS["kuea"], ARMS["kuea"][1], "kuea", "kuea_dropin_vs_base", "kuea_vs_control"),
        "dino-bridge": ("bridge", plan.dino, ARMS["bridge"][1], "dino", "dino_bridge_vs_base", "bridge_vs_control"),
        "dino-rebuild": ("rebuild", plan.dino, MLLM / "dino-rebuild", "dino", "dino_rebuild_vs_base", None),
        "clip-dino-fuse": ("fuse", f"{plan.clip}+{plan.dino}", ARMS["fuse"][1], "dino", None, "fuse_vs_control"),
    }  # fmt: skip
    return {name: {"mode": mode, "encoder": str(encoder), "folder": Path(folder), "predict": predict, "zero": zero,
                   "tuned": tuned} for name, (mode, encoder, folder, predict, zero, tuned) in rows.items()}  # fmt: skip


def predict_runs(plan: Plan) -> dict[str, tuple[list[str], list[str]]]:
    """``{folder: (encoders, modes)}``: one ``mllm-swap predict`` run per group of :func:`demo_swaps` (each mode
    once in a group, so a candidate is found by its mode)."""
    runs: dict[str, tuple[list[str], list[str]]] = {}
    for row in demo_swaps(plan).values():
        encoders, modes = runs.setdefault(row["predict"], ([], []))
        encoders += [row["encoder"]] if row["encoder"] not in encoders else []
        modes.append(row["mode"])
    return runs


def live_and_cached(plan: Plan) -> tuple[Path, Path]:
    """The control's stage 1 run again back to back: with the live tower, and with the tower's tokens cached."""
    name = arm_model(CONTROL, plan.tune_seeds[0])[0]
    return SWAPS / "tune" / f"{name}-connector-live", SWAPS / "tune" / f"{name}-connector-cached"


def swap_stages(
    plan: Plan, *, stage: Callable[..., Stage], swap: Callable[..., list[str]], tune: Callable[..., list[str]],
    tune_stages: Callable[[Path, str], list[Stage]], evaluate: Callable[[Path], Stage],
) -> list[Stage]:  # fmt: skip
    """Section 004's stages, built with the pipeline's own ``stage``, ``swap``, ``tune``, ``tune_stages`` and
    ``evaluate`` (:func:`mllm_swap.demo.pipeline.build_stages`)."""
    swaps = demo_swaps(plan)
    mine = {name: row for name, row in swaps.items() if row["folder"].parts[0] == SWAPS.name}
    # the bridge's adapter trains on the world's images as long as the alignments; lmms-eval scores it below
    bridge = ["--data", str(SHAPES), "--steps", str(plan.size.align_steps), "--seed", str(plan.seed),
              "--vqa-limit", "0"]  # fmt: skip
    commands = [swap(BASE, row["encoder"], row["mode"], row["folder"]) + (bridge if row["mode"] == "bridge" else [])
                for row in mine.values()]  # fmt: skip
    seed = plan.tune_seeds[0]
    live, cached = live_and_cached(plan)
    encode = ["encode", "--encoder", plan.clip, "--data", str(SHAPES), "--pool", "tokens", "--layer", "-2",
              "--prefix", "drop", "--dtype", "fp16", "--out", str(CACHE), "--overwrite"]  # fmt: skip
    stage1 = [tune("tiny_llava_connector.yaml", Path(ARMS[CONTROL][1]), run, plan.size.connector_steps, seed)
              for run in (live, cached)]  # fmt: skip
    predict = [["predict", "--mllm", str(BASE), "--encoder", ",".join(encoders), "--mode", ",".join(modes),
                "--data", str(SHAPES), "--out", str(PREDICT / name), "--overwrite"]
               for name, (encoders, modes) in predict_runs(plan).items()]  # fmt: skip
    return [
        stage(f"{SWAPS.name}-swap", "Swap with no LLM training: the DINOv2 bridged and rebuilt, the CLIP+DINOv2 "
              "fused", commands, [row["folder"] / "swap_report.json" for row in mine.values()], AFTER_KUEA),
        stage(f"{SWAPS.name}-predict", "Predict every swap's VQA change after tuning, before any LLM training "
              "(`mllm-swap predict`)", predict, [PREDICT / name / "predictions.json" for name in predict_runs(plan)],
              AFTER_KUEA),
        *tune_stages(SWAPS, "Tune the bridge like a drop-in (LoRA) and the fused tower like a rebuild (connector, "
                    "then LoRA)"),
        stage(f"{SWAPS.name}-cache", f"Stage 1 of {CONTROL} (tuning seed {seed}) again, back to back: the live tower, "
              "then the tower's tokens read from a cache", [encode, stage1[0], [*stage1[1], "--set", f"tower_cache={CACHE}"]],
              [CACHE / "manifest.json", cached / "result.json", live / "result.json"]),
        evaluate(SWAPS),
    ]  # fmt: skip


def _losses(run: Path) -> dict[int, float]:
    path = run / "metrics.jsonl"
    return {row["step"]: row["loss"] for row in read_jsonl(path) if "loss" in row} if path.is_file() else {}


def cached_stage1(root: Path, plan: Plan) -> dict[str, Any] | None:
    """The control's stage 1, live tower vs cached tokens: the training loop's seconds (model loading excluded)
    and their ratio, the largest difference of the logged losses, and the cache's size."""
    live, cached = live_and_cached(plan)
    a, b = load_json(root / live / "result.json"), load_json(root / cached / "result.json")
    manifest = load_json(root / CACHE / "manifest.json")
    if not (a and b and manifest):
        return None
    la, lb = _losses(root / live), _losses(root / cached)
    steps = sorted(set(la) & set(lb))
    size = sum(p.stat().st_size for p in (root / CACHE).glob("*.safetensors"))
    return {"steps": b["steps"], "live_s": a["elapsed_s"], "cached_s": b["elapsed_s"],
            "speed_ratio": a["elapsed_s"] / b["elapsed_s"], "logged_steps": len(steps),
            "max_loss_diff": max((abs(la[s] - lb[s]) for s in steps), default=None),
            "cache_dtype": manifest["dtype"], "cache_images": manifest["rows"], "cache_bytes": size}  # fmt: skip


def _drift(report: dict | None) -> dict[str, Any]:
    """What a swap report measured before any tuning: token cosine to the old tower (a bridge: before and after
    training its adapter), LLM-input cosine (a bridge, and the untrained rebuild it was compared with)."""
    if not report:
        return {}
    d, compare = report["drift"], report.get("bridge", {}).get("compare", {})
    out = {"untrained": report["untrained"], "token_cosine": d.get("cosine_mean"), "linear_cka": d.get("linear_cka"),
           "cosine_before_adapter": d.get("cosine_before_adapter_training"),
           "llm_input_cosine": d.get("llm_input_cosine"),
           "rebuild_llm_input_cosine": compare.get("rebuild", {}).get("llm_input_cosine")}  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def predicted(record: dict | None, mode: str, measured: dict | None) -> dict[str, Any] | None:
    """The candidate of ``mode`` in a ``predictions.json`` record: its measurements, predicted change, interval
    and rank, and whether the ``measured`` change after tuning falls inside the interval."""
    cell = next((c for c in (record or {}).get("candidates", []) if c["mode"] == mode), None)
    if cell is None:
        return None
    lo, hi = cell["interval"]
    inside = None if measured is None else bool(lo <= measured["diff"] <= hi)
    return {"measurements": cell["measurements"], "change": cell["predicted_change"], "interval": [lo, hi],
            "rank": cell["rank"], "measured_inside_interval": inside}  # fmt: skip


def swap_findings(root: Path, plan: Plan, earlier: dict) -> dict[str, Any]:
    """``findings.json``'s ``swaps``: this section's comparisons, and per swap of the demo its mode, drift,
    prediction (``mllm-swap predict``) and measured change at zero tuning and after tuning (cells of
    ``comparisons``, section 004's or ``earlier``'s: the findings record's own); the predictor's calibration
    honesty numbers; the cached stage 1."""
    found = comparisons(vqa_scores(root, plan), plan, COMPARISONS)
    every = {**earlier, **found}
    records = {name: load_json(root / PREDICT / name / "predictions.json") for name in predict_runs(plan)}
    rows = {}
    for name, row in demo_swaps(plan).items():
        report = load_json(root / row["folder"] / "swap_report.json")
        measured = {when: every.get(row[when], {}).get("kinds", {}).get("all") for when in ("zero", "tuned")}
        rows[name] = {"mode": row["mode"], "encoder": row["encoder"], "drift": _drift(report),
                      "predicted": predicted(records[row["predict"]], row["mode"], measured["tuned"]),
                      "measured_zero_tuning": measured["zero"], "measured_tuned": measured["tuned"],
                      "comparisons": {"zero_tuning": row["zero"], "tuned": row["tuned"]}}  # fmt: skip
    calibration = next((r["calibration"] for r in records.values() if r), None)
    loeo = calibration and calibration["leave_one_encoder_out"]
    honesty = calibration and {"rows": calibration["rows"], **{k: loeo[k] for k in ("spearman", "mae", "mae_predicting_the_mean")}}
    return {"swaps": rows, "comparisons": found, "calibration": honesty, "cached_stage1": cached_stage1(root, plan)}


def _change(cell: dict | None) -> str:
    return "-" if not cell else f"{pm(cell, 'diff')} ({cell['verdict']})"


def _predicted(cell: dict | None) -> str:
    if not cell:
        return "-"
    inside = {True: "; measured inside", False: "; measured outside", None: ""}[cell["measured_inside_interval"]]
    return f"{num(cell['change'])} [{num(cell['interval'][0])}, {num(cell['interval'][1])}]{inside}"


def swaps_table(root: Path, found: dict) -> str:
    """Every swap of the demo: mode, drift before any tuning, measured change at zero tuning and after tuning."""
    rows = []
    for name, s in found["swaps"]["swaps"].items():
        d = s["drift"]
        drift = "; ".join(f"{k} {num(v)}" for k, v in d.items() if k != "untrained") or "-"
        measurements = "; ".join(f"{k} {num(v)}" for k, v in (s["predicted"] or {}).get("measurements", {}).items())
        rows.append([name, s["mode"], drift, ", ".join(d.get("untrained", [])) or "none", measurements or "-",
                     _predicted(s["predicted"]), _change(s["measured_zero_tuning"]), _change(s["measured_tuned"])])  # fmt: skip
    cal = found["swaps"]["calibration"]
    honesty = "" if not cal else (
        f" The predictor's calibration ({cal['rows']} swaps on the shapes world): leave-one-encoder-out Spearman "
        f"{num(cal['spearman'])}, MAE {num(cal['mae'])} (predicting the mean: {num(cal['mae_predicting_the_mean'])}).")
    return (
        "Every swap of the demo. Drift, before any LLM training, on held-out images: `token_cosine` of the new "
        "tokens to the CLIP's (a bridge: `cosine_before_adapter` is before training its adapter), `linear_cka` "
        "where widths differ, `llm_input_cosine` of what the LLM receives (a bridge; `rebuild_llm_input_cosine`: "
        "the untrained rebuild of the same encoder). Measured change: accuracy on every held-out question "
        "(`all`) minus the comparison's, paired per question (± standard error; a verdict needs more than two), "
        "at zero LLM tuning vs the original and after tuning vs the control tuned alike (a rebuild or fuse: "
        "connector then LoRA vs the CLIP rebuilt the same way; a drop-in or bridge: LoRA vs the original given "
        "it; `-`: not measured in the demo: the fused tower, whose connector input is untrained, only tuned, "
        "the DINOv2 rebuild only untuned). Measurements and predicted change after tuning [interval]: "
        "`mllm-swap predict`, before any LLM training, on its own swap of the same encoder and mode with the "
        f"calibration's budget; whether the measured change after tuning falls inside the interval.{honesty}\n\n"
        + markdown_table(["swap", "mode", "drift (no tuning)", "untrained", "measurements", "predicted change",
                          "measured at zero tuning", "measured after tuning"], rows)
    )  # fmt: skip


def cache_section(root: Path, found: dict) -> str:
    c = found["swaps"]["cached_stage1"]
    if not c:
        return ""
    return (
        f"Stage 1 (connector pretraining) of {CONTROL} at tuning seed {found['tune_seeds'][0]}, {c['steps']} steps, "
        f"same data and seed, run back to back: the live tower vs the tower's tokens read from an "
        f"{c['cache_dtype']} cache of {c['cache_images']} images ({c['cache_bytes'] / 1e6:.1f} MB). Training-loop "
        "seconds (model loading excluded); the machine may be shared, so the ratio carries its load.\n\n"
        + markdown_table(["live s", "cached s", "speed ratio", "largest loss difference (logged steps)"],
                         [[c["live_s"], c["cached_s"], c["speed_ratio"],
                           f"{num(c['max_loss_diff'])} ({c['logged_steps']})"]])
    )  # fmt: skip


def verdicts(found: dict) -> list[str]:
    """The section's comparisons on every question and on the CLIP-blind ones, each with its verdict."""
    out = []
    for c in found["swaps"]["comparisons"].values():
        cells = [f"{group} {pm(d, 'diff')} over {d['n']} questions"
                 + (f", seed sd {num(d['seed_sd'])}" if d["seed_sd"] is not None else "") + f" ({d['verdict']})"
                 for group in ("all", "clip_blind") if (d := c["kinds"].get(group))]  # fmt: skip
        out.append(f"- {c['what']}: " + "; ".join(cells) + ".")
    return out


def _eval(root: Path, found: dict) -> str:
    view = {**found, "comparisons": found["swaps"]["comparisons"]}
    scores = vqa_section(root, view, SWAPS, ["base", "dino-bridge", "dino-rebuild", "sail-rebuild"],
                         [CONTROL, "sail", "clip", *section_arms(SWAPS)], list(COMPARISONS))  # fmt: skip
    return "\n\n".join([swaps_table(root, found), "\n".join(verdicts(found)), scores])


def swap_sections() -> dict[str, Section]:
    """Stage name -> its report section (the tuning stages' curves come with the other sections')."""
    return {f"{SWAPS.name}-cache": cache_section, f"{SWAPS.name}-eval": _eval}

