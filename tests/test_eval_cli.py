"""``mllm-swap eval``: lmms-eval runs per model, reuse of finished runs, comparison files, suites."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from align.io import read_json, read_jsonl
from mllm_swap.cli import main
from mllm_swap.fixtures import ensure_tiny_mllm
from mllm_swap.lmms.suites import SHAPES_ENV, list_suites, load_suite, metric_rows


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny-llava and a copy whose LM head was re-drawn (a different model of the same family)."""
    from transformers import AutoModelForImageTextToText

    base = ensure_tiny_mllm("tiny-llava")
    other = tmp_path_factory.mktemp("models") / "redrawn"
    shutil.copytree(base, other)
    model = AutoModelForImageTextToText.from_pretrained(other)
    torch.manual_seed(1)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    model.save_pretrained(other)
    return {"base": base, "redrawn": other}


@pytest.fixture(scope="module")
def compared(two_models: dict[str, Path], shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    spec = ",".join(f"{tag}={path}" for tag, path in two_models.items())
    args = ["eval", "--model", spec, "--tasks", "shapes_vqa,shapes_mc", "--out", str(out), "--limit", "4",
            "--shapes", str(shapes_dir), "--device", "cpu", "--batch-size", "4"]  # fmt: skip
    assert main(args) == 0
    return out


def _expected_from_samples(run_dir: Path, shapes_dir: Path) -> dict[tuple[str, str], float]:
    """Each metric recomputed from the logged samples (lowest loss wins; normalized string equality)."""
    rows = read_jsonl(shapes_dir / "vqa_test.jsonl")
    mc = read_jsonl(run_dir / "samples_shapes_mc.jsonl")
    picks = []
    for s in mc:
        losses = [float(pair[0]) for pair in s["filtered_resps"]]
        picks.append(rows[s["doc_id"]]["options"][losses.index(min(losses))] == s["target"])
    vqa = read_jsonl(run_dir / "samples_shapes_vqa.jsonl")
    norm = lambda t: t.strip().lower().strip(".!?,;: ")  # noqa: E731
    answers = [
        s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in vqa
    ]
    matches = [norm(a) == norm(s["target"]) for a, s in zip(answers, vqa, strict=True)]
    return {
        ("shapes_mc", "acc"): sum(picks) / len(picks),
        ("shapes_vqa", "exact_match"): sum(matches) / len(matches),
    }


def test_comparison_files_match_each_models_samples(compared: Path, shapes_dir: Path):
    with (compared / "comparison.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["task"], r["metric"]) for r in rows} == {
        ("shapes_mc", "acc"),
        ("shapes_mc", "acc_norm"),
        ("shapes_vqa", "exact_match"),
    }
    assert sorted({r["model"] for r in rows}) == ["base", "redrawn"]
    values = {(r["model"], r["task"], r["metric"]): float(r["value"]) for r in rows}
    for tag in ("base", "redrawn"):
        run = read_json(compared / tag / "results.json")
        assert run["request"]["limit"] == 4 and run["n-samples"]["shapes_mc"]["effective"] == 4
        for (task, metric), expected in _expected_from_samples(compared / tag, shapes_dir).items():
            assert values[(tag, task, metric)] == pytest.approx(expected)
    table = (compared / "comparison.md").read_text()
    line = next(ln for ln in table.splitlines() if ln.startswith("| shapes_mc | acc |"))
    delta = values[("redrawn", "shapes_mc", "acc")] - values[("base", "shapes_mc", "acc")]
    assert line.rstrip(" |").endswith(f"{delta:+.4f}")
    assert "mllm-swap eval --model base=" in table
    with Image.open(compared / "comparison.png") as chart:
        assert chart.format == "PNG" and chart.width > 200


def test_rerun_reuses_finished_runs(compared: Path, two_models: dict[str, Path], shapes_dir: Path, capsys):
    before = {tag: (compared / tag / "results.json").stat().st_mtime_ns for tag in two_models}
    spec = ",".join(f"{tag}={path}" for tag, path in two_models.items())
    args = ["eval", "--model", spec, "--tasks", "shapes_mc,shapes_vqa", "--out", str(compared), "--limit", "4",
            "--shapes", str(shapes_dir), "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "base: reused" in printed and "redrawn: reused" in printed
    assert before == {tag: (compared / tag / "results.json").stat().st_mtime_ns for tag in two_models}


def test_suite_run_rescores_on_a_new_limit_and_keeps_the_paper_metric(
    compared: Path, two_models: dict[str, Path], shapes_dir: Path, capsys
):
    args = ["eval", "--model", f"base={two_models['base']}", "--suite", "shapes", "--out", str(compared),
            "--limit", "2", "--shapes", str(shapes_dir), "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert "base: scored" in capsys.readouterr().out
    assert read_json(compared / "base" / "results.json")["request"]["limit"] == 2
    with (compared / "comparison.csv").open() as fh:
        metrics = {(r["task"], r["metric"]) for r in csv.DictReader(fh)}
    assert metrics == {("shapes_mc", "acc"), ("shapes_vqa", "exact_match")}  # acc_norm is not the suite's
    assert not (compared / "comparison.png").exists()  # one model: no chart, and no stale one


def test_user_errors_exit_2(two_models: dict[str, Path], tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv(SHAPES_ENV, raising=False)
    base = str(two_models["base"])
    cases = [
        (["--tasks", "shapes_vqa"], "need --shapes"),
        (["--tasks", "no_such_task_xyz"], "unknown lmms-eval task"),
        (["--tasks", "shapes_vqa", "--shapes", str(tmp_path)], "vqa_test.jsonl: not found"),
        (["--suite", "no_such_suite"], "suite not found"),
    ]
    for extra, message in cases:
        assert main(["eval", "--model", base, "--out", str(tmp_path / "o"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert (
        main(["eval", "--model", str(tmp_path / "nope"), "--tasks", "shapes_mc", "--out", str(tmp_path)]) == 2
    )
    assert "not a model checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", base, "--tasks", "shapes_mc", "--suite", "shapes", "--out", str(tmp_path)])


def test_metric_rows_pick_the_suite_metric():
    runs = {
        "m": {
            "results": {"t1": {"alias": "t1", "acc,none": 0.5, "acc_stderr,none": 0.1, "f1,none": 0.4},
                        "t2": {"score,none": 3.0}},
            "higher_is_better": {"t1": {"acc": True}},
            "n-samples": {"t1": {"effective": 10}},
        }
    }  # fmt: skip
    rows = metric_rows(runs)
    assert [(r["task"], r["metric"], r["value"], r["stderr"]) for r in rows] == [
        ("t1", "acc", 0.5, 0.1),
        ("t1", "f1", 0.4, None),
        ("t2", "score", 3.0, None),
    ]
    suite = {"tasks": [{"task": "t1", "metric": "f1"}, {"task": "t2", "metric": "absent"}]}
    assert [(r["task"], r["metric"]) for r in metric_rows(runs, suite)] == [("t1", "f1"), ("t2", "score")]


@pytest.mark.slow
def test_shipped_suites_name_installed_tasks_and_their_metrics():
    """Every suite entry is a task of the installed lmms-eval (or ours) that reports the named metric."""
    from lmms_eval import utils
    from lmms_eval.tasks import TaskManager

    from mllm_swap.lmms.suites import TASKS_DIR

    manager = TaskManager(include_path=str(TASKS_DIR), verbosity="ERROR")
    assert {"llava15", "kuea_llava", "kuea_openflamingo", "sail_llava", "shapes"} <= set(list_suites())
    for name in list_suites():
        suite = load_suite(name)
        for entry in suite["tasks"]:
            if entry["task"] is None:  # documented as unavailable in this lmms-eval
                assert entry.get("note")
                continue
            assert entry["task"] in manager.all_tasks, (name, entry["task"])
            config = utils.load_yaml_config(manager.task_index[entry["task"]]["yaml_path"], mode="simple")
            assert entry["metric"] in [m["metric"] for m in config["metric_list"]], (name, entry)


def test_load_suite_rejects_entries_without_a_metric(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntasks:\n  - {task: gqa}\n")
    with pytest.raises(ValueError, match=r"tasks\[0\] needs 'task' and 'metric'"):
        load_suite(str(bad))


def test_lmms_eval_full_results_file_kept(compared: Path):
    """lmms-eval's own results file sits next to ours: version, git hash, task configs, task hashes."""
    from lmms_eval.utils import hash_string

    for tag in ("base", "redrawn"):
        ours = read_json(compared / tag / "results.json")
        full = read_json(compared / tag / "lmms_eval_results.json")
        assert full["lmms_eval_version"] and "git_hash" in full and full["date"]
        assert set(full["configs"]) == {"shapes_vqa", "shapes_mc"}
        assert full["configs"]["shapes_mc"]["task"] == "shapes_mc" and full["versions"] == ours["versions"]
        assert full["results"] == ours["results"] and full["model_source"] == "mllm_swap"
        for task in ("shapes_vqa", "shapes_mc"):  # lmms-eval's hash over the samples we kept
            samples = read_jsonl(compared / tag / f"samples_{task}.jsonl")
            joined = "".join(f"sample_{i}" + s["doc_hash"] for i, s in enumerate(samples))
            assert full["task_hashes"][task] == hash_string(joined)
