"""``mllm-swap demo``: the three papers' stories on the embedded default, as the same commands a user would type.

The stages (:mod:`mllm_swap.demo.pipeline`) run inside the output directory with paths relative to it
(the recipes they use are copied into ``recipes/`` there), so the directory travels and nothing in it names
the machine's paths; finished stages are skipped on rerun once their outputs check out
(:mod:`mllm_swap.demo.stages`), and ``findings.json`` and ``report.md`` are written from what they left
(:mod:`mllm_swap.demo.report`).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from pathlib import Path

from align.paths import shipped
from mllm_swap.demo.pipeline import RECIPES, Plan, RunCommand, build_stages
from mllm_swap.demo.report import write_report
from mllm_swap.demo.stages import run_stages


def run_demo(out: str | Path, run_command: RunCommand, plan: Plan, jobs: int = 1, child: Sequence[str] = ()) -> Path:
    """Run (or resume) the demo ``plan`` under ``out``, each step through ``run_command``; returns ``report.md``.

    With ``jobs > 1`` and a ``child`` program (see :func:`mllm_swap.demo.stages.run_stages`) independent stages
    (the tuning seeds, the two towers' pretraining) run up to ``jobs`` at once, with the same outputs."""
    root = Path(out).resolve()
    (root / "recipes").mkdir(parents=True, exist_ok=True)
    for name in RECIPES:  # the exact recipes the commands use, next to them
        shutil.copyfile(shipped("recipes") / name, root / "recipes" / name)
    with contextlib.chdir(root):
        records = run_stages(build_stages(plan, run_command), Path("."), jobs=jobs, child=child)
    return write_report(root, records, plan)
