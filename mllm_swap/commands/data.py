"""``mllm-swap data``: generate the shapes world, inspect any data source."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from align.errors import UserError
from mllm_swap.commands.options import add_overwrite, at_least

HELP = "generate the shapes world or inspect a data source"
DESCRIPTION = (
    "Generate the procedural shapes-world dataset, or open any supported data source "
    "(pairs .jsonl/.csv, image folder, datasets save_to_disk dir, hf:<builder>:<files>, "
    "webdataset .tar shards) and show what it holds."
)


if TYPE_CHECKING:
    from align.data.readers import Sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``data``."""
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    shapes = sub.add_parser(
        "shapes",
        help="write a shapes-world dataset",
        description="Write PNG images and masks of coloured shapes, pairs.jsonl, images.txt, "
        "instruct.json (LLaVA format, train split), vqa_test.jsonl (test split), classes.json and "
        "meta.json. The same arguments give byte-identical files; an existing dataset made with the "
        "same arguments is reused; one made with other arguments is replaced only with --overwrite.",
    )
    shapes.add_argument("--out", required=True, help="output directory (new, empty or an earlier dataset)")
    shapes.add_argument("--n", type=int, required=True, help="number of images")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    shapes.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    shapes.add_argument(
        "--test-fraction", type=float, default=0.2, help="fraction of images in the test split (default 0.2)"
    )
    add_overwrite(shapes)
    shapes.set_defaults(func=run_shapes)

    mmvp = sub.add_parser(
        "mmvp",
        help="find CLIP-blind pairs of held-out scenes (Shapes-MMVP)",
        description="MMVP's recipe on a shapes world: pairs of held-out scenes that the CLIP embeds as nearly "
        "identical (cosine in its top --clip-quantile of all pairs) but the DINOv2 tells apart (cosine below "
        "its --dino-quantile) and whose answers differ, each with a two-option question and two statements. "
        "Writes mmvp_pairs.jsonl and mmvp_meta.json into --out (default: the shapes folder, where the "
        "lmms-eval task shapes_mmvp and `zeroshot --task pairs --data DIR` find them).",
    )
    mmvp.add_argument("--data", required=True, help="shapes-world folder (from `data shapes`)")
    mmvp.add_argument("--clip", default="tiny-clip-shapes", help="CLIP-like model (default tiny-clip-shapes)")
    mmvp.add_argument("--dino", default="tiny-dinov2", help="vision-only tower (default tiny-dinov2)")
    mmvp.add_argument("--out", help="output folder (default: --data)")
    mmvp.add_argument("--split", choices=["train", "test"], default="test", help="scenes to pair (default: test)")
    mmvp.add_argument(
        "--clip-quantile", type=float, default=0.95,
        help="a pair's CLIP cosine must reach this quantile of all pairs' cosines (default 0.95)",
    )  # fmt: skip
    mmvp.add_argument(
        "--dino-quantile", type=float, default=0.5,
        help="a pair's DINOv2 cosine must not exceed this quantile of all pairs' cosines (default 0.5)",
    )  # fmt: skip
    mmvp.add_argument("--max-pairs", type=at_least(1), help="keep at most N pairs (most CLIP-blind first)")
    mmvp.add_argument("--seed", type=int, default=0, help="seed of question phrasing and option order")
    mmvp.set_defaults(func=run_mmvp)

    inspect = sub.add_parser(
        "inspect",
        help="show count, fields, first rows and errors of a data source",
        description="Open SRC like every other command does and print what it holds.",
    )
    inspect.add_argument(
        "source", metavar="SRC", help="file, directory, shard pattern or hf:<builder>:<files>"
    )
    inspect.add_argument("--image-col", help="image column (default: 'image' if present)")
    inspect.add_argument(
        "--text-col",
        action="append",
        help="caption column; repeat for several (default: 'caption' if present)",
    )
    inspect.add_argument("--id-col", help="id column (default: 'id' if present, else the row number)")
    inspect.add_argument(
        "--label-col", help="label column (default: 'label' if present); a.b for nested keys"
    )
    inspect.add_argument("--split", help="split to read (a 'split' column value or a DatasetDict split)")
    inspect.add_argument("--rows", type=int, default=3, help="how many first rows to print (default 3)")
    inspect.add_argument("--verify", action="store_true", help="decode every image to find corrupt ones")
    inspect.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="skip",
        help="on a missing/corrupt image: skip and count it (default) or stop",
    )
    inspect.set_defaults(func=run_inspect)


