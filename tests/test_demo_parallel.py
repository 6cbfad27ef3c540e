"""Independent demo stages run at once (``demo --jobs``): each in a process of its own, with the same output
bytes as when they run one after another in the demo's process, and skipped on rerun by the same rule."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from align.errors import UserError
from mllm_swap.commands import run_argv
from mllm_swap.commands.demo import STAGE_CHILD
from mllm_swap.demo import stages as runner
from mllm_swap.demo.pipeline import QUICK, Plan, build_stages

# A stand-in for the demo's child program: each command line [verb, name, other?] notes that `name` started,
# waits for `other` to have started too (so two of them can only finish when they run at once), writes
# name.txt and appends name to children.log; verb "fail" exits 3.
CHILD = (sys.executable, "-c", """
import json, pathlib, sys, time
for verb, name, *other in json.loads(sys.argv[1]):
    pathlib.Path(name + ".started").touch()
    if verb == "fail":
        sys.exit(3)
    deadline = time.monotonic() + 60
    while other and not pathlib.Path(other[0] + ".started").exists():
        if time.monotonic() > deadline:
            sys.exit(4)
        time.sleep(0.01)
    pathlib.Path(name + ".txt").write_text(name)
    with open("children.log", "a") as log:
        log.write(name + "\\n")
""")


def fake_stages(root: Path, verbs: dict[str, str] | None = None) -> list[runner.Stage]:
    """a and b (one group, each waiting for the other in a child), then c alone; in this process each writes
    its file itself."""
    verbs = verbs or {}

    def stage(name: str, other: str | None, group: str) -> runner.Stage:
        argv = [verbs.get(name, "write"), name, *([other] if other else [])]

        def run() -> runner.StageResult:
            (root / f"{name}.txt").write_text(name)
            return runner.StageResult({}, [root / f"{name}.txt"], name)

        return runner.Stage(name, name.upper(), run, name, group, [argv], [root / f"{name}.txt"])

    return [stage("a", "b", "g"), stage("b", "a", "g"), stage("c", None, "")]


def children(root: Path) -> list[str]:
    log = root / "children.log"
    return sorted(log.read_text().split()) if log.is_file() else []


def test_a_group_runs_at_once_and_reruns_by_the_serial_rule(tmp_path: Path) -> None:
    run = lambda stages: runner.run_stages(stages, tmp_path, log=lambda _: None, jobs=2, child=CHILD)  # noqa: E731
    records = run(fake_stages(tmp_path))
    assert [r.name for r in records] == ["a", "b", "c"] and not any(r.skipped for r in records)
    assert children(tmp_path) == ["a", "b"]  # a and b in children, at once (each waited for the other); c here
    assert [r.files for r in records] == [{f"{n}.txt": runner.sha256_file(tmp_path / f"{n}.txt")} for n in "abc"]

    assert [r.skipped for r in run(fake_stages(tmp_path))] == [True, True, True]
    (tmp_path / "b.txt").write_text("changed")  # b and what follows run again; a alone is kept, b runs here
    assert [r.skipped for r in run(fake_stages(tmp_path))] == [True, False, False]
    assert children(tmp_path) == ["a", "b"] and (tmp_path / "b.txt").read_text() == "b"
    (tmp_path / "a.txt").write_text("changed")  # a changed: a and b (after it) both run again, at once
    assert [r.skipped for r in run(fake_stages(tmp_path))] == [False, False, False]
    assert children(tmp_path) == ["a", "a", "b", "b"]

    with pytest.raises(UserError, match="demo stage 'b' failed \\(exit 3\\): b"):
        runner.run_stages(fake_stages(tmp_path / "x", {"b": "fail"}), tmp_path / "x", log=lambda _: None, jobs=2,
                          child=CHILD)  # fmt: skip


GROUP = "003_kuea-tune"  # the quick demo's cheapest tuning stages (LoRA only), one per tuning seed


def test_tuning_seeds_at_once_give_the_same_bytes_as_one_after_another(
    quick_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tunes = [s for s in build_stages(Plan(QUICK, seeds=2), run_argv) if s.group == GROUP]
    assert [s.name for s in tunes] == [f"{GROUP}-s0", f"{GROUP}-s1"]
    spawned: list[list[str]] = []
    real = subprocess.run
    monkeypatch.setattr(runner.subprocess, "run", lambda argv, **kw: spawned.append(argv) or real(argv, **kw))

    def run(root: Path, jobs: int) -> tuple[list[runner.StageRecord], list[str]]:
        logs: list[str] = []
        with contextlib.chdir(root):
            return runner.run_stages(tunes, Path("."), log=logs.append, jobs=jobs, child=STAGE_CHILD), logs

    files = {}
    for jobs in (1, 2):  # one after another in this process, then both at once in child processes
        root = tmp_path / f"jobs{jobs}"
        shutil.copytree(quick_demo, root, ignore=shutil.ignore_patterns("stages"))
        before = len(spawned)
        records, logs = run(root, jobs)
        assert not any(r.skipped for r in records)
        files[jobs] = [r.files for r in records]
        if jobs == 1:
            assert len(spawned) == before  # no child process
        else:
            assert [a[: len(STAGE_CHILD)] for a in spawned[before:]] == [list(STAGE_CHILD)] * 2
            starts = [i for i, line in enumerate(logs) if line.endswith(" ...")]
            ends = [i for i, line in enumerate(logs) if line.endswith("s") and ": " in line]
            assert len(starts) == len(ends) == 2 and max(starts) < min(ends)  # both started before either ended
    assert files[1] == files[2]
    assert files[1][0] != files[1][1] and all(any(n.endswith("model.safetensors") for n in f) for f in files[1])
    demo_s0 = runner.read_json(quick_demo / "stages" / f"{GROUP}-s0.json")["files"]  # the demo's own run
    assert files[1][0] == demo_s0

