"""Dual encoders (an image tower and a text tower sharing a space) behind one interface (loaded by
:func:`align.load.load_dual_encoder`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from align.encoders.base import TextEncoder, VisionEncoder

__all__ = ["DualEncoder"]


class DualEncoder:
    """One interface over dual encoders: normalized image, text and per-patch embeddings.

    ``encode_images(pixels) -> [B, D]``, ``encode_texts(list[str]) -> [N, D]`` and
    ``patch_embeddings(pixels) -> [B, N, D]`` (patch tokens in the joint space, for segmentation) are all
    L2-normalized; ``preprocess`` turns PIL images into pixels.
    """

    def __init__(self, vision: VisionEncoder, text: TextEncoder | None = None, name: str = "") -> None:
        self.vision, self.text_encoder = vision.eval(), text.eval() if text is not None else None
        self.name = name or vision.source
        self.preprocess = vision.preprocess
        self.aligned = hasattr(vision, "encode_text")

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self._device(), self._dtype())
        if self.aligned:
            return self.vision.encode_image(pixels).float().cpu()
        return F.normalize(self.vision.pooled(pixels, "projected").float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        if self.aligned:
            return self.vision.encode_text(list(texts))
        return F.normalize(self.text_encoder.encode(list(texts)).float(), dim=-1)

    @torch.no_grad()
    def patch_embeddings(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self._device(), self._dtype())
        if self.aligned:
            return F.normalize(self.vision(pixels).float(), dim=-1).cpu()
        vision, kind = self.vision, self.vision.kind
        patches = vision(pixels)[:, vision.num_prefix_tokens :]
        if kind == "clip":
            model = vision.model
            out = model.visual_projection(model.vision_model.post_layernorm(patches))
        elif kind == "openclip":
            out = vision.visual.ln_post(patches)
            out = out @ vision.visual.proj if vision.visual.proj is not None else out
        else:
            raise ValueError(
                f"{self.name}: no per-patch embeddings in the joint space for a '{kind}' model; "
                "segmentation needs an aligned artifact, HF CLIP or open_clip"
            )
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def encode_pil(
        self, images: Sequence[Image.Image], patches: bool = False, batch_size: int = 128
    ) -> Tensor:
        """Preprocess and embed PIL images in batches (global, or per patch with ``patches=True``)."""
        fn = self.patch_embeddings if patches else self.encode_images
        parts = [
            fn(self.preprocess(list(images[i : i + batch_size]))) for i in range(0, len(images), batch_size)
        ]
        return torch.cat(parts)

    def _device(self) -> torch.device:
        return next(self.vision.parameters()).device

    def _dtype(self) -> torch.dtype:
        return next(self.vision.parameters()).dtype
