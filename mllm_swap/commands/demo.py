"""``mllm-swap demo``: the embedded default end to end, with a report."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run the whole pipeline on the embedded default (tiny models, shapes world) and write report.md"
DESCRIPTION = (
    "Shapes world -> encoder-pair scores -> SAIL, freeze_align and KUEA -> zero-shot table -> "
    "swap into a tuned tiny LLaVA (KUEA drop-in, SAIL rebuild) -> connector + LoRA tuning -> lmms-eval "
    "scores -> OUT/report.md. Offline, CPU, minutes. Rerunning skips stages whose outputs check out."
)


def run(args: argparse.Namespace) -> int:
    from align.errors import UserError
    from mllm_swap.commands import run_argv
    from mllm_swap.demo.run import run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(
            f"--out {args.out}: is a file; expected a directory (new or from an earlier demo run)"
        )
    report = run_demo(args.out, run_argv, quick=args.quick)
    print(f"report: {report}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what the tests run)")
