"""``mllm-swap zeroshot``: score a dual encoder zero-shot (classification, retrieval, pairs, segmentation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_swap.commands.options import at_least

HELP = "zero-shot scores of a dual encoder (aligned artifact, HF CLIP/SigLIP, open_clip)"
DESCRIPTION = (
    "CLIP-benchmark conventions: classification (templates averaged per class; acc1, acc5, "
    "mean-per-class recall), retrieval (R@1/5/10 both ways), pairs (MMVP-VLM: a pair counts when both images "
    "pick their own statement, with its standard error and chance 0.25; also both texts picking their own "
    "image) on the Shapes-MMVP pairs of `data mmvp` or minimal pairs, and segmentation mIoU (patch-text similarity upsampled to the image; shapes masks). Writes JSON "
    "to --out and prints a table."
)


def run(args: argparse.Namespace) -> int:
    from align.evals.zeroshot import format_table, run_task
    from align.io import write_json
    from align.load import load_dual_encoder
    from align.paths import portable_tree

    if not Path(args.data).exists():
        raise FileNotFoundError(f"{args.data}: data not found")
    split = None if args.split == "all" else args.split
    opts: dict = {"split": split}
    if args.task == "classify":
        opts.update(label=args.label, limit=args.limit)
    elif args.task == "retrieve":
        opts.update(captions=tuple(args.captions), limit=args.limit)
    elif args.task == "pairs":
        opts.update(n_pairs=args.pairs, seed=args.seed)
    else:
        opts.update(limit=args.limit)
    result = run_task(load_dual_encoder(args.model), args.task, args.data, **opts)
    name = f"zeroshot-{args.task}" + (f"-{args.label}" if args.task == "classify" else "") + ".json"
    out = Path(args.out) / name
    write_json(out, portable_tree(result, out.parent))
    print(f"{args.task} {result.get('label', '')} | model {args.model} | data {args.data} ({args.split})")
    print(format_table(result))
    print(f"wrote {out}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``zeroshot``."""
    parser.add_argument(
        "--model",
        required=True,
        help="artifact directory, tiny-clip, tiny-openclip, HF id, openclip:NAME/TAG",
    )
    parser.add_argument("--task", choices=["classify", "retrieve", "pairs", "segment"], default="classify")
    parser.add_argument(
        "--data",
        required=True,
        help="shapes dir; classify: or an image folder; retrieve: any pairs source; pairs: a folder "
        "holding mmvp_pairs.jsonl (`data mmvp`) or that file, a shapes dir without one (minimal pairs), "
        "or a JSONL of {images: [a, b], texts: [ta, tb]}",
    )
    parser.add_argument(
        "--label", choices=["color", "shape"], default="color", help="classify: shapes class set"
    )
    parser.add_argument("--split", default="test", help="train, test or all (default: test)")
    parser.add_argument("--captions", nargs="+", default=["caption"], help="retrieve: caption columns")
    parser.add_argument(
        "--pairs", type=at_least(1), default=200, help="pairs: number of shapes minimal pairs (default 200)"
    )
    parser.add_argument("--seed", type=int, default=0, help="pairs: seed of the shapes pair sampler")
    parser.add_argument("--limit", type=at_least(1), help="score only the first N samples")
    parser.add_argument("--out", required=True, help="output directory for the JSON result")
