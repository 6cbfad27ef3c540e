"""Aligned heads with their token rules: how a trained head turns backbone tokens into aligned outputs.

Image token heads take one layer's backbone tokens ``[B, P + N, D]`` (``P`` prefix tokens: CLS, then
registers) and return aligned per-patch tokens ``[B, N, D_out]`` plus a global embedding:

* ``sail_glu`` / ``sail_linear`` (SAIL): per patch the head sees ``[CLS ; patch_i]``; the global embedding
  is the head on ``[CLS ; mean_i patch_i]`` (the ``concat`` feature it was trained on).
* ``freeze_align``: per patch ``patch_proj(patch_i) + cls_proj(CLS)``; the global embedding is the mean of
  those tokens (``mean_i patch_proj(patch_i) + cls_proj(CLS)``), which is exactly freeze-align's vision
  embedding before normalization.

Text heads turn a text encoder's output into the joint space: ``sail_glu`` / ``sail_linear`` act on the
sentence embedding; ``freeze_align`` projects every token, takes the attention-mask mean and applies the
authors' global ``ProjectionHead`` ``LayerNorm(fc(GELU(P m)) + P m)``. Every head is built from a JSON-able ``config`` dict (``build_token_head`` /
``build_text_head``) and keeps it in ``.config``, so artifacts and MLLM towers rebuild it from JSON.
``config["out_dim"]`` is the output width.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import GLUHead, LinearHead, TextGlobalHead, TokenProjector

IMAGE_HEAD_KINDS = ("sail_glu", "sail_linear", "freeze_align")
TEXT_HEAD_KINDS = ("sail_glu", "sail_linear", "freeze_align")
# 2: the global head is the authors' LayerNorm(fc(GELU(P x)) + P x); weights of version 1 (no
# ``head_version`` key, residual on the input x) are refused when loaded (see TextGlobalHead).
FREEZE_ALIGN_TEXT_HEAD_VERSION = 2
TOKEN_RULES = {
    "sail_glu": "sail: head([CLS ; patch_i])",
    "sail_linear": "sail: head([CLS ; patch_i])",
    "freeze_align": "freeze_align: patch_proj(patch_i) + cls_proj(CLS)",
}

__all__ = [
    "FreezeAlignTextHead",
    "FreezeAlignTokenHead",
    "SailTextHead",
    "SailTokenHead",
    "build_text_head",
    "build_token_head",
]


def _require(config: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in config]
    if missing:
        raise ValueError(f"{what} config {config}: missing key(s) {missing}")


def _split(tokens: Tensor, num_prefix_tokens: int) -> tuple[Tensor, Tensor]:
    """(CLS ``[B, D]``, patches ``[B, N, D]``) from ``[B, P + N, D]`` tokens."""
    if tokens.ndim != 3:
        raise ValueError(f"expected backbone tokens [B, P+N, D], found shape {tuple(tokens.shape)}")
    if num_prefix_tokens < 1:
        raise ValueError(
            f"this head needs a CLS token, but the backbone has num_prefix_tokens={num_prefix_tokens}"
        )
    if tokens.shape[1] <= num_prefix_tokens:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)} hold no patch after {num_prefix_tokens} prefixes"
        )
    return tokens[:, 0], tokens[:, num_prefix_tokens:]


class SailTokenHead(nn.Module):
    """SAIL image head (GLU or linear) over ``[CLS ; x]`` features of width ``2 * in_dim``."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim", "num_prefix_tokens"), "SAIL image head")
        self.config = dict(config)
        d_in = 2 * int(config["in_dim"])
        if config["kind"] == "sail_glu":
            self.head = GLUHead(d_in, int(config["out_dim"]), int(config.get("width_factor", 8)))
        else:
            self.head = LinearHead(d_in, int(config["out_dim"]))

    def pooled_features(self, tokens: Tensor, num_prefix_tokens: int | None = None) -> Tensor:
        """The ``concat`` feature ``[CLS ; mean(patches)]`` the head is trained on."""
        cls, patches = _split(tokens, self._prefix(num_prefix_tokens))
        return torch.cat([cls, patches.mean(dim=1)], dim=-1)

    def forward(self, tokens: Tensor, num_prefix_tokens: int | None = None) -> Tensor:
        """Per-patch aligned tokens ``[B, N, out_dim]``: the head on ``[CLS ; patch_i]``."""
        cls, patches = _split(tokens, self._prefix(num_prefix_tokens))
        pairs = torch.cat([cls.unsqueeze(1).expand(-1, patches.shape[1], -1), patches], dim=-1)
        return self.head(pairs)

    def pool(self, tokens: Tensor, num_prefix_tokens: int | None = None) -> Tensor:
        """Global embedding ``[B, out_dim]`` (unnormalized): the head on ``[CLS ; mean(patches)]``."""
        return self.head(self.pooled_features(tokens, num_prefix_tokens))

    def _prefix(self, num_prefix_tokens: int | None) -> int:
        return int(self.config["num_prefix_tokens"] if num_prefix_tokens is None else num_prefix_tokens)


