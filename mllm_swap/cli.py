"""The ``mllm-swap`` console entry point: logging on stderr, then the command line
(:mod:`mllm_swap.commands` parses and runs it).

Global flags: ``--version``, ``-v``/``-q`` (log level of the standard ``logging`` module, which every
library module logs through) and ``--debug`` (let the traceback of a failure through). Without
``--debug`` a failure is one paragraph on stderr and exit code 2 (bad input) or 1 (anything else).
"""

from __future__ import annotations

import logging
import sys

from mllm_swap.commands import build_parser, dispatch

__all__ = ["configure_logging", "main"]


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
        root.removeHandler(handler)  # main() may run several times in one process (tests)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, args.quiet)
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
