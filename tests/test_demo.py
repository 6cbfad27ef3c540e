"""``mllm-swap demo --quick`` end to end: every stage runs and is reported, a rerun skips them all after
verifying their outputs, and a changed output makes its stage run again. ``findings.json`` is checked
against the files the underlying tools wrote (lmms-eval's results and samples, the zero-shot, probe, rank
and KUEA records), recomputed here independently, and against the tables of ``report.md``; the verdict
words are checked to follow the numbers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from align.errors import UserError
from align.io import read_json, read_jsonl
from mllm_swap.cli import main
from mllm_swap.commands import run_argv
from mllm_swap.demo.findings import difference, verdict
from mllm_swap.demo.pipeline import EVAL, QUICK, Plan, build_stages
from mllm_swap.demo.report import headlines

PLAN = Plan(QUICK)


@pytest.fixture(scope="module")
def demo(quick_demo: Path) -> Path:
    return quick_demo


@pytest.fixture(scope="module")
def findings(demo: Path) -> dict:
    return json.loads((demo / "findings.json").read_text())


def rows(report: str, first: str) -> str:
    """The report's table rows whose first cell is ``first``, one per line."""
    return "\n".join(line for line in report.splitlines() if line.startswith(f"| {first} |"))


def test_report_lists_every_stage_with_its_commands(demo: Path) -> None:
    report = (demo / "report.md").read_text()
    stages = build_stages(PLAN, run_argv)
    assert {p.stem for p in (demo / "stages").glob("*.json")} == {s.name for s in stages}
    positions = [report.index(f"### {s.title}\n") for s in stages]
    assert positions == sorted(positions)  # in pipeline order, under the numbered story sections
    for section in ("000_world", "001_freeze_align", "002_sail", "003_kuea"):
        assert f"## {section}: " in report
    for stage in stages:
        record = read_json(demo / "stages" / f"{stage.name}.json")
        assert record["command"].startswith("mllm-swap ") and record["command"] in report
        assert f"| {stage.title} | {record['seconds']:.1f} | ran |" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every picture it shows exists
        assert (demo / link).is_file(), link
    assert "000_world/probe/probe.png" in report and "002_sail/eval/comparison.png" in report


def test_outputs_name_no_machine_path(demo: Path) -> None:
    """The run directory travels: no file in it names the run's folder, $MLLM_SWAP_HOME or this checkout
    (commands run inside it with relative paths; everything written records ids or relative paths)."""
    needles = {demo.parent, Path(os.environ["MLLM_SWAP_HOME"]), Path(__file__).resolve().parents[1]}
    words = {str(n).encode() for n in needles} | {str(n.resolve()).encode() for n in needles}
    files = [p for p in demo.rglob("*") if p.is_file()]
    assert len(files) > 100 and any(p.name == "aligned_encoder.json" for p in files)
    assert [str(p) for p in files if any(w in p.read_bytes() for w in words)] == []


def _sample_scores(path: Path) -> dict[str, tuple[str, float]]:
    return {s["doc"]["id"]: (s["doc"]["kind"], s["exact_match"]) for s in read_jsonl(path)}


