"""Frozen backbones behind one interface, and the registry that loads them by id or path."""

from align.encoders.base import POOLINGS, ImagePreprocess, TextEncoder, VisionEncoder, pool_tokens
from align.encoders.registry import TINY_TEXT, TINY_VISION, load_text_encoder, load_vision_encoder, resolve

__all__ = [
    "POOLINGS",
    "ImagePreprocess",
    "TextEncoder",
    "VisionEncoder",
    "TINY_TEXT",
    "TINY_VISION",
    "load_text_encoder",
    "load_vision_encoder",
    "pool_tokens",
    "resolve",
]
