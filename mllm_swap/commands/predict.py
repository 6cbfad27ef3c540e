"""``mllm-swap predict``: rank candidate encoders for an MLLM before any LLM training."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import add_overwrite

HELP = "rank candidate encoders for an MLLM without LLM training: predicted VQA change with an interval"
DESCRIPTION = (
    "Swap every --encoder (A+B: a fused pair) into --mllm in each --mode (default bridge,rebuild), measure each swap "
    "on held-out images (token drift, debiased CKA, mutual k-NN against the old tower and at the LLM's input, "
    "probe accuracies) and predict its VQA change after tuning from a ridge model fitted on the calibration table "
    "(default: the one shipped, built by `mllm-swap calibrate` on the shapes world: honest only there). Writes "
    "OUT/predictions.json (candidates ranked, with intervals, and the calibration's leave-one-encoder-out Spearman "
    "and MAE), OUT/predictions.md and the swapped checkpoints in OUT/swaps/."
)


def run(args: argparse.Namespace) -> int:
    from mllm_swap.commands import run_argv
    from mllm_swap.predict.rank import format_predictions, predict_swaps

    encoders = [e.strip() for e in args.encoder.split(",") if e.strip()]
    modes = None if args.mode is None else [m.strip() for m in args.mode.split(",") if m.strip()]
    record = predict_swaps(args.mllm, encoders, modes, args.out, run_argv, data=args.data,
                           calibration=args.calibration, overwrite=args.overwrite)  # fmt: skip
    print(format_predictions(record))
    print(f"wrote {args.out}/predictions.json and predictions.md")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``predict``."""
    p.add_argument("--mllm", required=True, help="checkpoint path or tiny MLLM id (HF Llava for bridge and fuse)")
    p.add_argument("--encoder", required=True, help="candidate encoders, comma-separated; A+B: a fused pair")
    p.add_argument("--mode", default=None, help="modes to try, comma-separated: dropin, bridge, rebuild (default "
                   "bridge,rebuild; A+B always fuse)")  # fmt: skip
    p.add_argument("--data", default=None, help="a shapes world or image folder: the held-out images measured (and "
                   "the bridge's training images); default: the calibration's world")  # fmt: skip
    p.add_argument("--calibration", default=None, help="calibration.csv (default: the shipped table)")
    p.add_argument("--out", required=True, help="output directory")
    add_overwrite(p)