def test_findings_are_the_tools_own_numbers(demo: Path, findings: dict) -> None:
    approx = lambda x: pytest.approx(x, abs=1e-9)  # noqa: E731
    vqa = findings["vqa"]
    evals = {
        "002_sail": ["base", "sail-rebuild", "clip-rebuild-s0", "sail-s0"],
        "003_kuea": ["kuea-dropin", "clip-s0", "kuea-s0"],
    }
    for section, models in evals.items():
        for model in models:
            folder = demo / section / "eval" / model
            results = read_json(folder / "results.json")["results"]["shapes_vqa"]  # lmms-eval's own aggregate
            assert vqa[model]["all"]["accuracy"] == approx(results["exact_match,none"])
            assert vqa[model]["all"]["stderr"] == approx(results["exact_match_stderr,none"])
            scores = _sample_scores(folder / "samples_shapes_vqa.jsonl")
            assert vqa[model]["all"]["n"] == len(scores) == QUICK.eval_limit
            for kind in ("count", "position"):
                xs = np.array([x for k, x in scores.values() if k == kind])
                assert vqa[model][kind]["accuracy"] == approx(xs.mean())
                assert vqa[model][kind]["stderr"] == approx(xs.std(ddof=1) / math.sqrt(len(xs)))
    # the swapped-vs-control difference, paired per question, recomputed from the two sample files
    sail = _sample_scores(demo / "002_sail/eval/sail-s0/samples_shapes_vqa.jsonl")
    control = _sample_scores(demo / "002_sail/eval/clip-rebuild-s0/samples_shapes_vqa.jsonl")
    blind = [sail[i][1] - control[i][1] for i in sorted(sail) if sail[i][0] in ("count", "position")]
    cell = findings["comparisons"]["sail_vs_control"]["kinds"]["clip_blind"]
    assert cell["diff"] == approx(np.mean(blind)) and cell["n"] == len(blind)
    assert cell["stderr"] == approx(np.std(blind, ddof=1) / math.sqrt(len(blind)))
    for model, section in (("clip", "001_freeze_align"), ("sail", "002_sail"), ("kuea-noanchor", "003_kuea")):
        for label in ("color", "shape"):
            result = read_json(
                demo / section / "zeroshot" / f"{model}-{label}" / f"zeroshot-classify-{label}.json"
            )
            assert findings["zeroshot"][model][label]["acc1"] == approx(result["acc1"])
    names = {
        PLAN.clip: "clip",
        PLAN.dino: "dino",
        "tiny-dinov2-random": "dino-random",
        "003_kuea/align/artifact": "kuea",
    }
    for folder in ("000_world/probe", "003_kuea/probe"):
        for r in read_json(demo / folder / "probe.json")["results"]:
            cell = findings["probe"][names[r["encoder"]]][r["feature"]][r["attribute"]]
            assert (cell["accuracy"], cell["stderr"]) == (approx(r["accuracy"]), approx(r["stderr"]))
    for name, folder in (("kuea", "align"), ("kuea-noanchor", "align-noanchor")):
        report = read_json(demo / "003_kuea" / folder / "compat_report.json")
        for key in ("before", "after", "after_initial_kernel"):
            assert findings["kuea"][name]["kernel_discrepancy"][key] == approx(
                report["kernel_discrepancy"][key]
            )
    scores = read_json(demo / "001_freeze_align/rank/scores.json")
    pair = next(p for p in scores["pairs"] if p["vision"] == "tiny-siglip" and p["text"] == "minilm")
    assert findings["ranking"]["cka"]["minilm"]["tiny-siglip"]["cka"] == approx(pair["cka"])
    toy = read_json(demo / "001_freeze_align/toy/toy.json")
    assert findings["ranking"]["toy"]["pearson_r"] == approx(toy["pearson_r"])


def test_report_tables_show_the_findings(demo: Path, findings: dict) -> None:
    report = (demo / "report.md").read_text()
    f3 = "{:.3f}".format
    for model in ("base", "sail-rebuild", "kuea-dropin"):
        cells = rows(report, model)
        for group in ("color", "shape", "count", "position", "clip_blind", "all"):
            v = findings["vqa"][model][group]
            assert f"{f3(v['accuracy'])} ± {f3(v['stderr'])}" in cells
    kinds = findings["comparisons"]["sail_vs_control"]["kinds"]
    cells = [f"{f3(c['diff'])} ± {f3(c['stderr'])} (seed sd -; {c['verdict']})" for c in kinds.values()]
    assert rows(report, "sail_vs_control") == "| " + " | ".join(["sail_vs_control", *cells]) + " |"
    for tower in ("clip", "kuea"):
        lines = [line for line in report.splitlines() if line.startswith(f"| {tower} | patch_mean |")]
        cells = findings["probe"][tower]["patch_mean"]
        assert lines == ["| " + " | ".join([tower, "patch_mean", *[
            f"{f3(cells[a]['accuracy'])} ± {f3(cells[a]['stderr'])}" for a in QUICK.probe_labels
        ]]) + " |"]  # fmt: skip
    for model in ("clip", "freeze_align", "sail", "kuea"):
        cells = rows(report, model)
        for label in ("color", "shape"):
            z = findings["zeroshot"][model][label]
            assert f"{f3(z['acc1'])} ± {f3(z['stderr'])} (chance {f3(z['chance'])}, {z['verdict']})" in cells
    kd = findings["kuea"]["kuea-noanchor"]["kernel_discrepancy"]
    assert f"| kuea-noanchor | {kd['before']:.4g} | {kd['after']:.4g} |" in report
    toy = findings["ranking"]["toy"]
    assert f"Pearson r {f3(toy['pearson_r'])} over {toy['instances']} instances ({toy['verdict']})" in report


