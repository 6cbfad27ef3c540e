"""The ``mllm-swap`` command: one sub-command module per capability in ``mllm_swap.commands``.

Global flags: ``--version``, ``-v``/``-q`` (log level of the standard ``logging`` module, which every
library module logs through) and ``--debug`` (let the traceback of a failure through). Without
``--debug`` a failure is one paragraph on stderr and exit code 2 (bad input) or 1 (anything else).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version

from align.errors import UserError, explain

__all__ = ["COMMANDS", "at_least", "build_parser", "device", "main"]

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


def package_version() -> str:
    """The installed mllm-swap version (``unknown`` for a source tree that was never installed)."""
    try:
        return version("mllm-swap")
    except PackageNotFoundError:
        return "unknown"


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


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="mllm-swap",
        description="Align vision encoders to language (KUEA, SAIL, freeze-align), swap them into "
        "multimodal LLMs, tune and score the result.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    level.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"mllm_swap.commands.{name}").register(subparsers)
    return parser


class _StderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at the time (wrappers and tests replace it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(verbose: bool, quiet: bool) -> None:
    """Standard ``logging`` on stderr: INFO by default, DEBUG with -v, WARNING with -q."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)  # main() may run several times in one process (the demo, tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    name = " ".join(filter(None, [args.command, getattr(args, "method", None)]))
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"mllm-swap {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message = explain(err)
        if message is None:
            detail = " ".join(f"{type(err).__name__}: {err}".split())
            print(f"mllm-swap {name}: unexpected error ({detail}). Rerun with --debug for the traceback "
                  "and report it.", file=sys.stderr)  # fmt: skip
            return 1
        print(f"mllm-swap {name}: error: {message}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
