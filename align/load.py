"""The one way to get an encoder from an id or a path (in the spirit of open_clip's ``create_model``).

:func:`load_vision_encoder` takes any vision spec: what the registry loads (tiny ids, ``openclip:NAME/TAG``,
local HF / open_clip directories, hub ids: :mod:`align.encoders.registry`) and aligned-encoder artifacts
(:mod:`align.artifact`, which load their own backbone through the registry). :func:`load_text_encoder`
takes any text spec (tiny ids, ``minilm``, sentence-transformers / HF folders, hub ids, a CLIP's text
tower), :func:`load_dual_encoder` an image and a text tower sharing a space. All return frozen encoders in eval mode on CPU in fp32; ``preprocess`` is the model's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.artifact import CONFIG_FILE, load_aligned
from align.encoders.base import TextEncoder, VisionEncoder
from align.encoders.dual import DualEncoder
from align.encoders.registry import load_text_backbone, load_vision_backbone, resolve


def is_artifact(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an aligned-encoder artifact directory."""
    return (Path(source) / CONFIG_FILE).is_file()


def load_vision_encoder(spec: str | os.PathLike, **model_kwargs: Any) -> VisionEncoder:
    """Any vision backbone or aligned artifact as a :class:`VisionEncoder`."""
    source = resolve(spec)
    if isinstance(source, Path) and is_artifact(source):
        return load_aligned(source)
    return load_vision_backbone(spec, **model_kwargs)


def load_text_encoder(spec: str | os.PathLike, pooling: str | None = None, **model_kwargs: Any) -> TextEncoder:
    """A text encoder with its model's own sentence pooling (``pooling`` overrides it)."""
    return load_text_backbone(spec, pooling=pooling, **model_kwargs)


def load_dual_encoder(spec: str | os.PathLike) -> DualEncoder:
    """An aligned artifact directory, or a CLIP-like id/path (HF CLIP/SigLIP, ``openclip:...``, tiny-clip)."""
    vision = load_vision_encoder(spec)
    if hasattr(vision, "encode_text"):
        return DualEncoder(vision, name=str(spec))
    if "projected" not in vision.poolings:
        raise ValueError(
            f"{spec}: not a dual encoder (a '{vision.kind}' vision model without a joint image-text space); "
            "expected an aligned artifact directory, an HF CLIP/SigLIP model or an open_clip model"
        )
    if isinstance(spec, Path) or Path(str(spec)).is_dir():
        spec = str(spec)
    return DualEncoder(vision, load_text_encoder(spec), name=str(spec))