def test_verdicts_follow_the_numbers() -> None:
    """A difference is an effect only beyond two standard errors with every seed agreeing; the headline
    sentence says what the numbers say, and says plainly when an effect does not appear."""
    assert verdict(0.10, 0.02, [0.08, 0.12, 0.10]) == "higher"
    assert verdict(-0.10, 0.02, [-0.08, -0.12]) == "lower"
    assert verdict(0.10, 0.06) == "no clear difference"  # within two standard errors
    assert verdict(0.10, 0.02, [0.15, 0.17, -0.02]) == "no clear difference"  # a seed disagrees

    def found(diff: float, se: float, per_seed: list[float]) -> dict:
        cell = {"diff": diff, "stderr": se, "seed_sd": float(np.std(per_seed, ddof=1)), "per_seed": per_seed,
                "n": 200, "verdict": verdict(diff, se, per_seed)}  # fmt: skip
        return {"probe_differences": {}, "ranking": {}, "zeroshot": {}, "kuea": {}, "tune_seeds": [0, 1, 2],
                "comparisons": {"sail_vs_control": {"what": "SAIL vs control", "kinds": {"clip_blind": cell}}}}  # fmt: skip

    (up,) = headlines(found(0.12, 0.03, [0.1, 0.12, 0.14]))
    assert "0.120 ± 0.030 over 200 questions (seed sd 0.020 over 3 tuning seeds): higher" in up
    (flat,) = headlines(found(0.02, 0.03, [0.0, 0.02, 0.04]))
    assert "no clear difference: the effect does not appear" in flat


def test_paired_difference_over_questions_and_seeds() -> None:
    """The swapped-vs-control difference of findings.json, recomputed with numpy from made-up answers: per
    question averaged over seeds (its mean and standard error), per seed (its sd)."""
    rng = np.random.default_rng(0)
    kinds = np.array(["count", "color", "position", "shape"] * 30)
    swapped, control = rng.random((3, 120)) < 0.7, rng.random((3, 120)) < 0.4
    scores = {f"{arm}-s{k}": {f"q{i}": (str(kinds[i]), float(x[k, i])) for i in range(120)}
              for arm, x in (("sail", swapped), ("control", control)) for k in range(3)}  # fmt: skip
    pairs = [(f"sail-s{k}", f"control-s{k}") for k in range(3)]
    blind = np.isin(kinds, ["count", "position"])
    d = (swapped.astype(float) - control)[:, blind]
    cell = difference(scores, pairs, ("count", "position"))
    assert cell["n"] == blind.sum() == 60
    assert cell["diff"] == pytest.approx(d.mean())
    assert cell["stderr"] == pytest.approx(d.mean(0).std(ddof=1) / math.sqrt(60))
    assert cell["seed_sd"] == pytest.approx(d.mean(1).std(ddof=1))
    assert cell["per_seed"] == pytest.approx(list(d.mean(1)))
    assert cell["verdict"] == verdict(cell["diff"], cell["stderr"], cell["per_seed"]) == "higher"