class FreezeAlignTokenHead(nn.Module):
    """freeze-align vision head: a shared patch projector and a CLS projector, summed per patch."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim", "num_prefix_tokens"), "freeze-align image head")
        self.config = dict(config)
        d, d_out, p = int(config["in_dim"]), int(config["out_dim"]), float(config.get("dropout", 0.1))
        self.patch_proj = TokenProjector(d, d_out, p)
        self.cls_proj = TokenProjector(d, d_out, p)

    def forward(self, tokens: Tensor, num_prefix_tokens: int | None = None) -> Tensor:
        """Per-patch aligned tokens ``[B, N, out_dim]``: ``patch_proj(patch_i) + cls_proj(CLS)``."""
        prefix = int(self.config["num_prefix_tokens"] if num_prefix_tokens is None else num_prefix_tokens)
        cls, patches = _split(tokens, prefix)
        return self.patch_proj(patches) + self.cls_proj(cls).unsqueeze(1)

    def pool(self, tokens: Tensor, num_prefix_tokens: int | None = None) -> Tensor:
        """Global embedding ``[B, out_dim]`` (unnormalized): the mean of the per-patch tokens."""
        return self(tokens, num_prefix_tokens).mean(dim=1)


class SailTextHead(nn.Module):
    """SAIL text head (GLU or linear) on sentence embeddings (the text model's own pooling)."""

    uses_tokens = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim"), "SAIL text head")
        self.config = dict(config)
        d_in, d_out = int(config["in_dim"]), int(config["out_dim"])
        if config["kind"] == "sail_glu":
            self.head = GLUHead(d_in, d_out, int(config.get("width_factor", 8)))
        else:
            self.head = LinearHead(d_in, d_out)

    def forward(self, sentence: Tensor) -> Tensor:
        """``[B, in_dim] -> [B, out_dim]`` (unnormalized)."""
        return self.head(sentence)


class FreezeAlignTextHead(nn.Module):
    """freeze-align text head: token projector, attention-mask mean, global head (unnormalized)."""

    uses_tokens = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim"), "freeze-align text head")
        version = config.get("head_version", FREEZE_ALIGN_TEXT_HEAD_VERSION)
        if version != FREEZE_ALIGN_TEXT_HEAD_VERSION:
            raise ValueError(
                f"freeze-align text head config {config}: head_version {version!r} is not supported "
                f"(expected {FREEZE_ALIGN_TEXT_HEAD_VERSION}: the authors' ProjectionHead)"
            )
        self.config = {**config, "head_version": FREEZE_ALIGN_TEXT_HEAD_VERSION}
        d, d_out, p = int(config["in_dim"]), int(config["out_dim"]), float(config.get("dropout", 0.1))
        self.token_proj = TokenProjector(d, d_out, p)
        self.global_head = TextGlobalHead(d_out, p)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """``tokens [B, T, in_dim]`` and ``mask [B, T]`` (1 = real token) ``-> [B, out_dim]``."""
        if tokens.ndim != 3 or mask.shape != tokens.shape[:2]:
            raise ValueError(
                f"expected tokens [B, T, D] and mask [B, T], found {tuple(tokens.shape)} and {tuple(mask.shape)}"
            )
        projected = self.token_proj(tokens)
        weights = mask.to(projected.dtype).unsqueeze(-1)
        mean = (projected * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.global_head(mean)


def build_token_head(config: dict[str, Any]) -> nn.Module:
    """The image token head described by ``config`` (``kind`` in ``IMAGE_HEAD_KINDS``)."""
    kind = config.get("kind")
    if kind in ("sail_glu", "sail_linear"):
        return SailTokenHead(config)
    if kind == "freeze_align":
        return FreezeAlignTokenHead(config)
    raise ValueError(f"image head kind {kind!r}: expected one of {list(IMAGE_HEAD_KINDS)}")


def build_text_head(config: dict[str, Any]) -> nn.Module:
    """The text head described by ``config`` (``kind`` in ``TEXT_HEAD_KINDS``)."""
    kind = config.get("kind")
    if kind in ("sail_glu", "sail_linear"):
        return SailTextHead(config)
    if kind == "freeze_align":
        return FreezeAlignTextHead(config)
    raise ValueError(f"text head kind {kind!r}: expected one of {list(TEXT_HEAD_KINDS)}")


def normalize(x: Tensor) -> Tensor:
    """L2-normalize the last dimension."""
    return F.normalize(x, dim=-1)
