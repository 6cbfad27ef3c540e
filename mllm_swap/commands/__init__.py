"""Sub-commands of ``mllm-swap``, one module each, plus the flags they share."""

from __future__ import annotations

import argparse

OVERWRITE_HELP = (
    "replace a finished output of this command in --out (a directory this project did not write is "
    "always refused)"
)


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, meaning the same for every command that writes --out."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def add_resume(parser: argparse.ArgumentParser) -> None:
    """The resume vocabulary of every training command (``align METHOD``, ``tune``), with ``--overwrite``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue an unfinished run (default: from the newest intact checkpoint in --out; or from "
        "the CHECKPOINT directory given)",
    )
    group.add_argument("--no-resume", action="store_true", help="start over, clearing an unfinished run")
    add_overwrite(parser)


def resume_of(args: argparse.Namespace) -> bool | str:
    """The ``resume`` argument of the training loop from ``--resume`` / ``--no-resume``."""
    return False if args.no_resume else (args.resume or "auto")
