"""``mllm-swap align kuea|sail|freeze_align``: train a language-aligned vision encoder from a recipe.

The methods and their older names (accepted as aliases) come from ``align.methods.METHODS``; a method's
module is imported only when its sub-command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from align.errors import UserError
from align.methods import METHODS, run_method
from mllm_swap.commands.options import add_resume, resume_of


def run(args: argparse.Namespace) -> int:
    from align.artifact import CONFIG_FILE
    from align.distributed import global_rank
    from align.io import read_json

    if args.config is not None and not Path(args.config).is_file():
        raise FileNotFoundError(f"{args.config}: recipe file not found")
    try:
        artifact = run_method(
            args.method, args.config, list(args.set or []), args.out, resume_of(args), args.overwrite
        )
    except FileExistsError as err:
        raise UserError(str(err)) from None
    if global_rank() != 0:  # under `accelerate launch`, report once
        return 0
    print(f"artifact: {artifact}")
    config = read_json(Path(artifact) / CONFIG_FILE)
    for label, scores in (config.get("metrics") or {}).get("zeroshot", {}).items():
        print(
            f"zero-shot {label}: acc1 {scores['acc1']:.4f} (chance {scores['chance']:.4f}, "
            f"majority {scores['majority']:.4f}, n {scores['n']})"
        )
    drift = (config.get("metrics") or {}).get("patch_drift")
    if drift:
        print(f"per-patch drift: cos(mean patch output, global output) = {drift['mean_patch_cosine']:.4f}")
    return 0


HELP = "train a language-aligned vision encoder (KUEA, SAIL, freeze_align)"
DESCRIPTION = (
    "Train an aligned vision encoder from a YAML recipe (see recipes/) with --set overrides; "
    "writes checkpoints, metrics.jsonl, loss.png and the artifact in OUT/artifact (with zero-shot scores in "
    "its model card). Rerunning the same command resumes from the newest checkpoint."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``align``: one sub-command per method (older names as aliases)."""
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, entry in METHODS.items():
        sub = methods.add_parser(
            name, aliases=list(entry.aliases), help=entry.summary, description=entry.summary
        )
        sub.add_argument("--config", help=f"recipe YAML (e.g. recipes/{entry.tiny_recipe})")
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)"
        )
        sub.add_argument("--out", required=True, help="output directory of the run")
        add_resume(sub)
        sub.set_defaults(func=run)
