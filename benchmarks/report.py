"""One results table for a folder of benchmark outputs (``benchmarks/gpu_pass.sh`` writes them).

    python benchmarks/report.py OUT [--run NAME=RUN_DIR ...]

``--run``: a training run's directory (``metrics.jsonl``, ``result.json``) summarised as ``OUT/NAME.json``
and ``.md``: steps, median step time after the first step, samples/s, the launch (precision, engine).
Then ``OUT/results.md`` = the machine (``OUT/env.json``), every ``OUT/*.md`` table in name order, and
the failed steps (``OUT/status.tsv``: name, exit code, log file) with the last lines of their logs;
``OUT/results.json`` = every ``OUT/*.json`` by name.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from common import machine_info, write_results

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def summarize_run(name: str, run_dir: Path, out: Path) -> None:
    """A loop run's per-step log as one row (``OUT/name.json`` and ``.md``); missing files name themselves."""
    metrics, result = run_dir / "metrics.jsonl", run_dir / "result.json"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: no per-step log (the run did not start training)")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    launch = json.loads(result.read_text()).get("launch", {}) if result.is_file() else {}
    batch = launch.get("global_batch")
    rates = [r["samples_per_s"] for r in rows[1:]] or [r["samples_per_s"] for r in rows]
    row = {"run": name, "steps": rows[-1]["step"] if rows else 0, "final_loss": round(rows[-1]["loss"], 4)}
    row["samples_per_s"] = round(statistics.median(rates), 2)
    row["step_s"] = round(batch / row["samples_per_s"], 4) if batch else "-"
    row.update({k: launch.get(k, "-") for k in ("global_batch", "mixed_precision", "engine", "zero_stage")})
    row["finished"] = result.is_file()
    columns = ["run", "steps", "global_batch", "mixed_precision", "engine", "step_s", "samples_per_s"]
    write_results(
        out / f"{name}.json",
        {"benchmark": name, "machine": machine_info(DEVICE), "rows": [row]},
        columns + ["final_loss", "finished"],
    )


def combine(out: Path) -> None:
    """``results.md`` and ``results.json`` from the folder's tables, environment and status."""
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    lines = ["# Benchmark results", "", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    for md in sorted(out.glob("*.md")):
        if md.name != "results.md":
            lines += [md.read_text(), ""]
    failed = []
    status = out / "status.tsv"
    if status.is_file():
        for line in status.read_text().splitlines():
            name, code, seconds, log = line.split("\t")
            lines.append(f"- {name}: exit {code}, {seconds} s")
            if code != "0":
                tail = (
                    Path(log).read_text(errors="replace").strip().splitlines()[-15:]
                    if Path(log).is_file()
                    else []
                )
                failed.append(
                    f"### {name} failed (exit {code}); last lines of {Path(log).name}\n\n```\n"
                    + "\n".join(tail)
                    + "\n```\n"
                )
    lines += ["", *failed]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    merged = {
        p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "results.json"
    }
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR")
    args = parser.parse_args()
    for item in args.run:
        name, _, run_dir = item.partition("=")
        if not run_dir:
            parser.error(f"--run {item!r}: expected NAME=RUN_DIR")
        try:
            summarize_run(name, Path(run_dir), args.out)
        except (OSError, ValueError, KeyError) as err:
            print(f"report: run {name}: {err}")
    combine(args.out)


if __name__ == "__main__":
    main()
