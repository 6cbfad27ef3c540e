"""``mllm-swap align sail|projector|kernel``: train a language-aligned vision encoder from a recipe.

Each method module exposes ``run(config, overrides, out_dir, resume) -> Path`` (the artifact directory)
and is imported only when its sub-command runs.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from align.errors import UserError
from mllm_swap.commands.options import add_resume, resume_of

# method -> (module, help, the embedded-default recipe in recipes/)
METHODS = {
    "sail": (
        "align.methods.sail",
        "SAIL: GLU heads on frozen DINOv2 + sentence-encoder embeddings, sigmoid loss",
        "tiny_sail.yaml",
    ),
    "projector": (
        "align.methods.freeze_align",
        "freeze-align: token projectors on frozen encoders, InfoNCE",
        "tiny_projector.yaml",
    ),
    "kernel": (
        "align.methods.kuea.recipe",
        "KUEA: fine-tune CLIP's image tower toward DINOv2's kernel",
        "tiny_kuea.yaml",
    ),
}


HELP = "train a language-aligned vision encoder (SAIL, freeze-align, KUEA)"
DESCRIPTION = (
    "Train an aligned vision encoder from a YAML recipe (see recipes/) with --set overrides; "
    "writes checkpoints, metrics.jsonl, loss.png and the artifact in OUT/artifact (with zero-shot scores in "
    "its model card). Rerunning the same command resumes from the newest checkpoint."
)


def run(args: argparse.Namespace) -> int:
    from align.distributed import global_rank
    from align.io import read_json

    module = importlib.import_module(METHODS[args.method][0])
    if args.config is not None and not Path(args.config).is_file():
        raise FileNotFoundError(f"{args.config}: recipe file not found")
    try:
        artifact = module.run(args.config, list(args.set or []), args.out, resume_of(args), args.overwrite)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    if global_rank() != 0:  # under `accelerate launch`, report once
        return 0
    print(f"artifact: {artifact}")
    config = read_json(Path(artifact) / "aligned_encoder.json")
    for label, scores in (config.get("metrics") or {}).get("zeroshot", {}).items():
        print(
            f"zero-shot {label}: acc1 {scores['acc1']:.4f} (chance {scores['chance']:.4f}, "
            f"majority {scores['majority']:.4f}, n {scores['n']})"
        )
    drift = (config.get("metrics") or {}).get("patch_drift")
    if drift:
        print(f"per-patch drift: cos(mean patch output, global output) = {drift['mean_patch_cosine']:.4f}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``align``."""
    methods = parser.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name, (_, help_text, recipe) in METHODS.items():
        sub = methods.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", help=f"recipe YAML (e.g. recipes/{recipe})")
        sub.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)"
        )
        sub.add_argument("--out", required=True, help="output directory of the run")
        add_resume(sub)
        sub.set_defaults(func=run)
