"""``mllm-swap encoders``: list the encoders this installation can load, with their token contracts."""

from __future__ import annotations

import argparse

HELP = "list loadable encoders with dims, token counts and preprocessing"
DESCRIPTION = (
    "List the embedded tiny encoders (built on first use), the real MiniLM text encoder when "
    "installed, and well-known hub checkpoints the recipes use. With --vision/--text, load and describe "
    "the given ids or directories instead."
)


def _vision_rows(ids: list[str]) -> list[list[str]]:
    from align.load import load_vision_encoder

    rows = []
    for spec in ids:
        enc = load_vision_encoder(spec)
        pre = enc.preprocess
        rows.append(
            [
                spec,
                "vision",
                enc.kind,
                str(enc.embed_dim),
                f"{enc.num_prefix_tokens}+{enc.num_patches}",
                f"{pre.image_size}px mean={tuple(round(m, 3) for m in pre.mean)}",
                ",".join(enc.poolings),
            ]
        )
    return rows


def _text_rows(ids: list[str], optional: tuple[str, ...] = ()) -> list[list[str]]:
    """Rows of the text encoders ``ids``; one in ``optional`` whose package is not installed is left out."""
    from align.load import load_text_encoder

    rows = []
    for spec in ids:
        try:
            enc = load_text_encoder(spec)
        except KeyError:
            if spec in optional:  # the default listing's minilm without its optional package
                continue
            raise
        rows.append([spec, "text", enc.kind, str(enc.embed_dim), "-", "-", enc.pooling])
    return rows


def run(args: argparse.Namespace) -> int:
    from align.encoders import TINY_TEXT, TINY_VISION
    from align.encoders.registry import KNOWN_HUB_TEXT, KNOWN_HUB_VISION

    header = ["id", "modality", "kind", "dim", "tokens (prefix+patches)", "preprocessing", "poolings"]
    rows = _vision_rows(args.vision or list(TINY_VISION)) if not args.text else []
    if not args.vision:
        rows += _text_rows(args.text or [*TINY_TEXT, "minilm"], optional=() if args.text else ("minilm",))
    if not (args.vision or args.text):
        for spec, facts in KNOWN_HUB_VISION.items():
            rows.append(
                [
                    spec,
                    "vision",
                    "hub (not loaded)",
                    str(facts["embed_dim"]),
                    f"{facts['prefix']}+{(facts['image_size'] // facts['patch_size']) ** 2}",
                    f"{facts['image_size']}px",
                    "-",
                ]
            )
        for spec, facts in KNOWN_HUB_TEXT.items():
            rows.append(
                [spec, "text", "hub (not loaded)", str(facts["embed_dim"]), "-", "-", facts["pooling"]]
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``encoders``."""
    parser.add_argument(
        "--vision", nargs="+", metavar="ID", help="vision encoder ids or directories to describe"
    )
    parser.add_argument("--text", nargs="+", metavar="ID", help="text encoder ids or directories to describe")
