"""Score checkpoints with lmms-eval in-process and compare them (table, CSV, bar chart).

Each model's run lands in ``OUT/<tag>/`` (``results.json``, ``samples_<task>.jsonl`` and lmms-eval's
own full results file ``lmms_eval_results.json``: versions, git hash, task configs and hashes) and is
reused when the same model files, tasks and limit ask for it again; ``OUT/comparison.{md,csv}`` (and
``comparison.png`` for several models) put the models side by side.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from align.io import atomic_path, read_json, sha256_file, write_json
from align.paths import locate, portable, portable_tree, shipped
from align.plots import pyplot, save_figure

EVAL_CONFIGS = shipped("eval_configs")
TASKS_DIR = EVAL_CONFIGS / "tasks"
SUITES_DIR = EVAL_CONFIGS / "suites"
SHAPES_ENV = "MLLM_SWAP_SHAPES_DIR"
# the local tasks that read the shapes world, and the file each reads there
SHAPES_TASKS = {"shapes_vqa": "vqa_test.jsonl", "shapes_mc": "vqa_test.jsonl", "shapes_mmvp": "mmvp_pairs.jsonl"}
LMMS_RESULTS = "lmms_eval_results.json"  # lmms-eval's own results file, next to our results.json
CSV_FIELDS = ("task", "metric", "filter", "model", "value", "stderr", "n", "higher_is_better")


def list_suites() -> list[str]:
    """Names of the suites shipped in ``eval_configs/suites``."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def load_suite(name: str) -> dict:
    """A suite by name (``eval_configs/suites/NAME.yaml``) or YAML path, checked for its keys."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITES_DIR / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suite not found; shipped suites: {', '.join(list_suites())}")
    suite = yaml.safe_load(path.read_text()) or {}
    entries = suite.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty 'tasks' list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "metric" not in entry or "task" not in entry:
            raise ValueError(f"{path}: tasks[{i}] needs 'task' and 'metric' keys, found {entry!r}")
    return {**suite, "path": str(path)}


def suite_tasks(suite: dict) -> list[str]:
    """The lmms-eval task names of a suite that the installed lmms-eval can run."""
    return [e["task"] for e in suite["tasks"] if e["task"]]


def parse_models(spec: str | Sequence[str]) -> dict[str, Path]:
    """``DIR,DIR`` or ``TAG=DIR,...`` as ``{tag: dir}``; tags default to the folder name, made unique."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    models: dict[str, Path] = {}
    for item in items:
        tag, _, path = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model checkpoint (no config.json)")
        tag = tag or path.resolve().name
        base, k = tag, 2
        while tag in models:
            tag, k = f"{base}-{k}", k + 1
        models[tag] = path.resolve()
    if not models:
        raise ValueError("no model given")
    return models


