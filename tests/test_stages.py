"""The demo's stage runner: finished stages are skipped only when their recorded outputs still verify."""

from __future__ import annotations

from pathlib import Path

import pytest

from mllm_swap.demo.stages import Stage, StageResult, run_stages


def make_stages(root: Path, calls: list[str]) -> list[Stage]:
    def writer(name: str, content: str):
        def run() -> StageResult:
            calls.append(name)
            path = root / f"{name}.txt"
            path.write_text(content)
            return StageResult({"name": name}, [path], command=f"write {name}")

        return Stage(name, name.title(), run)

    return [writer("first", "1"), writer("second", "2"), writer("third", "3")]


def test_rerun_skips_verified_stages_and_redoes_changed_ones(tmp_path: Path) -> None:
    calls: list[str] = []
    records = run_stages(make_stages(tmp_path, calls), tmp_path, log=lambda _: None)
    assert calls == ["first", "second", "third"] and not any(r.skipped for r in records)

    calls.clear()
    records = run_stages(make_stages(tmp_path, calls), tmp_path, log=lambda _: None)
    assert calls == [] and all(r.skipped for r in records)
    assert records[1].command == "write second"

    (tmp_path / "second.txt").write_text("tampered")  # an output changed: that stage and later ones run again
    calls.clear()
    run_stages(make_stages(tmp_path, calls), tmp_path, log=lambda _: None)
    assert calls == ["second", "third"]


def test_stage_that_does_not_write_its_outputs_fails(tmp_path: Path) -> None:
    stage = Stage("bad", "Bad", lambda: StageResult({}, [tmp_path / "never.txt"]))
    with pytest.raises(FileNotFoundError, match="never.txt"):
        run_stages([stage], tmp_path, log=lambda _: None)
    assert not (tmp_path / "stages" / "bad.json").exists()


def test_stage_made_by_another_command_runs_again(tmp_path: Path) -> None:
    """A stage that declares its command up front is skipped only when the record says the same command made
    it (e.g. a demo rerun with another --seed into the same folder must not reuse the first seed's outputs)."""
    calls: list[str] = []

    def stage(command: str) -> Stage:
        def run() -> StageResult:
            calls.append(command)
            (tmp_path / "out.txt").write_text(command)
            return StageResult({}, [tmp_path / "out.txt"], command=command)

        return Stage("s", "S", run, command=command)

    logs: list[str] = []
    run_stages([stage("make --seed 0")], tmp_path, log=logs.append)
    run_stages([stage("make --seed 0")], tmp_path, log=logs.append)
    assert calls == ["make --seed 0"] and "outputs verified, skipped" in logs[-1]
    run_stages([stage("make --seed 1")], tmp_path, log=logs.append)
    assert calls == ["make --seed 0", "make --seed 1"] and (tmp_path / "out.txt").read_text() == "make --seed 1"
    assert any("made earlier by another command, running again" in line for line in logs)
