"""Frozen backbones behind one interface, and the registry that loads them by id or path."""

from align.encoders.base import POOLINGS, ImagePreprocess, TextEncoder, VisionEncoder, pool_tokens
from align.encoders.registry import load_text_encoder, load_vision_encoder, resolve
from align.encoders.tiny import TINY_TEXT, TINY_VISION, ensure_tiny

__all__ = [
    "POOLINGS",
    "ImagePreprocess",
    "TextEncoder",
    "VisionEncoder",
    "TINY_TEXT",
    "TINY_VISION",
    "ensure_tiny",
    "load_text_encoder",
    "load_vision_encoder",
    "pool_tokens",
    "resolve",
]
