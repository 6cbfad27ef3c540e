"""Heads: shapes, parameter counts from hand formulas, forward equal to the written-out formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align.heads import (
    KINDS,
    TOKEN_RULES,
    FreezeAlignTextHead,
    GLUHead,
    LinearHead,
    TextGlobalHead,
    TokenProjector,
    build_text_head,
    build_token_head,
    freeze_align_param_count,
)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linear(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def test_glu_head_shape_width_and_count():
    head = GLUHead(48, d_out=32)
    assert head.w1.out_features == head.w2.out_features == 8 * 48 and head.w3.in_features == 8 * 48
    assert _count(head) == 2 * 48 + 2 * _linear(48, 384) + _linear(384, 32)
    assert head(torch.randn(5, 48)).shape == (5, 32)
    assert head(torch.randn(2, 7, 48)).shape == (2, 7, 32)  # per token
    assert GLUHead(16, width_factor=2).w1.out_features == 32


def test_glu_head_forward_and_init():
    torch.manual_seed(0)
    head = GLUHead(12, d_out=6)
    x = torch.randn(4, 12)
    h = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = head.w3(torch.clamp(h @ head.w1.weight.T, 0, 6) * (h @ head.w2.weight.T))
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    for layer in (head.w1, head.w2, head.w3):
        assert torch.count_nonzero(layer.bias) == 0
        bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))
        largest = float(layer.weight.detach().abs().max())
        assert 0.8 * bound < largest <= bound  # uniform over the Xavier range


def test_linear_head():
    head = LinearHead(10, 4)
    x = torch.randn(3, 10)
    torch.testing.assert_close(head(x), x @ head.proj.weight.T + head.proj.bias)
    assert _count(head) == _linear(10, 4)


def test_token_projector_formula_and_dropout():
    torch.manual_seed(0)
    proj = TokenProjector(20, d_out=16).eval()
    x = torch.randn(2, 5, 20)
    h = F.layer_norm(x, (20,), proj.norm.weight, proj.norm.bias)
    lin1, lin2 = proj.mlp[0], proj.mlp[2]
    expected = proj.linear(h) + lin2(F.gelu(lin1(h)))
    torch.testing.assert_close(proj(x), expected)
    assert _count(proj) == 2 * 20 + _linear(20, 16) + _linear(20, 16) + _linear(16, 16)
    proj.train()
    assert not torch.allclose(proj(x), expected)  # dropout is active in training


class _AuthorsProjectionHead(torch.nn.Module):
    """freeze-align's ``ProjectionHead`` as its authors wrote it (residual on the projection)."""

    def __init__(self, embedding_dim: int, projection_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.projection = torch.nn.Linear(embedding_dim, projection_dim)
        self.gelu = torch.nn.GELU()
        self.fc = torch.nn.Linear(projection_dim, projection_dim)
        self.dropout = torch.nn.Dropout(dropout)
        self.layer_norm = torch.nn.LayerNorm(projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.gelu(projected)
        x = self.fc(x)
        x = self.dropout(x)
        x = x + projected
        return self.layer_norm(x)


def test_text_global_head_is_the_authors_projection_head():
    torch.manual_seed(0)
    head = TextGlobalHead(24).eval()
    with torch.no_grad():  # non-trivial norm parameters, so a wrong residual cannot hide behind them
        head.layer_norm.weight.uniform_(0.5, 1.5)
        head.layer_norm.bias.uniform_(-0.5, 0.5)
    x = 3.0 * torch.randn(3, 24)
    p = x @ head.projection.weight.T + head.projection.bias
    h = F.gelu(p) @ head.fc.weight.T + head.fc.bias
    z = h + p  # residual on the projection P x, not on the input x
    z = (z - z.mean(-1, keepdim=True)) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + 1e-5)
    expected = z * head.layer_norm.weight + head.layer_norm.bias
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-5)
    authors = _AuthorsProjectionHead(24, 24).eval()
    authors.load_state_dict(head.state_dict(), strict=True)  # same parameter names and shapes
    torch.testing.assert_close(head(x), authors(x))
    assert _count(head) == 2 * _linear(24, 24) + 2 * 24


