"""``mllm-swap demo --quick`` end to end: every stage runs and is reported, a rerun skips them all after
verifying their outputs, and a changed output makes its stage run again. The report's numbers are checked
against the files the underlying tools wrote (lmms-eval's results.json, the zero-shot JSONs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from align.errors import UserError
from align.io import read_json
from mllm_swap.cli import main
from mllm_swap.commands import run_argv
from mllm_swap.demo.pipeline import QUICK, build_stages


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--out", str(root), "--quick"]) == 0
    return root


def stage_titles() -> list[str]:
    return [s.title for s in build_stages(QUICK, run_argv)]


def test_report_lists_every_stage_with_its_commands(demo: Path) -> None:
    report = (demo / "report.md").read_text()
    stages = build_stages(QUICK, run_argv)
    assert {p.stem for p in (demo / "stages").glob("*.json")} == {s.name for s in stages}
    positions = [report.index(f"## {s.title}") for s in stages]
    assert positions == sorted(positions)  # in pipeline order
    for stage in stages:
        record = read_json(demo / "stages" / f"{stage.name}.json")
        assert record["command"].startswith("mllm-swap ") and record["command"] in report
        assert f"| {stage.title} | {record['seconds']:.1f} | ran |" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every picture it shows exists
        assert (demo / link).is_file(), link
    assert "figures/zeroshot.png" in report and "eval/comparison.png" in report


def test_outputs_name_no_machine_path(demo: Path) -> None:
    """The run directory travels: no file in it names the run's folder, $MLLM_SWAP_HOME or this checkout
    (commands run inside it with relative paths; everything written records ids or relative paths)."""
    needles = {demo.parent, Path(os.environ["MLLM_SWAP_HOME"]), Path(__file__).resolve().parents[1]}
    words = {str(n).encode() for n in needles} | {str(n.resolve()).encode() for n in needles}
    files = [p for p in demo.rglob("*") if p.is_file()]
    assert len(files) > 100 and any(p.name == "aligned_encoder.json" for p in files)
    assert [str(p) for p in files if any(w in p.read_bytes() for w in words)] == []


def test_report_numbers_are_the_tools_own(demo: Path) -> None:
    report = (demo / "report.md").read_text()
    for name in ("base", "base-tuned", "kuea-dropin", "sail-rebuild", "sail-connector", "sail-lora"):
        results = read_json(demo / "eval" / name / "results.json")["results"]  # lmms-eval's own output
        assert f"{results['shapes_vqa']['exact_match,none']:.4f}" in report
    for model in ("clip", "kuea", "sail", "freeze_align"):
        row = next(line for line in report.splitlines() if line.startswith(f"| {model} |"))
        for label in ("color", "shape"):
            result = read_json(demo / "zeroshot" / f"{model}-{label}" / f"zeroshot-classify-{label}.json")
            assert f"{result['acc1']:.3f}" in row
    swap = read_json(demo / "mllm" / "kuea-dropin" / "swap_report.json")
    assert f"cosine {swap['drift']['cosine_mean']:.3f}" in report  # the findings line


def test_rerun_skips_verified_stages_and_redoes_a_changed_one(demo: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["demo", "--out", str(demo), "--quick"]) == 0
    log = capsys.readouterr().out
    assert log.count("outputs verified, skipped") == len(stage_titles())
    report = (demo / "report.md").read_text()
    assert report.count("skipped (outputs verified)") == len(stage_titles())

    csv = demo / "eval" / "comparison.csv"
    csv.write_text(csv.read_text().replace("shapes_vqa", "tampered", 1))
    assert main(["demo", "--out", str(demo), "--quick"]) == 0
    log = capsys.readouterr().out
    assert log.count("outputs verified, skipped") == len(stage_titles()) - 1
    assert "earlier outputs changed or missing, running again" in log
    assert "tampered" not in csv.read_text()


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

    first = build_stages(QUICK, failing)[0]
    line = f"mllm-swap data shapes --out shapes --n {QUICK.shapes}"
    with pytest.raises(UserError, match=re.escape(f"demo step failed (exit 2): {line}")):
        first.run()
    assert calls == [["data", "shapes", "--out", "shapes", "--n", str(QUICK.shapes)]]
