"""Run a pipeline as named stages that are skipped on rerun once their outputs check out.

A finished stage leaves ``<out>/stages/<name>.json``: its summary, the command-line equivalent that
reproduces it, and the sha256 of every output file it declared (by its path relative to ``<out>``). On rerun
a stage is skipped only if that record exists, it was made by the same command (a stage that declares its
command up front: e.g. a rerun with another ``--seed`` into the same folder runs again), and every recorded
file still exists with the same digest; otherwise it runs again (and so do the stages after it, whose
inputs may have changed).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.io import read_json, sha256_file, write_json


@dataclass
class StageResult:
    """What a stage returns: a JSON-able summary and the files that prove it finished."""

    summary: dict[str, Any]
    outputs: list[Path]
    command: str = ""


@dataclass
class Stage:
    name: str
    title: str
    run: Callable[[], StageResult]
    command: str = ""  # what it will run, when known up front ("": not checked on rerun)


@dataclass
class StageRecord:
    name: str
    title: str
    summary: dict[str, Any]
    command: str
    seconds: float
    skipped: bool
    files: dict[str, str] = field(default_factory=dict)


def _files(outputs: Iterable[Path], root: Path) -> dict[str, str]:
    files = {}
    for path in outputs:
        path = Path(path)
        targets = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        if not targets or not all(p.is_file() for p in targets):
            raise FileNotFoundError(f"stage output {path} was not written")
        for p in targets:
            files[os.path.relpath(p, root)] = sha256_file(p)
    return files


def _still_valid(record: dict, root: Path) -> bool:
    for name, digest in record.get("files", {}).items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return bool(record.get("files"))


def run_stages(stages: list[Stage], root: Path, log: Callable[[str], None] = print) -> list[StageRecord]:
    """Run ``stages`` in order under ``root``, skipping those whose recorded outputs are intact.

    The stages run in this one process, whose heap keeps growing (every library imported, every model
    loaded); before each stage what is still alive is frozen out of the cyclic garbage collector
    (:func:`gc.freeze`), so the full collections a stage's tools run (lmms-eval runs three per model
    scored) scan only that stage's own objects, not the whole process (a second or more each).
    """
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stages(stages, root, log)
    finally:
        gc.unfreeze()


def _run_stages(stages: list[Stage], root: Path, log: Callable[[str], None]) -> list[StageRecord]:
    records: list[StageRecord] = []
    rerun_rest = False
    for i, stage in enumerate(stages, 1):
        record_file = root / "stages" / f"{stage.name}.json"
        if not rerun_rest and record_file.is_file():
            saved = read_json(record_file)
            if stage.command and saved.get("command") != stage.command:
                log(f"[{i}/{len(stages)}] {stage.title}: made earlier by another command, running again")
            elif _still_valid(saved, root):
                log(f"[{i}/{len(stages)}] {stage.title}: done earlier, outputs verified, skipped")
                records.append(StageRecord(**{**saved, "skipped": True}))
                continue
            else:
                log(f"[{i}/{len(stages)}] {stage.title}: earlier outputs changed or missing, running again")
        rerun_rest = True
        log(f"[{i}/{len(stages)}] {stage.title} ...")
        start = time.perf_counter()
        gc.collect()
        gc.freeze()
        result = stage.run()
        seconds = time.perf_counter() - start
        record = StageRecord(
            stage.name,
            stage.title,
            result.summary,
            result.command,
            round(seconds, 1),
            False,
            _files(result.outputs, root),
        )
        write_json(record_file, {k: v for k, v in record.__dict__.items() if k != "skipped"})
        log(f"[{i}/{len(stages)}] {stage.title}: {seconds:.1f}s")
        records.append(record)
    return records
