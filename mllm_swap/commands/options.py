"""The flags and argparse types that several ``mllm-swap`` sub-commands share."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from align.errors import UserError

OVERWRITE_HELP = (
    "replace a finished output of this command in --out (a directory this project did not write is "
    "always refused)"
)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``low`` (the flag is named in argparse's usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, found {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def device(text: str) -> str:
    """An argparse ``type``: a device this machine has (see ``align.devices.check_device``)."""
    from align.devices import check_device

    try:
        return check_device(text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