def fingerprint(model_dir: Path) -> str:
    """Hash of the config bytes and the weight files' names, sizes and modification times."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()) -> Any:
    """A TaskManager that knows ``tasks``: local folders only when they suffice (much faster to index)."""
    from lmms_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    local = TaskManager(include_path=paths, include_defaults=False, verbosity="WARNING")
    manager = (
        local if set(tasks) <= set(local.all_tasks) else TaskManager(include_path=paths, verbosity="WARNING")
    )
    missing = sorted(set(tasks) - set(manager.all_tasks))
    if missing:
        raise ValueError(f"unknown lmms-eval task(s) {missing}; local tasks: {local.all_tasks}")
    return manager


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


def run_model(
    model_dir: Path,
    tasks: Sequence[str],
    out_dir: Path,
    *,
    limit: int | None = None,
    model_args: dict | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    manager: Any = None,
) -> dict:
    """Evaluate one checkpoint on ``tasks``; write ``results.json`` and per-task samples into ``out_dir``.

    A finished run for the same model files, tasks, limit, model arguments (batch size aside) and shapes
    data is read back instead of recomputed. The shapes tasks read ``$MLLM_SWAP_SHAPES_DIR``.
    """
    request = {"model": str(model_dir), "fingerprint": fingerprint(model_dir), "tasks": sorted(tasks)}
    request["limit"] = limit
    request["model_args"] = {k: v for k, v in (model_args or {}).items() if k != "batch_size"}
    if set(tasks) & set(SHAPES_TASKS):  # the data is part of what was scored
        if not os.environ.get(SHAPES_ENV):
            raise ValueError(f"the shapes tasks need ${SHAPES_ENV} (a shapes-world folder)")
        request["shapes_sha256"] = sha256_file(Path(os.environ[SHAPES_ENV]) / "vqa_test.jsonl")
        if "shapes_mmvp" in tasks:
            request["mmvp_sha256"] = sha256_file(Path(os.environ[SHAPES_ENV]) / SHAPES_TASKS["shapes_mmvp"])
    request = portable_tree(request, out_dir)  # what is written: paths relative to out_dir
    results_path = out_dir / "results.json"
    if results_path.is_file():
        previous = read_json(results_path)
        if previous.get("request") == request:
            return previous | {"reused": True}
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.loggers import EvaluationTracker

    from mllm_swap.lmms.model import MllmSwap

    manager = manager or task_manager(tasks, include_paths)
    lm = MllmSwap(pretrained=str(model_dir), **(model_args or {}))
    tracker = EvaluationTracker()  # lmms-eval's own record of the run; written below, never pushed
    # the record of the arguments (lm is built above): the model as a path relative to out_dir, or its id
    recorded = {"pretrained": portable(model_dir, out_dir), **(model_args or {})}
    args = ",".join(f"{k}={v}" for k, v in recorded.items())
    raw = simple_evaluate(model=lm, model_args=args, tasks=list(tasks), task_manager=manager, limit=limit,
                          log_samples=True, evaluation_tracker=tracker)  # fmt: skip
    del lm
    gc.collect()
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker.general_config_tracker.model_source = "mllm_swap"  # the lmms-eval model name of MllmSwap
    save_lmms_results(tracker, raw, out_dir / LMMS_RESULTS)
    for task, samples in (raw.get("samples") or {}).items():
        with atomic_path(out_dir / f"samples_{task}.jsonl") as tmp, tmp.open("w") as fh:
            for sample in samples:
                fh.write(json.dumps(portable_tree(_jsonable(sample), out_dir)) + "\n")
    record = {
        "request": request,
        "model_args": model_args or {},
        "shapes_dir": portable(os.environ[SHAPES_ENV], out_dir) if os.environ.get(SHAPES_ENV) else None,
        "results": _jsonable(raw["results"]),
        "higher_is_better": _jsonable(raw.get("higher_is_better", {})),
        "n-samples": _jsonable(raw.get("n-samples", {})),
        "versions": _jsonable(raw.get("versions", {})),
    }
    write_json(results_path, record)
    return record | {"reused": False}


def save_lmms_results(tracker: Any, raw: dict, path: Path) -> None:
    """lmms-eval's full results file (versions, git hash, task configs and hashes, timing), written by
    lmms-eval's own ``EvaluationTracker`` exactly as its CLI writes ``<date>_results.json``."""
    import tempfile

    results = {k: v for k, v in raw.items() if k != "samples"}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".lmms-eval-") as tmp:
        tracker.output_path = tmp
        tracker.save_results_aggregated(results=results, samples=raw.get("samples"), datetime_str=raw["date"])
        written = sorted(Path(tmp).rglob("*_results.json"))
        if len(written) != 1:  # lmms-eval logs and swallows its own write errors
            raise RuntimeError(f"lmms-eval did not write its results file under {tmp} (found {written})")
        # lmms-eval's record, with any absolute path of this machine made relative to where it lands
        write_json(path, portable_tree(read_json(written[0]), path.parent))


def metric_rows(runs: dict[str, dict], suite: dict | None = None) -> list[dict]:
    """One row per (task, metric, model): value and stderr, in a stable order.

    With a suite, each task keeps only the metric the paper reports (all metrics when that one is absent).
    """
    wanted = {e["task"]: e["metric"] for e in suite["tasks"]} if suite else {}
    rows = []
    for tag, run in runs.items():
        for task, metrics in sorted(run["results"].items()):
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                higher = run.get("higher_is_better", {}).get(task, {}).get(metric)
                rows.append(
                    {
                        "task": task,
                        "metric": metric,
                        "filter": filt,
                        "model": tag,
                        "value": float(value),
                        "stderr": stderr if isinstance(stderr, (int, float)) else None,
                        "n": run.get("n-samples", {}).get(task, {}).get("effective"),
                        "higher_is_better": higher,
                    }
                )
    if wanted:
        keep = [r for r in rows if wanted.get(r["task"]) == r["metric"]]
        covered = {r["task"] for r in keep}
        rows = keep + [r for r in rows if r["task"] not in covered]
    return rows


def _pivot(rows: list[dict]) -> tuple[list[tuple[str, str, str]], list[str], dict]:
    keys = list(dict.fromkeys((r["task"], r["metric"], r["filter"]) for r in rows))
    models = list(dict.fromkeys(r["model"] for r in rows))
    table = {(r["task"], r["metric"], r["filter"], r["model"]): r for r in rows}
    return keys, models, table


