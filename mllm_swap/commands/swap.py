"""``mllm-swap swap``: put a vision encoder into a multimodal LLM and report what changed."""

from __future__ import annotations

import argparse
from pathlib import Path

from mllm_swap.commands.options import add_overwrite, at_least

HELP = "swap a vision encoder into an MLLM (drop-in, rebuild, bridge or fuse) and write swap_report.json"
DESCRIPTION = (
    "Write a copy of --mllm (same family and format) whose vision tower is --encoder. "
    "drop-in replaces the tower's weights (same architecture, width and tokens); rebuild installs a new "
    "tower, re-initialises the connector's first layer and updates image tokens, processor and select "
    "layer; bridge (HF Llava) installs the new tower with a small token adapter trained on images only "
    "(--data SHAPES_DIR or --images DIR; default a generated shapes world) to reproduce the old tower's tokens, "
    "so the old connector and LLM answer at once (resumable: rerun the same command after a kill); fuse "
    "(HF Llava, --encoder A+B) installs both towers, their patch tokens concatenated along channels on the finer "
    "token grid, and re-initialises the connector's first layer (width wA+wB); bridge with --encoder A+B keeps "
    "the connector and trains the adapter on the fused tokens instead. "
    "Families: HF Llava (and LLaVA-NeXT drop-in), original LLaVA-1.5, IDEFICS, OpenFlamingo."
)


def count_or_dir(value: str) -> int | Path:
    """``--images``: a number of sample images (the drift check), or a directory of images (the bridge's)."""
    if value.lstrip("-").isdigit():
        return int(value)
    path = Path(value)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a number of images or an image directory, found {value!r}"
        )
    return path


def run(args: argparse.Namespace) -> int:
    from align.errors import UserError

    image_dir = args.images if isinstance(args.images, Path) else None
    if args.mode == "bridge":
        from mllm_swap.bridge import BridgeSettings, bridge_swap

        if args.prefix != "drop" or args.to_hf:
            raise UserError("--mode bridge drops every prefix token and writes HF Llava: --prefix keep and --to-hf "
                            "do not apply")  # fmt: skip
        settings = BridgeSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        bridge_swap(
            args.mllm, args.encoder, args.out, data=args.data, image_dir=image_dir, settings=settings,
            select_layer=args.select_layer, prompt=args.prompt, compare=not args.no_compare,
            vqa_limit=args.vqa_limit, measure_images=args.measure_images, overwrite=args.overwrite,
        )  # fmt: skip
        return 0
    from mllm_swap.swap import swap

    if image_dir is not None:
        raise UserError("--images DIR: the bridge's training images; use it with --mode bridge (--data SHAPES_DIR "
                        "gives any mode its measurement images)")  # fmt: skip
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
        data=args.data,
        measure_images=args.measure_images,
        overwrite=args.overwrite,
    )
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``swap``."""
    p.add_argument("--mllm", required=True, help="checkpoint path, or tiny-llava | tiny-llava-original | "
                   "tiny-idefics | tiny-openflamingo (built on demand)")  # fmt: skip
    p.add_argument(
        "--encoder",
        required=True,
        help="encoder id or path (tiny-*, hub id, open_clip, aligned artifact); A+B (a fused tower) with --mode "
        "fuse (new connector input layer) or bridge (the old connector, a trained adapter)",
    )
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --overwrite)")
    p.add_argument("--mode", choices=("auto", "dropin", "rebuild", "bridge", "fuse"), default="auto")
    p.add_argument("--prefix", choices=("drop", "keep"), default="drop",
                   help="prefix tokens (CLS, registers): drop them all (default) or feed them too")  # fmt: skip
    p.add_argument("--select-layer", type=int, default=None,
                   help="tower layer the MLLM consumes (rebuild, bridge; default: the MLLM's)")  # fmt: skip
    p.add_argument(
        "--to-hf", action="store_true", help="original LLaVA: also write an HF-layout copy to OUT/hf"
    )
    p.add_argument(
        "--prompt", default="What colour is the shape?", help="prompt for the next-token drift check"
    )
    p.add_argument("--images", type=count_or_dir, default=4,
                   help="N: sample images for the feature drift; DIR (bridge): train the adapter on these images, "
                   "the last 10%% held out for the drift")  # fmt: skip
    p.add_argument("--data", help="a shapes world or image folder: its held-out images (test split) give the "
                   "report's measurements; bridge: its train split trains the adapter, its vqa_test.jsonl gives the "
                   "quick VQA")  # fmt: skip
    p.add_argument("--measure-images", type=at_least(4), default=64,
                   help="held-out images of the report's measurements (default 64; seeded shapes scenes without "
                   "--data)")  # fmt: skip
    bridge = p.add_argument_group("bridge (--mode bridge)")
    bridge.add_argument("--steps", type=at_least(1), default=300, help="adapter training steps")
    bridge.add_argument("--batch-size", type=at_least(1), default=16)
    bridge.add_argument("--lr", type=float, default=1e-3)
    bridge.add_argument("--seed", type=int, default=0)
    bridge.add_argument("--vqa-limit", type=at_least(0), default=100,
                        help="questions of the quick VQA (bridge, untrained rebuild, drop-in, unswapped)")  # fmt: skip
    bridge.add_argument("--no-compare", action="store_true",
                        help="skip building the rebuild/drop-in for comparison (large models)")  # fmt: skip
    add_overwrite(p)