def run_shapes(args: argparse.Namespace) -> int:
    """Generate a shapes-world dataset and print its summary."""
    from align.data.shapes import generate_shapes

    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    summary = generate_shapes(
        args.out, args.n, seed=args.seed, size=args.size, test_fraction=args.test_fraction, overwrite=args.overwrite
    )
    state = "reused existing dataset" if summary["reused"] else "wrote"
    print(
        f"{state} {summary['out']}: {summary['n']} images ({summary['train']} train, {summary['test']} test), "
        f"{summary['size']}x{summary['size']} px, seed {summary['seed']}; "
        f"{summary['instruct']} instruction conversations, {summary['vqa']} VQA questions"
    )
    return 0


def run_mmvp(args: argparse.Namespace) -> int:
    """Mine the Shapes-MMVP pairs and print how many of each kind."""
    from align.data.shapes import MMVP_PAIRS
    from align.evals.mmvp import mine_mmvp_pairs

    meta = mine_mmvp_pairs(
        args.data, args.clip, args.dino, args.out, split=args.split, clip_quantile=args.clip_quantile,
        dino_quantile=args.dino_quantile, max_pairs=args.max_pairs, seed=args.seed,
    )  # fmt: skip
    kinds = ", ".join(f"{k} {v}" for k, v in meta["by_kind"].items())
    print(
        f"{meta['pairs']} CLIP-blind pairs among {meta['scenes']} {meta['split']} scenes "
        f"(CLIP cosine >= {meta['clip_min']:.4f}, DINOv2 cosine <= {meta['dino_max']:.4f}; {kinds})"
    )
    print(f"wrote {Path(args.out or args.data) / MMVP_PAIRS}")
    return 0


def _row(sample: Sample) -> str:
    from align.data.images import image_location

    row = {
        "id": sample.id,
        "image": image_location(sample.image) if sample.image is not None else None,
        "texts": sample.texts,
        "label": sample.label,
    }
    return json.dumps(row, ensure_ascii=False)


def run_inspect(args: argparse.Namespace) -> int:
    """Open a source with ``open_data`` and print count, fields, first rows and errors."""
    from align.data.readers import open_data

    if args.rows < 0:
        raise UserError(f"--rows must be >= 0, got {args.rows}")
    with warnings.catch_warnings():  # skipped images are listed below instead
        warnings.simplefilter("ignore", UserWarning)
        data = open_data(
            args.source,
            image_col=args.image_col,
            text_col=args.text_col,
            id_col=args.id_col,
            label_col=args.label_col,
            split=args.split,
            on_error=args.on_error,
            verify=args.verify,
        )
    print(f"source: {data.source}")
    print(f"kind:   {data.kind}")
    print(f"count:  {len(data)}")
    print(f"fields: {', '.join(data.fields) or '(none)'}")
    labels = data.labels()
    if labels:
        shown = ", ".join(labels[:10]) + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")
        print(f"labels: {shown}")
    with_images = sum(s.image is not None for s in data)
    with_texts = sum(bool(s.texts) for s in data)
    print(f"with image: {with_images}, with text: {with_texts}")
    for sample in data.samples[: args.rows]:
        print(f"  {_row(sample)}")
    checked = "missing or corrupt" if args.verify else "missing (use --verify to decode every image)"
    print(f"errors: {data.errors.count} {checked}")
    for message in data.errors.messages[:10]:
        print(f"  {message}")
    return 0
