"""``mllm-swap demo``: the three papers' stories on the embedded default, with report.md and findings.json."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from align.errors import UserError

HELP = "run the whole pipeline on the embedded default (tiny models, shapes world); write report.md, findings.json"
DESCRIPTION = (
    "From --seed: the shapes world, tiny CLIP and DINOv2, linear probes -> freeze_align (debiased CKA ranking, "
    "toy) -> SAIL (zero-shot; its tower rebuilt into a tiny LLaVA and tuned exactly like a CLIP control) -> "
    "KUEA (kernel discrepancy, zero-shot kept, no-anchor ablation; drop-in with no tuning and after the same "
    "tuning) -> lmms-eval scores by question kind with standard errors and the spread over --seeds tuning "
    "seeds -> OUT/report.md and OUT/findings.json. Offline, CPU, minutes. Rerunning skips stages whose "
    "outputs check out. Several world seeds (--seed 0,1) or --compare RUN RUN: the runs' findings side by "
    "side in OUT/comparison.md."
)


def run(args: argparse.Namespace) -> int:
    from mllm_swap.commands import run_argv
    from mllm_swap.demo.compare import write_comparison
    from mllm_swap.demo.pipeline import FULL, QUICK, Plan
    from mllm_swap.demo.run import run_demo
    from mllm_swap.demo.stages import usable_cores

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(
            f"--out {args.out}: is a file; expected a directory (new or from an earlier demo run)"
        )
    if args.compare:
        print(f"comparison: {write_comparison(args.out, args.compare)}")
        return 0
    if args.seeds is not None and args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: expected at least 1 tuning seed")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: expected at least 1")
    seeds = world_seeds(args.seed)
    runs = {s: Path(args.out) / f"seed-{s}" if len(seeds) > 1 else Path(args.out) for s in seeds}
    for seed, out in runs.items():
        plan = Plan(QUICK if args.quick else FULL, seed=seed, seeds=args.seeds or 0)
        jobs = args.jobs or (usable_cores() if plan.size.parallel else 1)
        report = run_demo(out, run_argv, plan, jobs=jobs, child=STAGE_CHILD)
        print(f"report: {report}\nfindings: {report.parent / 'findings.json'}")
    if len(runs) > 1:
        print(f"comparison: {write_comparison(args.out, list(runs.values()))}")
    return 0


STAGE_CHILD = (sys.executable, "-m", "mllm_swap.commands.demo")  # runs one stage's command lines (main below)


def world_seeds(value: str) -> list[int]:
    """``--seed``: one seed, or several comma-separated (each an integer >= 0, no repeats)."""
    try:
        seeds = [int(v) for v in value.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise UserError(f"--seed {value}: expected an integer >= 0, or several comma-separated")
    if len(set(seeds)) < len(seeds):
        raise UserError(f"--seed {value}: a seed is repeated; expected distinct seeds")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``demo``."""
    parser.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    parser.add_argument("--seed", default="0",
                        help="seed of the world and every model, alignment and tuning run (default 0); several, "
                        "comma-separated (e.g. 0,1): one run each in OUT/seed-S, side by side in "
                        "OUT/comparison.md")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=None,
                        help="tuning seeds of the tuned arms (default: 3; --quick: 1)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (what the tests run)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="independent stages (tuning seeds, the two towers' pretraining) run up to this many at "
                        "once, one thread each, with the same results (default: the CPU cores available; --quick: 1)")  # fmt: skip
    parser.add_argument("--compare", nargs="+", metavar="RUN",
                        help="run nothing: put the findings of these finished demo runs side by side in "
                        "OUT/comparison.md and comparison.json")  # fmt: skip


def main(argvs_json: str) -> int:
    """Run one demo stage's ``mllm-swap`` command lines (a JSON list of argv lists) in this process, in order."""
    from mllm_swap.commands import run_argv

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # as the cli's
    for argv in json.loads(argvs_json):
        code = run_argv(argv)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
