"""The ``mllm-swap`` sub-commands: one module each, the parser that gathers them, and running one.

Each name in :data:`COMMANDS` is a module ``mllm_swap.commands.<name>`` exposing ``HELP``, ``DESCRIPTION``,
``add_arguments(parser)`` and, unless its own sub-parsers set ``func``, ``run(args) -> int | None``; an
optional ``ALIASES`` lists older words still accepted. :func:`dispatch` turns a failure into one paragraph
on stderr and exit code 2 (bad input) or 1 (anything else), unless ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from align.errors import explain

# Order here is the order of ``--help``.
COMMANDS = ("encoders", "data", "pretrain", "encode", "align", "zeroshot", "probe", "curate", "eval", "rank", "tune", "merge",
            "swap", "plan", "predict", "calibrate", "demo")  # fmt: skip


def package_version() -> str:
    """The installed mllm-swap version (``unknown`` for a source tree that was never installed)."""
    try:
        return version("mllm-swap")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with the global flags and every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="mllm-swap",
        description="Align vision encoders to language (KUEA, SAIL, freeze_align), swap them into "
        "multimodal LLMs, tune and score the result.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    level.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"mllm_swap.commands.{name}")
        sub = subparsers.add_parser(
            name, aliases=getattr(module, "ALIASES", ()), help=module.HELP, description=module.DESCRIPTION
        )
        if hasattr(module, "run"):
            sub.set_defaults(func=module.run)
        module.add_arguments(sub)
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; return its exit code (a failure is explained on stderr, see above)."""
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


def run_argv(argv: list[str]) -> int:
    """Parse and run one ``mllm-swap`` command line in this process (logging left as configured)."""
    return dispatch(build_parser().parse_args(argv))
