"""Alignment heads: the blocks (SAIL's GLU and linear heads, freeze_align's projectors) and the aligned
heads built from them, one ``KINDS`` table naming each head kind's image head, text head and token rule.

Blocks act on the last dimension, so they apply equally to pooled features ``[B, D]`` and to per-token
features ``[B, T, D]``.

Image token heads take one layer's backbone tokens ``[B, P + N, D]`` (``P`` prefix tokens: CLS, then
registers) and return aligned per-patch tokens ``[B, N, D_out]`` plus a global embedding:

* ``sail_glu`` / ``sail_linear`` (SAIL): per patch the head sees ``[CLS ; patch_i]``; the global embedding
  is the head on ``[CLS ; mean_i patch_i]`` (the ``concat`` feature it was trained on).
* ``freeze_align``: per patch ``patch_proj(patch_i) + cls_proj(CLS)``; the global embedding is the mean of
  those tokens (``mean_i patch_proj(patch_i) + cls_proj(CLS)``), which is exactly freeze_align's vision
  embedding before normalization.

Text heads turn a text encoder's output into the joint space: ``sail_glu`` / ``sail_linear`` act on the
sentence embedding; ``freeze_align`` projects every token, takes the attention-mask mean and applies the
authors' global ``ProjectionHead`` ``LayerNorm(fc(GELU(P m)) + P m)``. Every aligned head is built from a
JSON-able ``config`` dict (:func:`build_token_head` / :func:`build_text_head`) and keeps it in ``.config``,
so artifacts and MLLM towers rebuild it from JSON. ``config["out_dim"]`` is the output width.

This module imports only torch: it is copied with :mod:`align.modeling_aligned_tower` into checkpoints
as their remote code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

# 2: the global head is the authors' LayerNorm(fc(GELU(P x)) + P x); weights of version 1 (no
# ``head_version`` key, residual on the input x) are refused when loaded (see TextGlobalHead).
FREEZE_ALIGN_TEXT_HEAD_VERSION = 2

__all__ = [
    "KINDS",
    "TOKEN_RULES",
    "FreezeAlignTextHead",
    "FreezeAlignTokenHead",
    "GLUHead",
    "LinearHead",
    "SailTextHead",
    "SailTokenHead",
    "TextGlobalHead",
    "TokenBridgeHead",
    "TokenProjector",
    "build_text_head",
    "build_token_head",
    "freeze_align_param_count",
]


class GLUHead(nn.Module):
    """SAIL alignment head: ``LayerNorm(d_in) -> W3(relu6(W1 h) * (W2 h))``, no residual.

    ``W1, W2: d_in -> width_factor * d_in``, ``W3: -> d_out``; Xavier-uniform weights, zero biases.
    """

    def __init__(self, d_in: int, d_out: int = 1024, width_factor: int = 8) -> None:
        super().__init__()
        if min(d_in, d_out, width_factor) < 1:
            raise ValueError(
                f"GLUHead: d_in, d_out, width_factor must be >= 1, found {d_in}, {d_out}, {width_factor}"
            )
        hidden = width_factor * d_in
        self.d_in, self.d_out, self.width_factor = d_in, d_out, width_factor
        self.norm = nn.LayerNorm(d_in)
        self.w1 = nn.Linear(d_in, hidden)
        self.w2 = nn.Linear(d_in, hidden)
        self.w3 = nn.Linear(hidden, d_out)
        self.act = nn.ReLU6()
        for layer in (self.w1, self.w2, self.w3):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d_in] -> [..., d_out]``."""
        h = self.norm(x)
        return self.w3(self.act(self.w1(h)) * self.w2(h))


class LinearHead(nn.Module):
    """A single linear map ``d_in -> d_out`` (SAIL's alignment probing)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d_in] -> [..., d_out]``."""
        return self.proj(x)


