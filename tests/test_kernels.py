"""Kernels: each matrix equals its formula evaluated pair by pair; parameters really are parameters."""

from __future__ import annotations

import math

import pytest
import torch

from align.kernels import (
    CosineKernel,
    GaussianKernel,
    PolynomialKernel,
    build_kernel,
    cosine_kernel,
    gaussian_kernel,
    polynomial_kernel,
)
from align.losses import kernel_alignment_loss


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(9, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _loop(x: torch.Tensor, k) -> torch.Tensor:
    rows = x.tolist()
    return torch.tensor([[k(a, b) for b in rows] for a in rows], dtype=torch.float64)


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b, strict=True))


def test_polynomial_matches_loop_formula(x):
    gamma, coef0 = 0.3, 0.7

    def raw(a, b):
        return (gamma * _dot(a, b) + coef0) ** 3

    expected = _loop(x, lambda a, b: raw(a, b) / math.sqrt(raw(a, a) * raw(b, b)))
    got = polynomial_kernel(x, gamma, coef0, degree=3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.diagonal(), torch.ones(9, dtype=torch.float64))
    unnormalized = polynomial_kernel(x, gamma, coef0, degree=2, normalize=False)
    torch.testing.assert_close(unnormalized, _loop(x, lambda a, b: (gamma * _dot(a, b) + coef0) ** 2))


def test_gaussian_matches_loop_formula(x):
    sigma = 1.7
    expected = _loop(
        x, lambda a, b: math.exp(-sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / (2 * sigma**2))
    )
    got = gaussian_kernel(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.diagonal(), torch.ones(9, dtype=torch.float64))


def test_cosine_matches_loop_formula(x):
    expected = _loop(x, lambda a, b: _dot(a, b) / math.sqrt(_dot(a, a) * _dot(b, b)))
    torch.testing.assert_close(cosine_kernel(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(CosineKernel()(x).diagonal(), torch.ones(9, dtype=torch.float64))


def test_half_precision_is_computed_in_float32(x):
    k = polynomial_kernel(x.to(torch.bfloat16), 0.2, 1.0)
    assert k.dtype == torch.float32
    torch.testing.assert_close(k, polynomial_kernel(x.to(torch.bfloat16).double(), 0.2, 1.0).float())


def test_build_kernel_paper_defaults():
    target = build_kernel("polynomial", dim=1024, role="target")
    assert isinstance(target, PolynomialKernel) and list(target.parameters()) == []
    assert target.values() == pytest.approx({"gamma": 1 / 1024, "coef0": 1.0})
    assert target.degree == 3
    student = build_kernel("poly", dim=768, role="student")
    names = {name for name, _ in student.named_parameters()}
    assert names == {"gamma", "coef0"}
    assert student.values() == pytest.approx({"gamma": 0.0032, "coef0": 0.191623})
    g_target, g_student = build_kernel("gaussian", 8), build_kernel("rbf", 8, role="student")
    assert isinstance(g_target, GaussianKernel) and float(g_target.bandwidth) == pytest.approx(15.8)
    assert [n for n, _ in g_student.named_parameters()] == ["bandwidth"]
    assert g_student.values()["bandwidth"] == pytest.approx(8.7)
    assert isinstance(build_kernel("cosine", 4), CosineKernel)
    assert build_kernel("polynomial", 4, "student", trainable=False, gamma=0.5).values()["gamma"] == 0.5


@pytest.mark.parametrize(
    "args, message",
    [
        (("laplace", 4), "unknown kernel"),
        (("polynomial", 4, "teacher"), "role"),
        (("gaussian", 4, "target"), None),
    ],
)
def test_build_kernel_errors(args, message):
    if message is None:
        with pytest.raises(ValueError, match="unknown option"):
            build_kernel(*args, gamma=1.0)
    else:
        with pytest.raises(ValueError, match=message):
            build_kernel(*args)


def test_parameters_move_with_to_and_stay_registered():
    student = build_kernel("polynomial", 16, role="student")
    moved = student.to(torch.float64)
    assert moved.gamma.dtype == torch.float64 and isinstance(moved.gamma, torch.nn.Parameter)
    assert any(p is moved.gamma for p in moved.parameters())
    on_meta = build_kernel("gaussian", 16, role="student").to("meta")
    assert on_meta.bandwidth.device.type == "meta" and isinstance(on_meta.bandwidth, torch.nn.Parameter)
    fixed = build_kernel("polynomial", 16).to(torch.float64)
    assert fixed.gamma.dtype == torch.float64 and "gamma" in dict(fixed.named_buffers())


def test_student_kernel_parameters_train_and_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(1)
    student_emb = torch.randn(16, 8, generator=gen)
    target_emb = torch.randn(16, 12, generator=gen)
    student, target = build_kernel("polynomial", 8, "student"), build_kernel("polynomial", 12, "target")
    before = student.values()
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for _ in range(3):
        loss = kernel_alignment_loss(student_emb, target_emb, student, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = student.values()
    assert after["gamma"] != before["gamma"] and after["coef0"] != before["coef0"]
    torch.save(student.state_dict(), tmp_path / "k.pt")
    fresh = build_kernel("polynomial", 8, "student")
    fresh.load_state_dict(torch.load(tmp_path / "k.pt", weights_only=True))
    assert fresh.values() == after


def test_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        cosine_kernel(torch.zeros(3))
    with pytest.raises(ValueError, match="bandwidth"):
        GaussianKernel(0.0)
    with pytest.raises(ValueError, match="degree"):
        PolynomialKernel(1.0, 1.0, degree=0)