def test_seed_generates_the_world_and_every_run() -> None:
    """No demo run needed: --seed reaches the world, every alignment and tuning run; --seeds sets how many
    tuning seeds each tuned arm gets."""
    stages = build_stages(Plan(QUICK, seed=7, seeds=2), lambda argv: 0)
    commands = [line for s in stages for line in s.run().command.splitlines()]
    assert "mllm-swap data shapes --out 000_world/shapes --n 120 --seed 7" in commands
    for kind in ("clip", "dino"):  # the towers are pretrained from the seed, on this world
        assert any(c.startswith(f"mllm-swap pretrain {kind} --data 000_world/shapes --seed 7 ") for c in commands)
    aligns = [c for c in commands if c.startswith("mllm-swap align ")]
    assert len(aligns) == 4 and all("--set train.seed=7 " in c for c in aligns)
    tunes = [c for c in commands if c.startswith("mllm-swap tune ") and "004_swaps/tune/clip-rebuild" not in c]  # 1 seed
    assert sum("train.seed=7000 " in c for c in tunes) == sum("train.seed=7001 " in c for c in tunes) == 9
    assert [s.name for s in stages if "-tune-" in s.name] == [
        "002_sail-tune-s7000", "002_sail-tune-s7001", "003_kuea-tune-s7000", "003_kuea-tune-s7001",
        "004_swaps-tune-s7000", "004_swaps-tune-s7001"]  # fmt: skip
    assert any("loss.anchor_weight=0" in c for c in aligns)  # the no-anchor ablation


