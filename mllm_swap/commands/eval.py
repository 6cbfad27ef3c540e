"""``mllm-swap eval``: score checkpoints with lmms-eval and compare them."""

from __future__ import annotations

import argparse
import shlex

from align.errors import UserError
from mllm_swap.commands.options import device

HELP = "score checkpoints with lmms-eval and write a comparison"
DESCRIPTION = (
    "Run lmms-eval in-process on each checkpoint (HF Llava, IDEFICS or original LLaVA), "
    "keep its results, samples and lmms-eval's full results file (lmms_eval_results.json) under OUT/<tag>/, and write OUT/comparison.md, comparison.csv and, "
    "for several models, comparison.png. A model whose files, tasks and limit did not change since "
    "its last run is not scored again. The local tasks shapes_vqa and shapes_mc read the shapes "
    "world given by --shapes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``eval``."""
    parser.add_argument(
        "--model", required=True, help="checkpoint dirs, comma-separated; TAG=DIR names a column"
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="lmms-eval task names, comma-separated (e.g. shapes_vqa,shapes_mc)")
    which.add_argument("--suite", help="a suite name from eval_configs/suites or a suite YAML path")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--limit", type=int, help="score only the first N documents of each task")
    parser.add_argument("--shapes", help="shapes-world folder (holding vqa_test.jsonl) for the shapes tasks")
    parser.add_argument("--batch-size", type=int, default=1, help="requests per forward pass (default 1)")
    parser.add_argument("--device", type=device, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="generation cap when a task sets none (default 32)"
    )
    parser.add_argument(
        "--include-path", action="append", default=[], help="extra lmms-eval task folder; repeatable"
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate the models and print where the comparison went."""
    from mllm_swap.lmms.suites import evaluate_models, parse_models

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise UserError("--batch-size and --max-new-tokens must be at least 1")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    if args.tasks is not None and not tasks:
        raise UserError("--tasks is empty")
    summary = evaluate_models(
        parse_models(args.model),
        args.out,
        tasks=tasks,
        suite=args.suite,
        limit=args.limit,
        shapes=args.shapes,
        model_args={
            "batch_size": args.batch_size,
            "device": args.device,
            "dtype": args.dtype,
            "max_new_tokens": args.max_new_tokens,
        },
        include_paths=args.include_path,
        command=_command(args),
    )
    for tag, run in summary["runs"].items():
        state = "reused" if run["reused"] else "scored"
        print(f"{tag}: {state} -> {args.out}/{tag}/results.json")
    for kind, path in summary["paths"].items():
        print(f"{kind}: {path}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (defaults left out)."""
    words = ["mllm-swap", "eval", "--model", args.model]
    words += ["--tasks", args.tasks] if args.tasks else ["--suite", args.suite]
    words += ["--out", args.out]
    defaults = {"limit": None, "shapes": None, "batch_size": 1, "device": "auto", "dtype": "auto",
                "max_new_tokens": 32}  # fmt: skip
    for key, default in defaults.items():
        if getattr(args, key) != default:
            words += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for path in args.include_path:
        words += ["--include-path", path]
    return shlex.join(words)