def test_text_global_head_refuses_weights_of_the_old_formula():
    old = {"mlp.0.weight": torch.zeros(8, 8), "mlp.0.bias": torch.zeros(8), "mlp.2.weight": torch.zeros(8, 8)}
    old |= {"mlp.2.bias": torch.zeros(8), "norm.weight": torch.ones(8), "norm.bias": torch.zeros(8)}
    with pytest.raises(ValueError, match=r"LayerNorm\(x \+ fc\(GELU\(P x\)\)\).*cannot be\s+converted"):
        TextGlobalHead(8).load_state_dict(old)
    text = FreezeAlignTextHead({"kind": "freeze_align", "in_dim": 6, "out_dim": 8})
    assert text.config["head_version"] == 2
    state = {k: v for k, v in text.state_dict().items() if not k.startswith("global_head.")}
    state |= {f"global_head.{k}": v for k, v in old.items()}
    with pytest.raises(ValueError, match="global_head.*retrain"):
        text.load_state_dict(state)
    with pytest.raises(ValueError, match="head_version 1"):
        FreezeAlignTextHead({"kind": "freeze_align", "in_dim": 6, "out_dim": 8, "head_version": 1})


def test_freeze_align_count_for_dinov2_large_and_roberta_large():
    token_proj = 2 * 1024 + 3 * _linear(1024, 1024)
    expected = 3 * token_proj + 2 * _linear(1024, 1024) + 2 * 1024
    count = freeze_align_param_count(1024, 1024)
    assert count == expected == 11_553_792
    assert abs(count / 1e6 - 11.5) < 0.1


def test_freeze_align_count_matches_real_modules_and_allocates_nothing():
    real = [TokenProjector(12, 8), TokenProjector(12, 8), TokenProjector(20, 8), TextGlobalHead(8)]
    assert freeze_align_param_count(12, 20, d_out=8) == sum(_count(m) for m in real)
    # 11 linear layers of 65536^2: ~4.7e10 parameters (about 190 GB in fp32), so nothing was allocated.
    assert freeze_align_param_count(65536, 65536, d_out=65536) > 11 * 65536**2


def _glu(d_in: int, d_out: int) -> int:
    return 2 * d_in + 2 * _linear(d_in, 8 * d_in) + _linear(8 * d_in, d_out)


def _projector(d: int, d_out: int) -> int:
    return 2 * d + 2 * _linear(d, d_out) + _linear(d_out, d_out)


@pytest.mark.parametrize("kind", ["sail_glu", "sail_linear", "freeze_align"])
def test_every_kind_builds_heads_of_its_formula(kind):
    """Each KINDS entry builds the image and text head of its method (counted by hand, vision 12 -> 6, text 10 -> 6)."""
    image_count = {
        "sail_glu": _glu(24, 6),  # the head sees [CLS ; patch]: twice the width
        "sail_linear": _linear(24, 6),
        "freeze_align": 2 * _projector(12, 6),  # patch and CLS projectors
    }
    text_count = {
        "sail_glu": _glu(10, 6),
        "sail_linear": _linear(10, 6),
        "freeze_align": _projector(10, 6) + 2 * _linear(6, 6) + 2 * 6,  # + the global head
    }
    image = build_token_head({"kind": kind, "in_dim": 12, "out_dim": 6, "num_prefix_tokens": 1})
    text = build_text_head({"kind": kind, "in_dim": 10, "out_dim": 6})
    assert (_count(image), _count(text)) == (image_count[kind], text_count[kind])
    assert image.config["kind"] == text.config["kind"] == kind
    assert image(torch.randn(2, 5, 12)).shape == (2, 4, 6)
    assert TOKEN_RULES[kind].startswith("sail: " if kind.startswith("sail") else "freeze_align: ")
    assert set(KINDS) == set(TOKEN_RULES) == {"sail_glu", "sail_linear", "freeze_align", "bridge"}
