"""``mllm-swap swap``: put a vision encoder into a multimodal LLM and report what changed."""

from __future__ import annotations

import argparse

from mllm_swap.commands.options import add_overwrite

HELP = "swap a vision encoder into an MLLM (drop-in or rebuild) and write swap_report.json"
DESCRIPTION = (
    "Write a copy of --mllm (same family and format) whose vision tower is --encoder. "
    "drop-in replaces the tower's weights (same architecture, width and tokens); rebuild installs a new "
    "tower, re-initialises the connector's first layer and updates image tokens, processor and select "
    "layer. Families: HF Llava (and LLaVA-NeXT drop-in), original LLaVA-1.5, IDEFICS, OpenFlamingo."
)


def run(args: argparse.Namespace) -> int:
    from mllm_swap.swap import swap

    swap(
        args.mllm,
        args.encoder,
        args.out,
        mode=args.mode,
        prefix=args.prefix,
        select_layer=args.select_layer,
        to_hf=args.to_hf,
        prompt=args.prompt,
        num_images=args.images,
        overwrite=args.overwrite,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``swap``."""
    p.add_argument("--mllm", required=True, help="checkpoint path, or tiny-llava | tiny-llava-original | "
                   "tiny-idefics | tiny-openflamingo (built on demand)")  # fmt: skip
    p.add_argument(
        "--encoder", required=True, help="encoder id or path (tiny-*, hub id, open_clip, aligned artifact)"
    )
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    p.add_argument("--mode", choices=("auto", "dropin", "rebuild"), default="auto")
    p.add_argument("--prefix", choices=("drop", "keep"), default="drop",
                   help="prefix tokens (CLS, registers): drop them all (default) or feed them too")  # fmt: skip
    p.add_argument("--select-layer", type=int, default=None, help="tower layer the MLLM consumes (rebuild)")
    p.add_argument(
        "--to-hf", action="store_true", help="original LLaVA: also write an HF-layout copy to OUT/hf"
    )
    p.add_argument(
        "--prompt", default="What colour is the shape?", help="prompt for the next-token drift check"
    )
    p.add_argument("--images", type=int, default=4, help="sample images for the feature drift")
    add_overwrite(p)