def test_rerun_skips_verified_stages_and_redoes_a_changed_one(demo: Path, tmp_path: Path, capsys) -> None:
    demo = Path(shutil.copytree(demo, tmp_path / "run"))  # the shared run stays as made; a moved run resumes
    n = len(build_stages(PLAN, run_argv))
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), "--quick"]) == 0
    log = capsys.readouterr().out
    assert log.count("outputs verified, skipped") == n
    assert (demo / "report.md").read_text().count("skipped (outputs verified)") == n

    csv = demo / EVAL[list(EVAL)[-1]] / "comparison.csv"  # the last stage's: only it runs again
    csv.write_text(csv.read_text().replace("shapes_vqa", "tampered", 1))
    assert main(["demo", "--out", str(demo), "--quick"]) == 0
    log = capsys.readouterr().out
    assert log.count("outputs verified, skipped") == n - 1
    assert "earlier outputs changed or missing, running again" in log
    assert "tampered" not in csv.read_text()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seeds", "0"], "--seeds 0: expected at least 1"),
        (["--seed", "-1"], "--seed -1: expected an integer >= 0"),
        (["--jobs", "0"], "--jobs 0: expected at least 1"),
    ],
)
def test_bad_flags_are_refused(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    assert main(["demo", "--out", str(tmp_path / "run"), "--quick", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.md"
    out.write_text("not a folder")
    assert main(["demo", "--out", str(out), "--quick"]) == 2
    assert f"--out {out}: is a file" in capsys.readouterr().err


def test_steps_run_through_the_runner_given_and_a_failing_one_stops_the_demo() -> None:
    """No demo run needed: the stages call the runner they were built with, and a step's non-zero exit
    becomes a UserError naming the command line (the step printed its own error)."""
    calls: list[list[str]] = []

    def failing(argv: list[str]) -> int:
        calls.append(argv)
        return 2

    first = build_stages(PLAN, failing)[0]
    line = f"mllm-swap data shapes --out 000_world/shapes --n {QUICK.shapes} --seed 0"
    with pytest.raises(UserError, match=re.escape(f"demo step failed (exit 2): {line}")):
        first.run()
    assert calls == [["data", "shapes", "--out", "000_world/shapes", "--n", str(QUICK.shapes), "--seed", "0"]]


def test_compare_puts_runs_side_by_side(demo: Path, findings: dict, tmp_path: Path) -> None:
    """`demo --compare RUN RUN`: one row per headline finding, one column per run read from its own
    findings.json, and whether the runs' verdicts agree."""
    other = tmp_path / "other"
    other.mkdir()
    changed = json.loads(json.dumps(findings))
    changed["seed"] = 1
    cell = changed["comparisons"]["sail_vs_control"]["kinds"]["clip_blind"]
    cell.update(diff=0.25, stderr=0.05, verdict="higher")
    (other / "findings.json").write_text(json.dumps(changed))
    out = tmp_path / "side"
    assert main(["demo", "--compare", str(demo), str(other), "--out", str(out)]) == 0
    table = (out / "comparison.md").read_text()
    assert "| finding | seed 0 | seed 1 | same verdict |" in table
    before = findings["comparisons"]["sail_vs_control"]["kinds"]["clip_blind"]
    assert (f"| VQA sail - control, clip_blind | {before['diff']:.3f} ± {before['stderr']:.3f} "
            f"({before['verdict']}) | 0.250 ± 0.050 (higher) | no |") in table  # fmt: skip
    toy = findings["ranking"]["toy"]
    assert (f"| toy: Pearson r (linear CKA, CLIP loss) | {toy['pearson_r']:.3f} ({toy['verdict']}) | "
            f"{toy['pearson_r']:.3f} ({toy['verdict']}) | yes |") in table  # fmt: skip
    kd = findings["kuea"]["kuea"]["kernel_discrepancy"]
    cells = f"{kd['before']:.4g} -> {kd['after']:.4g}"
    assert f"| kuea: kernel discrepancy to DINOv2, before -> after | {cells} | {cells} | - |" in table
    rows_json = {r["finding"]: r for r in read_json(out / "comparison.json")["rows"]}
    assert rows_json["VQA sail - control, clip_blind"]["values"] == {"seed 0": before["diff"], "seed 1": 0.25}
    zs = findings["zeroshot"]["kuea"]["color"]["acc1"]
    assert rows_json["zero-shot kuea, color"]["values"] == {"seed 0": zs, "seed 1": zs}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compare", "RUN"], "--compare: expected at least two demo run directories, found 1"),
        (["--compare", "RUN", "MISSING"], "MISSING: no findings.json; expected a finished `mllm-swap demo` run"),
        (["--seed", "0,0"], "--seed 0,0: a seed is repeated"),
        (["--seed", "1,x"], "--seed 1,x: expected an integer >= 0, or several comma-separated"),
    ],
)
def test_bad_compare_and_seed_lists_are_refused(
    demo: Path, tmp_path: Path, capsys, flags: list[str], message: str
) -> None:
    flags = [str(demo) if f == "RUN" else str(tmp_path / f) if f == "MISSING" else f for f in flags]
    message = message.replace("MISSING", str(tmp_path / "MISSING"))
    assert main(["demo", "--out", str(tmp_path / "out"), "--quick", *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_several_world_seeds_run_apart_then_side_by_side(findings: dict, tmp_path: Path, monkeypatch) -> None:
    """`demo --seed 0,1`: one run per world seed in OUT/seed-S, each with its own plan, then the comparison of
    their findings in OUT (the runs themselves are stood in for: each writes findings for its seed)."""
    import mllm_swap.demo.run as run_module

    plans = {}

    def fake_run(out, run_command, plan: Plan, **how) -> Path:
        plans[Path(out)] = plan
        Path(out).mkdir(parents=True)
        (Path(out) / "findings.json").write_text(json.dumps({**findings, "seed": plan.seed}))
        return Path(out) / "report.md"

    monkeypatch.setattr(run_module, "run_demo", fake_run)
    assert main(["demo", "--out", str(tmp_path), "--quick", "--seed", "0,1", "--seeds", "2"]) == 0
    assert {out: (p.seed, p.seeds, p.size) for out, p in plans.items()} == {
        tmp_path / "seed-0": (0, 2, QUICK), tmp_path / "seed-1": (1, 2, QUICK)}  # fmt: skip
    assert "| finding | seed 0 | seed 1 | same verdict |" in (tmp_path / "comparison.md").read_text()
