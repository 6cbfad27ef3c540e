"""``mllm-swap probe``: what each vision tower knows, measured by linear probes (:mod:`align.evals.attributes`)."""

from __future__ import annotations

import argparse

from align.errors import UserError
from mllm_swap.commands.options import add_overwrite, at_least, device

HELP = "linear-probe accuracy of attributes (color, shape, count, position) in frozen vision features"
DESCRIPTION = (
    "For every --encoder and every --labels attribute of --data's samples (the shapes world's color, "
    "shape, count, position), fit a multinomial logistic regression on the train split's frozen features "
    "and score it on the test split, next to chance and the majority class. Three features per encoder: its "
    "CLS (or projected) output, and the patch tokens an MLLM's connector sees (layer -2, prefix tokens "
    "dropped), mean-pooled and pooled to a 4x4 grid (which keeps where things are). Writes OUT/probe.json, OUT/probe.md and the bar chart OUT/probe.png."
)


def run(args: argparse.Namespace) -> int:
    """Check the data and labels, then probe every encoder and write the outputs."""
    from align.evals.attributes import format_table, parse_labels, read_probe_data, run_probe

    encoders = [e.strip() for e in args.encoder.split(",") if e.strip()]
    if not encoders:
        raise UserError(f"--encoder: expected encoder ids or directories, comma-separated, found {args.encoder!r}")
    if not args.l2 >= 0:
        raise UserError(f"--l2: expected a weight >= 0, found {args.l2}")
    data = read_probe_data(args.data, parse_labels(args.labels), args.train_split, args.test_split, args.on_error)
    result = run_probe(encoders, data, args.out, overwrite=args.overwrite, batch_size=args.batch_size,
                       device=args.device, l2=args.l2)  # fmt: skip
    print(format_table(result))
    print(f"wrote {args.out}/probe.json, probe.md and probe.png")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``probe``."""
    from align.evals.attributes import DEFAULT_LABELS

    parser.add_argument("--encoder", required=True, help="vision encoder ids or directories, comma-separated")
    parser.add_argument("--data", required=True, help="shapes dir, or a pairs source whose samples carry attributes")
    parser.add_argument("--labels", default=",".join(DEFAULT_LABELS), help="attributes to probe, comma-separated")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--train-split", default="train", help="split the probes are fitted on (default train)")
    parser.add_argument("--test-split", default="test", help="split they are scored on (default test)")
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 weight on the probe's weights (default 1e-3)")
    parser.add_argument("--batch-size", type=at_least(1), default=64)
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="missing/corrupt images"
    )
    add_overwrite(parser)
