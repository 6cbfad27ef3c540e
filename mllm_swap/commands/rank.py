"""``mllm-swap rank`` (formerly ``score``, still accepted): rank vision/text encoder pairs by how well they
will align (:mod:`align.evals.pairs`), or reproduce freeze_align's CKA toy experiment.

Two forms::

    mllm-swap rank --vision ID[,ID] --text ID[,ID] --data pairs.jsonl --n 5000 --out DIR [--metrics ...]
    mllm-swap rank toy --out DIR [--instances 200] [--n 32] [--d 16] [--seed 0]
"""

from __future__ import annotations

import argparse

from align.errors import UserError
from mllm_swap.commands.options import at_least, device

ALIASES = ("score",)
HELP = "rank vision/text encoder pairs by alignment (CKA, mutual k-NN, probe), or the CKA toy"
DESCRIPTION = (
    "Pairs form: encode --n samples of --data with every --vision and --text encoder (image "
    "feature: mean of all final-layer tokens; text: sentence embedding averaged over captions), score "
    "every pair with --metrics, write OUT/scores.json and OUT/heatmap_<metric>.png and print a ranked "
    "table. `rank toy`: freeze_align's toy experiment (linear CKA vs the CLIP loss reached by linear "
    "maps), writing OUT/toy.json and OUT/toy.png."
)


def _split_ids(value: str | None, flag: str) -> list[str]:
    ids = [v.strip() for v in (value or "").split(",") if v.strip()]
    if not ids:
        raise UserError(f"{flag} is required in the pairs form: one or more encoder ids, comma-separated")
    return ids


def run_pairs(args: argparse.Namespace) -> int:
    """Score every vision x text pair on the data and write scores.json, heatmaps and a table."""
    from align.evals.pairs import (
        format_table,
        load_samples,
        null_note,
        parse_metrics,
        rank_pairs,
        save_ranking,
    )

    vision_ids, text_ids = _split_ids(args.vision, "--vision"), _split_ids(args.text, "--text")
    if not args.data:
        raise UserError("--data is required in the pairs form (a pairs .jsonl/.csv, shapes dir, ...)")
    metrics = parse_metrics(args.metrics)
    if args.n < 4 or args.batch_size < 1:
        raise UserError(f"--n must be >= 4 and --batch-size >= 1, found {args.n} and {args.batch_size}")
    samples = load_samples(args.data, args.n, args.seed, args.on_error)
    if "mknn" in metrics and len(samples) <= args.knn:
        raise UserError(f"mknn needs more samples than --knn={args.knn}; {args.data} gave {len(samples)}")
    if "probe" in metrics and len(samples) < 20:
        raise UserError(
            f"probe needs at least 20 samples for a train/test split; {args.data} gave {len(samples)}"
        )
    result = rank_pairs(
        vision_ids,
        text_ids,
        args.data,
        samples,
        metrics,
        knn=args.knn,
        seed=args.seed,
        debiased=not args.biased_cka,
        batch_size=args.batch_size,
        device=args.device,
    )
    path = save_ranking(result, args.out)
    print(format_table(result["pairs"], metrics))
    print(null_note(result))
    print(f"wrote {path} and {len(metrics)} heatmap(s)")
    return 0


def run_toy_command(args: argparse.Namespace) -> int:
    """The freeze_align toy: toy.json and toy.png, and the correlation printed."""
    from align.metrics.toy import ToyConfig, run_toy, save_toy

    if any(getattr(args, f) for f in ("vision", "text", "data")):
        raise UserError(f"{args.command} toy takes no --vision/--text/--data (they belong to the pairs form)")
    n = 32 if args.n is None else args.n
    try:
        result = run_toy(ToyConfig(instances=args.instances, n=n, d=args.d, steps=args.steps, seed=args.seed))
    except ValueError as err:
        raise UserError(str(err)) from err
    json_path, png_path = save_toy(result, args.out)
    print(
        f"toy: {args.instances} instances, Pearson r(linear CKA, CLIP loss after {args.steps} steps) = "
        f"{result['pearson_r']:.3f}\nwrote {json_path} and {png_path}"
    )
    return 0


def run(args: argparse.Namespace) -> int:
    """Dispatch on the optional ``toy`` positional."""
    if args.mode == "toy":
        return run_toy_command(args)
    if args.n is None:
        args.n = 5000
    return run_pairs(args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``rank``."""
    from align.evals.pairs import METRICS

    parser.add_argument(
        "mode", nargs="?", choices=["pairs", "toy"], default="pairs", help="pairs (default) or toy"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vision", help="vision encoder ids or directories, comma-separated")
    parser.add_argument("--text", help="text encoder ids or directories, comma-separated")
    parser.add_argument("--data", help="pairs .jsonl/.csv, shapes directory, HF dataset, tar shards")
    parser.add_argument(
        "--n", type=int, help="pairs: samples to use (default 5000); toy: points per instance (32)"
    )
    parser.add_argument("--metrics", default="cka,rbf_cka,mknn,probe", help=f"subset of {','.join(METRICS)}")
    parser.add_argument("--knn", type=at_least(1), default=10, help="k of mutual k-NN (default 10)")
    parser.add_argument(
        "--biased-cka",
        action="store_true",
        help="use the biased HSIC estimator (Kornblith et al. 2019) instead of the debiased one; it scores "
        "independent features well above 0 at small n",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument(
        "--on-error", choices=["raise", "skip"], default="raise", help="missing/corrupt images"
    )
    parser.add_argument("--seed", type=int, default=0, help="subset sampling, probe split and the toy")
    toy = parser.add_argument_group("toy form")
    toy.add_argument("--instances", type=int, default=200, help="toy instances (default 200)")
    toy.add_argument("--d", type=int, default=16, help="toy latent/feature width (default 16)")
    toy.add_argument("--steps", type=int, default=500, help="toy SGD steps (default 500)")