class TokenProjector(nn.Module):
    """freeze_align token projector.

    ``y = Linear(x') + Linear(GELU(Linear(x')))`` with ``x' = Dropout(LayerNorm(x))``: a linear path
    plus a two-layer MLP path, both from ``d`` to ``d_out``.
    """

    def __init__(self, d: int, d_out: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.d, self.d_out = d, d_out
        self.norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(d, d_out)
        self.mlp = nn.Sequential(nn.Linear(d, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d] -> [..., d_out]``."""
        h = self.dropout(self.norm(x))
        return self.linear(h) + self.mlp(h)


class TextGlobalHead(nn.Module):
    """freeze_align text global head, the authors' ``ProjectionHead``.

    ``p = projection(x); out = layer_norm(dropout(fc(GELU(p))) + p)``: the residual is on the projection
    ``p``, not on the input ``x``. Submodule names are the authors' (``projection``, ``fc``,
    ``layer_norm``), so their state dict loads as is. Weights saved by the earlier, wrong formula
    ``LayerNorm(x + fc(GELU(P x)))`` (keys ``mlp.*`` / ``norm.*``) are refused when loaded: the two
    functions differ, so those weights cannot be converted.
    """

    def __init__(self, d: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        self.d = d
        self.projection = nn.Linear(d, d)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., d] -> [..., d]``."""
        projected = self.projection(x)
        return self.layer_norm(self.dropout(self.fc(self.gelu(projected))) + projected)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        if f"{prefix}mlp.0.weight" in state_dict:
            raise ValueError(
                f"freeze_align text head '{prefix.rstrip('.')}': these weights were trained with the earlier "
                "head LayerNorm(x + fc(GELU(P x))) (keys 'mlp.*', 'norm.*'); the authors' head, used since "
                "head version 2, is LayerNorm(fc(GELU(P x)) + P x). The two differ, so the weights cannot be "
                "converted: retrain the projector (mllm-swap align freeze_align)."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def freeze_align_param_count(vision_dim: int, text_dim: int, d_out: int = 1024) -> int:
    """Parameters of freeze_align's projectors, counted on the meta device (nothing is allocated).

    Vision: a patch-token projector and a CLS projector (``TokenProjector(vision_dim, d_out)`` each);
    text: a token projector ``TokenProjector(text_dim, d_out)`` and ``TextGlobalHead(d_out)``.
    DINOv2-L (1024) + all-roberta-large-v1 (1024) gives 11,553,792.
    """
    with torch.device("meta"):
        modules = [
            TokenProjector(vision_dim, d_out),
            TokenProjector(vision_dim, d_out),
            TokenProjector(text_dim, d_out),
            TextGlobalHead(d_out),
        ]
    return sum(p.numel() for m in modules for p in m.parameters())


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
    """freeze_align vision head: a shared patch projector and a CLS projector, summed per patch."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim", "num_prefix_tokens"), "freeze_align image head")
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
    """freeze_align text head: token projector, attention-mask mean, global head (unnormalized)."""

    uses_tokens = True

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim"), "freeze_align text head")
        version = config.get("head_version", FREEZE_ALIGN_TEXT_HEAD_VERSION)
        if version != FREEZE_ALIGN_TEXT_HEAD_VERSION:
            raise ValueError(
                f"freeze_align text head config {config}: head_version {version!r} is not supported "
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


class TokenBridgeHead(nn.Module):
    """A bridge swap's token adapter: a new tower's tokens onto an old tower's, at the layer an MLLM consumes.

    ``config``: ``in_dim``, ``out_dim``, ``hidden_dim``, ``out_grid`` (the old tower's patch grid side). The
    prefix tokens (CLS, registers) are dropped, the patch grid is resampled bilinearly to ``out_grid`` when
    it differs, then per token ``y = W_skip n + W_2 GELU(W_1 n)`` with ``n = LayerNorm(x)``.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        _require(config, ("kind", "in_dim", "out_dim", "hidden_dim", "out_grid"), "token bridge")
        self.config = dict(config)
        d_in, d_out, hidden = int(config["in_dim"]), int(config["out_dim"]), int(config["hidden_dim"])
        self.norm = nn.LayerNorm(d_in)
        self.skip = nn.Linear(d_in, d_out)
        self.mlp = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))

    def resample(self, patches: Tensor) -> Tensor:
        """Patch tokens ``[B, g*g, D]`` on the ``out_grid`` grid (bilinear, unchanged when the grids agree)."""
        side, out = math.isqrt(patches.shape[1]), int(self.config["out_grid"])
        if side * side != patches.shape[1]:
            raise ValueError(f"token bridge: {patches.shape[1]} patch tokens do not form a square grid")
        if side == out:
            return patches
        grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)
        grid = nn.functional.interpolate(grid.float(), size=(out, out), mode="bilinear", align_corners=False)
        return grid.flatten(2).transpose(1, 2).to(patches.dtype)

    def forward(self, tokens: Tensor, num_prefix_tokens: int = 0) -> Tensor:
        """``[B, P + N, D_in]`` -> ``[B, out_grid^2, D_out]``."""
        x = self.norm(self.resample(tokens[:, num_prefix_tokens:]))
        return self.skip(x) + self.mlp(x)


@dataclass(frozen=True)
class HeadKind:
    """What a head ``kind`` builds: its image token head, its text head (None: image only), its token rule."""

    token_head: type[nn.Module]
    text_head: type[nn.Module] | None
    token_rule: str


_SAIL_RULE = "sail: head([CLS ; patch_i])"
KINDS: dict[str, HeadKind] = {
    "sail_glu": HeadKind(SailTokenHead, SailTextHead, _SAIL_RULE),
    "sail_linear": HeadKind(SailTokenHead, SailTextHead, _SAIL_RULE),
    "freeze_align": HeadKind(
        FreezeAlignTokenHead, FreezeAlignTextHead, "freeze_align: patch_proj(patch_i) + cls_proj(CLS)"
    ),
    "bridge": HeadKind(TokenBridgeHead, None, "bridge: adapter(resampled patch_i), prefix dropped"),
}
TOKEN_RULES = {kind: spec.token_rule for kind, spec in KINDS.items()}


def _kind(config: dict[str, Any], what: str) -> HeadKind:
    kind = config.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{what} head kind {kind!r}: expected one of {list(KINDS)}")
    return KINDS[kind]


def build_token_head(config: dict[str, Any]) -> nn.Module:
    """The image token head described by ``config`` (``kind`` a key of :data:`KINDS`)."""
    return _kind(config, "image").token_head(config)


def build_text_head(config: dict[str, Any]) -> nn.Module:
    """The text head described by ``config`` (``kind`` a key of :data:`KINDS` with a text head)."""
    kind = _kind(config, "text")
    if kind.text_head is None:
        raise ValueError(f"head kind {config['kind']!r} maps image tokens only; it has no text head")
    return kind.text_head(config)
