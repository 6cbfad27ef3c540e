"""Run a pipeline as named stages that are skipped on rerun once their outputs check out.

A finished stage leaves ``<out>/stages/<name>.json``: its summary, the command-line equivalent that
reproduces it, and the sha256 of every output file it declared (by its path relative to ``<out>``). On rerun
a stage is skipped only if that record exists, it was made by the same command (a stage that declares its
command up front: e.g. a rerun with another ``--seed`` into the same folder runs again), and every recorded
file still exists with the same digest; otherwise it runs again (and so do the stages after it, whose
inputs may have changed).

Consecutive stages of one ``group`` do not read each other's outputs (e.g. one tuning seed each), so with
``jobs > 1`` up to ``jobs`` of them run at once, each in its own process (``child``: a program that runs
the JSON list of command lines it is given, e.g. ``python -m mllm_swap.commands.demo``). A grouped stage always runs on one thread, alone in this process or
beside others in its own, so its outputs are the same bytes either way; which of them are skipped is
decided in order exactly as when they run one after another.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import UserError
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
    group: str = ""  # consecutive stages of one group are independent: they may run at once (module doc)
    argvs: list[list[str]] = field(default_factory=list)  # its `mllm-swap` command lines (a grouped stage's)
    outputs: list[Path] = field(default_factory=list)  # the files it declares (a grouped stage's)


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


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stages(
    stages: list[Stage], root: Path, log: Callable[[str], None] = print, jobs: int = 1, child: Sequence[str] = ()
) -> list[StageRecord]:
    """Run ``stages`` in order under ``root``, skipping those whose recorded outputs are intact; up to ``jobs``
    stages of one group at once.

    The other stages run in this one process, whose heap keeps growing (every library imported, every model
    loaded); before each stage what is still alive is frozen out of the cyclic garbage collector
    (:func:`gc.freeze`), so the full collections a stage's tools run (lmms-eval runs three per model
    scored) scan only that stage's own objects, not the whole process (a second or more each).
    """
    root.mkdir(parents=True, exist_ok=True)
    try:
        return _run_stages(stages, root, log, jobs if child else 1, child)
    finally:
        gc.unfreeze()


def _batches(stages: list[Stage]) -> Iterator[list[tuple[int, Stage]]]:
    """``(number, stage)`` runs of consecutive stages of one group (a stage with no group alone)."""
    batch: list[tuple[int, Stage]] = []
    for i, stage in enumerate(stages, 1):
        if batch and not (stage.group and stage.group == batch[-1][1].group):
            yield batch
            batch = []
        batch.append((i, stage))
    if batch:
        yield batch


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _in_child(stage: Stage, root: Path, child: Sequence[str]) -> StageResult:
    """Run ``stage``'s command lines in a process of its own (``child``), on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = [*child, json.dumps(stage.argvs)]
    code = subprocess.run(argv, cwd=root, env=env, check=False).returncode
    if code != 0:  # the child printed its own error above
        raise UserError(f"demo stage {stage.name!r} failed (exit {code}): {stage.command}")
    return StageResult({}, stage.outputs, stage.command)


def _run_stages(
    stages: list[Stage], root: Path, log: Callable[[str], None], jobs: int, child: Sequence[str]
) -> list[StageRecord]:
    records: list[StageRecord] = []
    rerun_rest = False
    n = len(stages)
    lock = threading.Lock()

    def say(line: str) -> None:  # one line at a time from the stages that run at once
        with lock:
            log(line)

    for batch in _batches(stages):
        todo: list[tuple[int, Stage]] = []
        for i, stage in batch:
            record_file = root / "stages" / f"{stage.name}.json"
            if not rerun_rest and record_file.is_file():
                saved = read_json(record_file)
                if stage.command and saved.get("command") != stage.command:
                    log(f"[{i}/{n}] {stage.title}: made earlier by another command, running again")
                elif _still_valid(saved, root):
                    log(f"[{i}/{n}] {stage.title}: done earlier, outputs verified, skipped")
                    records.append(StageRecord(**{**saved, "skipped": True}))
                    continue
                else:
                    log(f"[{i}/{n}] {stage.title}: earlier outputs changed or missing, running again")
            rerun_rest = True
            todo.append((i, stage))
        if len(todo) > 1 and jobs > 1:
            with ThreadPoolExecutor(min(jobs, len(todo))) as pool:
                timed = list(pool.map(lambda item: _timed(item[0], n, item[1], lambda: _in_child(item[1], root, child),
                                                          say), todo))  # fmt: skip
        else:
            timed = [_timed(i, n, stage, stage.run, log, single=bool(stage.group)) for i, stage in todo]
        for (_, stage), (result, seconds) in zip(todo, timed, strict=True):
            record = StageRecord(
                stage.name,
                stage.title,
                result.summary,
                result.command,
                round(seconds, 1),
                False,
                _files(result.outputs, root),
            )
            write_json(root / "stages" / f"{stage.name}.json",
                       {k: v for k, v in record.__dict__.items() if k != "skipped"})  # fmt: skip
            records.append(record)
    return records


def _timed(
    i: int, n: int, stage: Stage, run: Callable[[], StageResult], log: Callable[[str], None], single: bool = False
) -> tuple[StageResult, float]:
    """``run()`` (on one thread when ``single``) and its wall seconds, logged."""
    log(f"[{i}/{n}] {stage.title} ...")
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    with _one_thread() if single else contextlib.nullcontext():
        result = run()
    seconds = time.perf_counter() - start
    log(f"[{i}/{n}] {stage.title}: {seconds:.1f}s")
    return result, seconds