def write_comparison(out: Path, runs: dict[str, dict], suite: dict | None = None, command: str = "") -> dict:
    """Write ``comparison.md`` and ``comparison.csv`` (and ``comparison.png`` for 2+ models)."""
    rows = metric_rows(runs, suite)
    keys, models, table = _pivot(rows)
    with atomic_path(out / "comparison.csv") as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    base = models[0] if models else ""
    header = ["task", "metric", *models] + [f"Δ {m} vs {base}" for m in models[1:]]
    lines = ["# Model comparison (lmms-eval)", ""]
    if suite:
        lines += [f"Suite: **{suite.get('name', suite['path'])}** — {suite.get('title', '')}", ""]
    if command:
        lines += ["Command:", "", f"    {command}", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task, metric, filt in keys:
        cells = [task, metric if filt == "none" else f"{metric} ({filt})"]
        values = [table.get((task, metric, filt, m)) for m in models]
        for r in values:
            err = f" ± {r['stderr']:.3f}" if r and r["stderr"] is not None else ""
            cells.append(f"{r['value']:.4f}{err}" if r else "—")
        ref = values[0]
        for r in values[1:]:
            cells.append(f"{r['value'] - ref['value']:+.4f}" if r and ref else "—")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Models:", ""]
    for tag, run in runs.items():
        req = run["request"]
        model = portable(locate(req["model"], out / tag), out)  # recorded relative to out/tag
        lines.append(f"- `{tag}`: {model} (limit {req['limit']}, fingerprint {req['fingerprint']})")
    with atomic_path(out / "comparison.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    paths = {"markdown": str(out / "comparison.md"), "csv": str(out / "comparison.csv")}
    if len(models) > 1 and keys:
        paths["chart"] = str(bar_chart(out / "comparison.png", keys, models, table))
    else:  # a chart from an earlier run with other models would contradict the table
        (out / "comparison.png").unlink(missing_ok=True)
    return paths


def bar_chart(path: Path, keys: list, models: list[str], table: dict) -> Path:
    """One panel per (task, metric), one bar per model, each panel on its own scale."""
    plt = pyplot()

    cols = min(3, len(keys))
    nrows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (task, metric, filt) in zip(axes.flat, keys, strict=False):
        rows = [table.get((task, metric, filt, m)) for m in models]
        values = [r["value"] if r else math.nan for r in rows]  # a model without the metric: no bar
        errors = [(r["stderr"] or 0.0) if r else 0.0 for r in rows]
        ax.bar(
            range(len(models)),
            values,
            yerr=errors,
            capsize=3,
            color=[colors[i % len(colors)] for i in range(len(models))],
        )
        ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{task}\n{metric}", fontsize=9)
        shown = [(v, e) for v, e in zip(values, errors, strict=True) if not math.isnan(v)]
        top = max((v + e for v, e in shown), default=1.0)
        if min((v for v, _ in shown), default=0.0) >= 0:  # [0, 1] for rates; else room above the top
            ax.set_ylim(0, 1.1 if top <= 1 else top * 1.15)
        for i, (v, e) in enumerate(zip(values, errors, strict=True)):
            label, y = ("n/a", 0.0) if math.isnan(v) else (f"{v:.3g}", v + e)
            ax.annotate(label, (i, y), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def evaluate_models(
    models: dict[str, Path],
    out: str | os.PathLike,
    *,
    tasks: Sequence[str] | None = None,
    suite: str | None = None,
    limit: int | None = None,
    shapes: str | os.PathLike | None = None,
    model_args: dict | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    command: str = "",
) -> dict:
    """Run every model on the tasks (or suite) and write the comparison; returns paths and runs."""
    if bool(tasks) == bool(suite):
        raise ValueError("give exactly one of tasks or suite")
    suite_cfg = load_suite(suite) if suite else None
    task_list = list(tasks) if tasks else suite_tasks(suite_cfg)
    shapes = shapes if shapes is not None else os.environ.get(SHAPES_ENV)
    needed = sorted({"vqa_test.jsonl"} | {SHAPES_TASKS[t] for t in task_list if t in SHAPES_TASKS})
    missing = [Path(shapes) / name for name in needed if not (Path(shapes) / name).is_file()] if shapes else []
    if missing:
        hint = " (write it with `mllm-swap data mmvp --data DIR`)" if "mmvp_pairs.jsonl" in str(missing) else ""
        raise FileNotFoundError(f"{', '.join(map(str, missing))}: not found; expected a shapes-world folder{hint}")
    if set(task_list) & set(SHAPES_TASKS) and not shapes:
        raise ValueError(
            f"tasks {sorted(set(task_list) & set(SHAPES_TASKS))} need --shapes DIR (or ${SHAPES_ENV})"
        )
    manager = task_manager(task_list, include_paths)  # fails on unknown names before any model loads
    out = Path(out)
    runs = {}
    previous = os.environ.get(SHAPES_ENV)
    try:
        if shapes:
            os.environ[SHAPES_ENV] = str(Path(shapes).resolve())  # read by the shapes tasks' loader
        for tag, path in models.items():
            runs[tag] = run_model(
                path, task_list, out / tag, limit=limit, model_args=model_args, manager=manager
            )
    finally:
        if previous is None:
            os.environ.pop(SHAPES_ENV, None)
        else:
            os.environ[SHAPES_ENV] = previous
    paths = write_comparison(out, runs, suite_cfg, command)
    return {"paths": paths, "runs": runs, "tasks": task_list}
