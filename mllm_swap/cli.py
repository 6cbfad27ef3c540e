"""The ``mllm-swap`` command: one sub-command module per capability in ``mllm_swap.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each name is a module ``mllm_swap.commands.<name>`` exposing ``register(subparsers)``; the
# parser it adds sets ``func(args) -> int | None``. Order here is the order of ``--help``.
COMMANDS = [
    "encoders",
    "data",
    "encode",
    "align",
    "zeroshot",
    "curate",
    "eval",
    "score",
    "tune",
    "merge",
    "swap",
    "demo",
]


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="mllm-swap",
        description="Align vision encoders to language (KUEA, SAIL, freeze-align), swap them into "
        "multimodal LLMs, tune and score the result.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mllm_swap.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from align.train import NonFiniteLossError

    try:
        code = args.func(args)
    except (UserError, FileNotFoundError, ValueError, KeyError, NonFiniteLossError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"mllm-swap {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
