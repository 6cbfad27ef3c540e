"""Independent demo stages run at once (``demo --jobs``): each in a process of its own, with the same output
bytes as when they run one after another in the demo's process, and skipped on rerun by the same rule."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest

from mllm_swap.commands import run_argv
from mllm_swap.commands.demo import STAGE_CHILD
from mllm_swap.demo import stages as runner
from mllm_swap.demo.pipeline import QUICK, Plan, build_stages

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

    # rerun: both verified and skipped; once the first seed's output changes, it and the ones after it run again
    root = tmp_path / "jobs2"
    records, _ = run(root, 2)
    assert [r.skipped for r in records] == [True, True]
    model = root / next(n for n in files[2][0] if n.endswith("model.safetensors"))
    model.write_bytes(model.read_bytes() + b"\0")
    before = len(spawned)
    records, _ = run(root, 2)
    assert [r.skipped for r in records] == [False, False] and len(spawned) == before + 2
    assert [r.files for r in records] == files[1]
