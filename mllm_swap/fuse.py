"""Fused towers (``swap --mode fuse --encoder A+B``): two towers' patch tokens concatenated along channels.

As prismatic's DINOv2+SigLIP and Eagle's "CLIP+X": each tower drops all its prefix tokens (CLS, registers)
at the consumed layer; the token grids are reconciled on the finer one (the coarser tower's patch grid is
resampled bilinearly, ``align_corners=False``, as Cambrian and Eagle interpolate), and the tokens are
concatenated along channels: ``grid^2`` tokens of width ``w_A + w_B``. The result is a
:class:`~align.modeling_aligned_tower.FusedTower` (remote code as for aligned towers). ``--mode fuse`` rebuilds the
connector's input layer for it; ``--mode bridge --encoder A+B`` (:mod:`mllm_swap.bridge`) keeps the old connector
and the tower carries a bridge head trained on the fused tokens.

Preprocessing from one image: the checkpoint's processor is the highest-resolution tower's own (its resize
and crop) with normalisation off, so ``pixel_values`` are ``[0, 1]`` pixels at that resolution; inside, each
tower resizes them to its own resolution when smaller (bicubic, antialiased) and applies its own mean/std.
The processor stays a plain transformers image processor, so the checkpoint loads with ``AutoProcessor``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.paths import portable
from mllm_swap.towers import (
    AlignedTowerConfig,
    FusedTowerConfig,
    NewTower,
    backbone_config,
    backbone_parts,
    new_tower,
    openclip_as_hf,
)

SEPARATOR = "+"


def is_fuse_spec(encoder: Any) -> bool:
    """Whether ``encoder`` names two encoders joined by ``+`` (not an existing path that holds a ``+``)."""
    return isinstance(encoder, (str, os.PathLike)) and SEPARATOR in str(encoder) and not Path(encoder).expanduser().exists()


def fuse_spec_parts(spec: str) -> list[str]:
    """``"A+B"`` -> ``["A", "B"]``; anything but two non-empty parts is refused."""
    parts = [p.strip() for p in str(spec).split(SEPARATOR)]
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"--encoder {spec!r}: a fused tower (--mode fuse, or bridge) takes two encoders joined by '{SEPARATOR}' "
            f"(A+B, each an encoder id or path), found {len(parts)} part(s){' with an empty one' if not all(parts) else ''}"
        )
    return parts


def load_fuse_parts(spec: str) -> list[Any]:
    """The two ``VisionEncoder`` of ``"A+B"``; a part that does not load is named in the error."""
    from align.load import load_vision_encoder

    encoders = []
    for i, part in enumerate(fuse_spec_parts(spec)):
        try:
            encoders.append(load_vision_encoder(part))
        except (OSError, ValueError, KeyError) as err:
            detail = err.args[0] if isinstance(err, KeyError) and err.args else err  # KeyError's str() quotes
            raise UserError(f"--encoder {spec!r}: part {i + 1} ({part!r}) does not load: {detail}") from err
    return encoders


def _part(enc: Any, out: str | os.PathLike) -> NewTower:
    tower = new_tower(enc, prefix="drop")
    if tower.kind == "openclip":
        tower = openclip_as_hf(tower)
    tower.source = portable(tower.source, out)
    if tower.image_processor is None:
        raise UserError(f"fuse part {tower.source}: no image processor, so its resolution and normalisation are "
                        "unknown; expected a directory with preprocessor_config.json")  # fmt: skip
    return tower


def fused_tower(encoders: list[Any], out: str | os.PathLike, prefix: str = "drop") -> NewTower:
    """One :class:`NewTower` (kind ``"fused"``) of ``encoders`` for an MLLM written to ``out``."""
    if prefix != "drop":
        raise UserError(
            f"--prefix {prefix}: --mode fuse concatenates patch tokens, so every prefix token is dropped"
        )
    towers = [_part(enc, out) for enc in encoders]
    parts, pixels, state = [], [], {}
    for i, tower in enumerate(towers):
        try:
            backbone, weights = backbone_parts(tower, "be fused")
        except ValueError as err:
            raise UserError(f"fuse part {i + 1}: {err}") from err
        part = AlignedTowerConfig(
            vision_backbone=backbone_config(backbone), token_rule="patch", source=tower.source
        )
        parts.append({k: v for k, v in part.to_dict().items() if k != "_name_or_path"})
        proc = tower.image_processor
        pixels.append({"image_size": tower.image_size, "image_mean": list(proc.image_mean),
                       "image_std": list(proc.image_std)})  # fmt: skip
        state.update({f"parts.{i}.{k}": v for k, v in weights.items()})
    grids = [t.image_size // t.patch_size for t in towers]
    grid = max(grids)
    source = SEPARATOR.join(t.source for t in towers)
    config = FusedTowerConfig(parts=parts, pixels=pixels, grid=grid, source=source)
    largest = max(range(len(towers)), key=lambda i: towers[i].image_size)  # ties: the first
    processor = copy.deepcopy(towers[largest].image_processor)
    processor.do_normalize = False  # [0, 1] pixels; each tower normalises inside
    described = [
        {
            "source": t.source,
            "width": t.width,
            "image_size": t.image_size,
            "patch_size": t.patch_size,
            "grid": g,
            "resampled_to": grid if g != grid else None,
            "prefix_tokens_dropped": t.num_prefix_tokens,
            "image_mean": pixels[i]["image_mean"],
            "image_std": pixels[i]["image_std"],
        }
        for i, (t, g) in enumerate(zip(towers, grids, strict=True))
    ]
    return NewTower(
        source=source,
        encoder=tuple(encoders),
        kind="fused",
        config=config,
        state_dict=state,
        image_processor=processor,
        width=config.hidden_size,
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_prefix_tokens=0,
        num_tokens=grid * grid,
        prefix_rule=f"per tower: every prefix token dropped; grids {'+'.join(f'{g}x{g}' for g in grids)} "
        f"-> {grid}x{grid} (the finer; others resampled bilinearly), channels concatenated",
        parts=described,
        notes=[
            f"fused tower: {grid * grid} tokens of width {'+'.join(str(t.width) for t in towers)}="
            f"{config.hidden_size}; one image processed at {config.image_size}px by "
            f"{towers[largest].source}'s resize/crop, each tower's own resize and normalisation inside"
        ],
    )
