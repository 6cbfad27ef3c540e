"""Alignment heads: SAIL's GLU head, a linear probe head, and freeze-align's token projectors.

All heads act on the last dimension, so they apply equally to pooled features ``[B, D]`` and to
per-token features ``[B, T, D]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "GLUHead",
    "LinearHead",
    "TextGlobalHead",
    "TokenProjector",
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
    """freeze-align token projector.

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
    """freeze-align text global head, the authors' ``ProjectionHead``.

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
                f"freeze-align text head '{prefix.rstrip('.')}': these weights were trained with the earlier "
                "head LayerNorm(x + fc(GELU(P x))) (keys 'mlp.*', 'norm.*'); the authors' head, used since "
                "head version 2, is LayerNorm(fc(GELU(P x)) + P x). The two differ, so the weights cannot be "
                "converted: retrain the projector (mllm-swap align projector)."
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def freeze_align_param_count(vision_dim: int, text_dim: int, d_out: int = 1024) -> int:
    """Parameters of freeze-align's projectors, counted on the meta device (nothing is allocated).

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
