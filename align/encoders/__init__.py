"""Frozen backbones behind one interface, and the registry that finds them by id or path.

The public way to load an encoder (backbones and aligned artifacts alike) is :mod:`align.load`.
"""

from align.encoders.base import POOLINGS, ImagePreprocess, TextEncoder, VisionEncoder, pool_tokens
from align.encoders.registry import TINY_TEXT, TINY_VISION, resolve

__all__ = [
    "POOLINGS",
    "ImagePreprocess",
    "TextEncoder",
    "VisionEncoder",
    "TINY_TEXT",
    "TINY_VISION",
    "pool_tokens",
    "resolve",
]
