"""``mllm-swap demo``: the three papers' stories on the embedded default, with report.md and findings.json."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "run the whole pipeline on the embedded default (tiny models, shapes world); write report.md, findings.json"
DESCRIPTION = (
    "From --seed: the shapes world, tiny CLIP and DINOv2, linear probes -> freeze_align (debiased CKA ranking, "
    "toy) -> SAIL (zero-shot; its tower rebuilt into a tiny LLaVA and tuned exactly like a CLIP control) -> "
    "KUEA (kernel discrepancy, zero-shot kept, no-anchor ablation; drop-in with no tuning and after the same "
    "tuning) -> lmms-eval scores by question kind with standard errors and the spread over --seeds tuning "
    "seeds -> OUT/report.md and OUT/findings.json. Offline, CPU, minutes. Rerunning skips stages whose "
    "outputs check out."
)


def run(args: argparse.Namespace) -> int:
    from align.errors import UserError
    from mllm_swap.commands import run_argv
    from mllm_swap.demo.pipeline import FULL, QUICK, Plan
    from mllm_swap.demo.run import run_demo

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(
            f"--out {args.out}: is a file; expected a directory (new or from an earlier demo run)"
        )
    if args.seed < 0:
        raise UserError(f"--seed {args.seed}: expected an integer >= 0")
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: expected at least 1 tuning seed")
    plan = Plan(QUICK if args.quick else FULL, seed=args.seed, seeds=args.seeds or 0)
    report = run_demo(args.out, run_argv, plan)
    print(f"report: {report}\nfindings: {report.parent / 'findings.json'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the world and every model, alignment and tuning run (default 0)")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None,
                        help="tuning seeds of the tuned arms (default: 3; --quick: 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what the tests run)")
