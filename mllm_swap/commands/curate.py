"""``mllm-swap curate``: concept-balanced selection of image-text pairs (freeze_align's curation)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from align.errors import UserError
from mllm_swap.commands.options import at_least

HELP = "concept-balanced data curation with a CLIP model (freeze_align)"
DESCRIPTION = (
    "Prototypes = mean CLIP image embedding of a few example images per concept; every caption "
    "of --data is scored by its CLIP text embedding against them; concepts are filled rarest first with up to "
    "--k samples each, never taking a sample twice. Writes curated.jsonl and concept_counts.json/.tsv."
)


def concepts_from(args: argparse.Namespace) -> dict:
    """Example images per concept: a folder ``<concept>/<image>``, a JSON map, or shapes attributes."""
    from align.data.curate import fewshot_from_folder, shapes_fewshot

    if args.shapes_concepts:
        return shapes_fewshot(args.data, args.shapes_concepts, shots=args.shots)
    if args.concepts is None:
        raise UserError(
            "give --concepts (a folder or JSON of example images per concept) or --shapes-concepts"
        )
    path = Path(args.concepts)
    if path.is_dir():
        return fewshot_from_folder(path, shots=args.shots)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: concepts file or folder not found")
    mapping = json.loads(path.read_text())
    if not isinstance(mapping, dict) or not all(isinstance(v, list) for v in mapping.values()):
        raise UserError(f"{path}: expected a JSON object mapping each concept to a list of image paths")
    return {k: [str(path.parent / p) for p in v][: args.shots] for k, v in mapping.items()}


def run(args: argparse.Namespace) -> int:
    from align.data.curate import curate

    summary = curate(
        args.model,
        args.data,
        concepts_from(args),
        args.out,
        k=args.k,
        top_k=None if args.top_k == 0 else args.top_k,
        min_score=args.min_score,
        split=args.split,
        caption_col=args.caption_col,
    )
    width = max(len(r["concept"]) for r in summary["concepts"])
    print(f"{'concept':<{width}}  candidates  kept")
    for row in summary["concepts"]:
        print(f"{row['concept']:<{width}}  {row['candidates']:>10}  {row['kept']:>4}")
    print(f"kept {summary['kept']} of {summary['samples']} samples -> {Path(args.out) / 'curated.jsonl'}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``curate``."""
    parser.add_argument("--data", required=True, help="pairs source to curate (pairs file, shapes dir, ...)")
    parser.add_argument("--model", default="tiny-clip", help="CLIP-like dual encoder (default: tiny-clip)")
    parser.add_argument("--concepts", help="folder <concept>/<images> or JSON {concept: [image paths]}")
    parser.add_argument(
        "--shapes-concepts",
        choices=["color", "shape", "object"],
        help="shapes world: concepts from attributes of the train split",
    )
    parser.add_argument("--shots", type=at_least(1), default=8, help="example images per concept")
    parser.add_argument("--k", type=at_least(1), default=2000, help="most samples per concept")
    parser.add_argument(
        "--top-k", type=at_least(0), default=1, help="a sample is a candidate of its top-k concepts (0 = all)"
    )
    parser.add_argument("--min-score", type=float, help="least caption-prototype cosine for a candidate")
    parser.add_argument("--split", help="only this split of --data")
    parser.add_argument("--caption-col", help="caption column of --data (default: caption)")
    parser.add_argument("--out", required=True, help="output directory")
