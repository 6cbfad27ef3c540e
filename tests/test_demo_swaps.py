"""Section ``004_swaps`` of ``mllm-swap demo --quick`` (the run shared with ``test_demo.py``): the bridge, rebuild
and fused swaps really are what their reports and checkpoints say, the tuned arms get exactly the control's
tuning, the cached stage 1 really read the cache, and ``findings.json``'s ``swaps`` equals the tools' own
files (recomputed here) and the report's tables."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from align.io import read_json, read_jsonl
from mllm_swap.demo.findings import comparisons
from mllm_swap.demo.pipeline import QUICK, Plan, build_stages
from mllm_swap.demo.swaps import COMPARISONS, demo_swaps

PLAN = Plan(QUICK)
SWAPS = Path("004_swaps")
f3 = "{:.3f}".format


@pytest.fixture(scope="module")
def found(quick_demo: Path) -> dict:
    return json.loads((quick_demo / "findings.json").read_text())["swaps"]


def _settings(command: str) -> list[str]:
    """A tune command line without what names its start and its output (the tuning it applies)."""
    words = command.split()
    drop = {i for i, w in enumerate(words) if w.startswith(("model=", "--out"))}
    drop |= {i + 1 for i, w in enumerate(words) if w == "--out"}
    return [w for i, w in enumerate(words) if i not in drop]


def test_swapped_arms_get_exactly_the_controls_tuning() -> None:
    """No demo run needed: per tuning seed, the fused tower is tuned by the same command lines as the CLIP rebuilt
    the same way (connector, then LoRA), and the bridge, which keeps the connector, by the same LoRA as the
    original (the drop-in's control), but for the model they start from and where they write; the cached
    stage 1 is the control's first stage with the cache added."""
    stages = build_stages(Plan(QUICK, seed=3, seeds=2), lambda argv: 0)
    lines = {s.name: s.run().command.splitlines() for s in stages}

    def tunes(stage: str) -> list[list[str]]:
        return [_settings(c) for c in lines[stage] if c.startswith("mllm-swap tune ")]

    for seed in (3000, 3001):
        rebuilds, dropins, ours = (tunes(f"{s}-tune-s{seed}") for s in ("002_sail", "003_kuea", "004_swaps"))
        assert len(ours) == 3 and ours == [dropins[0], *rebuilds[:2]]  # bridge; fuse: connector, LoRA
        assert f"--set train.seed={seed}" in " ".join(lines[f"004_swaps-tune-s{seed}"])
        assert "--set model=002_sail/mllm/clip-rebuild " in lines[f"002_sail-tune-s{seed}"][0]
        assert "--set model=002_sail/mllm/base " in lines[f"003_kuea-tune-s{seed}"][0]
    live, stage1 = (c for c in lines["004_swaps-cache"] if c.startswith("mllm-swap tune "))
    control = lines["002_sail-tune-s3000"][0]  # the control's own stage 1
    assert _settings(live) == _settings(control) and "--set model=002_sail/mllm/clip-rebuild " in live
    assert _settings(stage1) == [*_settings(live), "--set", "tower_cache=004_swaps/cache/clip-tokens"]
    swaps = lines["004_swaps-swap"]
    assert "mllm-swap swap --mllm 002_sail/mllm/base --encoder models/dino --mode bridge " in swaps[0]
    assert "--data 000_world/shapes --steps 6 --seed 3 " in swaps[0] + " "
    assert "--encoder models/clip+models/dino --mode fuse " in swaps[2]


def test_swaps_are_what_they_say(quick_demo: Path) -> None:
    """The bridge keeps the base's connector and is trained (its tokens moved toward the CLIP's); the rebuild and
    the fused tower have a new, untrained connector input of the tower's width (64 + 96 for CLIP+DINOv2)."""
    mllm = quick_demo / SWAPS / "mllm"
    bridge = read_json(mllm / "dino-bridge" / "swap_report.json")
    assert bridge["mode"] == "bridge" and bridge["untrained"] == []
    assert bridge["drift"]["cosine_after_adapter_training"] > bridge["drift"]["cosine_before_adapter_training"]
    assert bridge["bridge"]["train"]["steps"] == QUICK.align_steps
    fuse = read_json(mllm / "clip-dino-fuse" / "config.json")
    assert fuse["vision_config"]["hidden_size"] == 64 + 96
    for name in ("dino-rebuild", "clip-dino-fuse"):
        assert read_json(mllm / name / "swap_report.json")["untrained"] == ["model.multi_modal_projector.linear_1"]


def test_cached_stage1_read_the_cache_and_matches_the_live_run(quick_demo: Path, found: dict) -> None:
    live, cached = (quick_demo / f"004_swaps/tune/clip-rebuild-s0-connector-{how}" for how in ("live", "cached"))
    assert "tower_cache: 004_swaps/cache/clip-tokens" in (cached / "config.yaml").read_text()
    assert "tower_cache: null" in (live / "config.yaml").read_text()
    a, b = read_json(live / "result.json"), read_json(cached / "result.json")
    c = found["cached_stage1"]
    assert (c["live_s"], c["cached_s"]) == (a["elapsed_s"], b["elapsed_s"])
    assert c["speed_ratio"] == pytest.approx(a["elapsed_s"] / b["elapsed_s"])
    la, lb = ({r["step"]: r["loss"] for r in read_jsonl(d / "metrics.jsonl")} for d in (live, cached))
    assert c["logged_steps"] == len(la) >= 1
    assert c["max_loss_diff"] == pytest.approx(max(abs(la[s] - lb[s]) for s in la)) and c["max_loss_diff"] < 1e-3
    shards = list((quick_demo / "004_swaps/cache/clip-tokens").glob("*.safetensors"))
    assert c["cache_bytes"] == sum(p.stat().st_size for p in shards) and c["cache_dtype"] == "fp16"


def _samples(folder: Path) -> dict[str, float]:
    return {s["doc"]["id"]: float(s["exact_match"]) for s in read_jsonl(folder / "samples_shapes_vqa.jsonl")}


def test_findings_are_the_tools_own_numbers(quick_demo: Path, found: dict) -> None:
    """Each swap's drift is its report's; each measured change is the paired difference of the two models'
    lmms-eval samples, recomputed here from the files."""
    report = read_json(quick_demo / SWAPS / "mllm" / "dino-bridge" / "swap_report.json")
    drift = found["swaps"]["dino-bridge"]["drift"]
    assert drift["llm_input_cosine"] == report["drift"]["llm_input_cosine"]
    assert drift["cosine_before_adapter"] == report["drift"]["cosine_before_adapter_training"]
    assert drift["rebuild_llm_input_cosine"] == report["bridge"]["compare"]["rebuild"]["llm_input_cosine"]
    cka = read_json(quick_demo / SWAPS / "mllm" / "clip-dino-fuse" / "swap_report.json")["drift"]["linear_cka"]
    assert found["swaps"]["clip-dino-fuse"]["drift"]["linear_cka"] == cka
    cases = {  # swap -> (when, swapped eval folder, control eval folder)
        "dino-bridge": ("measured_zero_tuning", "004_swaps/eval/dino-bridge", "002_sail/eval/base"),
        "clip-dino-fuse": ("measured_tuned", "004_swaps/eval/fuse-s0", "002_sail/eval/clip-rebuild-s0"),
        "kuea-dropin": ("measured_tuned", "003_kuea/eval/kuea-s0", "003_kuea/eval/clip-s0"),
    }
    for name, (when, a, b) in cases.items():
        sa, sb = _samples(quick_demo / a), _samples(quick_demo / b)
        d = np.array([sa[i] - sb[i] for i in sorted(sa)])
        cell = found["swaps"][name][when]
        assert cell["n"] == len(d) == QUICK.eval_limit
        assert cell["diff"] == pytest.approx(d.mean(), abs=1e-12)
        assert cell["stderr"] == pytest.approx(d.std(ddof=1) / math.sqrt(len(d)), abs=1e-12)
    assert found["swaps"]["clip-dino-fuse"]["measured_zero_tuning"] is None  # untrained connector: not scored


def test_predictions_are_predicts_own(quick_demo: Path, found: dict) -> None:
    """Each swap's prediction is its mode's candidate in its ``mllm-swap predict`` run, whose measurements are
    those of predict's own swap report; 'inside' says whether the measured change after tuning is in the
    interval."""
    for name, s in found["swaps"].items():
        folder = quick_demo / "004_swaps" / "predict" / demo_swaps(PLAN)[name]["predict"]
        (candidate,) = [c for c in read_json(folder / "predictions.json")["candidates"] if c["mode"] == s["mode"]]
        p = s["predicted"]
        assert (p["change"], p["interval"], p["rank"]) == (candidate["predicted_change"], candidate["interval"],
                                                            candidate["rank"])  # fmt: skip
        assert p["measurements"] == read_json(folder / candidate["swap"] / "swap_report.json")["measurements"]
        measured = s["measured_tuned"]
        lo, hi = p["interval"]
        assert p["measured_inside_interval"] == (None if measured is None else lo <= measured["diff"] <= hi)


def test_comparisons_pair_the_right_models() -> None:
    """With made-up answers, each comparison of the section is its named models' paired difference."""
    rng = np.random.default_rng(1)
    names = ["base", "dino-bridge", "dino-rebuild", "sail-rebuild", "bridge-s0", "sail-s0", "clip-rebuild-s0",
             "fuse-s0", "clip-s0"]  # fmt: skip
    answers = {m: rng.random(40) < rng.uniform(0.2, 0.8) for m in names}
    scores = {m: {f"q{i}": ("color", float(x)) for i, x in enumerate(xs)} for m, xs in answers.items()}
    cells = comparisons(scores, PLAN, COMPARISONS)
    expected = {"dino_bridge_vs_base": ("dino-bridge", "base"), "dino_bridge_vs_rebuild": ("dino-bridge", "dino-rebuild"),
                "bridge_vs_sail": ("bridge-s0", "sail-s0"), "bridge_vs_control": ("bridge-s0", "clip-s0"),
                "fuse_vs_control": ("fuse-s0", "clip-rebuild-s0"), "sail_rebuild_vs_base": ("sail-rebuild", "base")}  # fmt: skip
    for name, (a, b) in expected.items():
        d = answers[a].astype(float) - answers[b]
        assert cells[name]["kinds"]["all"]["diff"] == pytest.approx(d.mean()), name


def test_report_tables_show_the_findings(quick_demo: Path, found: dict) -> None:
    report = (quick_demo / "report.md").read_text()
    section = report[report.index("## 004_swaps: ") :]
    for name, s in found["swaps"].items():
        (line,) = [x for x in section.splitlines() if x.startswith(f"| {name} | {s['mode']} |")]
        for key, value in s["drift"].items():
            if key != "untrained":
                assert f"{key} {f3(value)}" in line
        if p := s["predicted"]:
            assert f"{f3(p['change'])} [{f3(p['interval'][0])}, {f3(p['interval'][1])}]" in line
            assert all(f"{k} {f3(v)}" in line for k, v in p["measurements"].items() if v is not None)
        for when in ("measured_zero_tuning", "measured_tuned"):
            cell = s[when]
            assert (f"{f3(cell['diff'])} ± {f3(cell['stderr'])} ({cell['verdict']})" if cell else "| - |") in line
    c = found["cached_stage1"]
    row = f"| {f3(c['live_s'])} | {f3(c['cached_s'])} | {f3(c['speed_ratio'])} | {f3(c['max_loss_diff'])} ("
    assert row in section
    for name, c in found["comparisons"].items():
        assert f"| {name} | " in section
        d = c["kinds"]["all"]
        assert f"- {c['what']}: all {f3(d['diff'])} ± {f3(d['stderr'])} over {d['n']} questions" in section
    assert "## 004_swaps: Swap without retraining, and know before you train" in report


def test_compare_puts_section_004_side_by_side(quick_demo: Path, tmp_path: Path) -> None:
    """`demo --compare RUN RUN` carries section 004: its VQA comparisons (bridge vs original and vs rebuild, fused
    vs control), each swap's predicted change beside the measured one, the cached stage 1's speed ratio; each
    cell read from its run's findings.json (a second run made here by changing the first's numbers)."""
    from mllm_swap.cli import main

    first = json.loads((quick_demo / "findings.json").read_text())
    other = json.loads(json.dumps(first))
    other["seed"] = 1
    swaps = other["swaps"]
    fuse = swaps["comparisons"]["fuse_vs_control"]["kinds"]["all"]
    fuse.update(diff=0.3, stderr=0.05, verdict="higher")
    bridge = swaps["swaps"]["dino-bridge"]
    bridge["predicted"].update(change=0.02, interval=[0.01, 0.04], measured_inside_interval=False)
    swaps["cached_stage1"]["speed_ratio"] = 3.25
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "findings.json").write_text(json.dumps(other))
    assert main(["demo", "--compare", str(quick_demo), str(tmp_path / "other"), "--out", str(tmp_path / "side")]) == 0
    table = (tmp_path / "side" / "comparison.md").read_text()
    rows = {r["finding"]: r for r in read_json(tmp_path / "side" / "comparison.json")["rows"]}

    mine = first["swaps"]
    for name in ("dino_bridge_vs_base", "dino_bridge_vs_rebuild", "fuse_vs_control", "bridge_vs_control"):
        for group, cell in mine["comparisons"][name]["kinds"].items():
            row = rows[f"VQA {name.replace('_vs_', ' - ')}, {group}"]
            assert row["values"]["seed 0"] == cell["diff"]
    before = mine["comparisons"]["fuse_vs_control"]["kinds"]["all"]
    assert (f"| VQA fuse - control, all | {f3(before['diff'])} ± {f3(before['stderr'])} ({before['verdict']}) | "
            f"0.300 ± 0.050 (higher) | {'yes' if before['verdict'] == 'higher' else 'no'} |") in table  # fmt: skip
    for name, swap in mine["swaps"].items():
        predicted = rows[f"swap {name} ({swap['mode']}): predicted VQA change after tuning"]
        measured = rows[f"swap {name} ({swap['mode']}): measured VQA change after tuning"]
        assert predicted["values"]["seed 0"] == (swap["predicted"] or {}).get("change")
        assert measured["values"]["seed 0"] == (swap["measured_tuned"] or {}).get("diff")
    mine_bridge = mine["swaps"]["dino-bridge"]["predicted"]
    lo, hi = mine_bridge["interval"]
    inside = {True: " (measured inside)", False: " (measured outside)", None: ""}
    assert (f"| swap dino-bridge (bridge): predicted VQA change after tuning | {f3(mine_bridge['change'])} "
            f"[{f3(lo)}, {f3(hi)}]{inside[mine_bridge['measured_inside_interval']]} | 0.020 [0.010, 0.040] "
            "(measured outside) |") in table  # fmt: skip
    assert rows["cached stage 1: speed ratio (live / cached)"]["values"] == {
        "seed 0": mine["cached_stage1"]["speed_ratio"], "seed 1": 3.25}  # fmt: skip
    assert rows["predictor: leave-one-encoder-out Spearman"]["values"]["seed 1"] == mine["calibration"]["spearman"]
