"""Representation similarity between paired features: linear and RBF CKA, mutual k-NN.

``x [N, d_x]`` and ``y [N, d_y]`` hold features of the same N samples (row i of each is sample i).
CKA uses the biased HSIC estimator with centering (Kornblith et al., 2019); sums are accumulated in
float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batched_linear_cka", "linear_cka", "mutual_knn", "rbf_cka"]


def _check(x: Tensor, y: Tensor, min_rows: int = 2) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"expected x [N, d_x] and y [N, d_y], found shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples: {x.shape[0]} rows vs {y.shape[0]} rows")
    if x.shape[0] < min_rows:
        raise ValueError(f"need at least {min_rows} samples, found {x.shape[0]}")


def _ratio(hsic_xy: Tensor, norm_x: Tensor, norm_y: Tensor) -> Tensor:
    if bool((norm_x == 0).any()) or bool((norm_y == 0).any()):
        raise ValueError("CKA is undefined: x or y has zero variance (every row is the same)")
    return hsic_xy / (norm_x * norm_y)


def batched_linear_cka(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA in feature space for a batch of independent problems.

    ``x [B, N, d_x]``, ``y [B, N, d_y]`` -> ``[B]`` (float64):
    ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centered ``Xc, Yc``.
    """
    x = x.double()
    y = y.double()
    xc = x - x.mean(dim=-2, keepdim=True)
    yc = y - y.mean(dim=-2, keepdim=True)
    cross = torch.linalg.matrix_norm(yc.transpose(-1, -2) @ xc) ** 2
    norm_x = torch.linalg.matrix_norm(xc.transpose(-1, -2) @ xc)
    norm_y = torch.linalg.matrix_norm(yc.transpose(-1, -2) @ yc)
    return _ratio(cross, norm_x, norm_y)


def _centered_gram(x: Tensor) -> Tensor:
    """``H K H`` for the linear kernel ``K = X X^T``, centering the Gram matrix in place."""
    gram = x @ x.T
    gram -= gram.mean(dim=0, keepdim=True)
    gram -= gram.mean(dim=1, keepdim=True)
    return gram


def _cka_from_centered_grams(kc: Tensor, lc: Tensor) -> Tensor:
    hsic_xy = torch.dot(kc.reshape(-1), lc.reshape(-1))
    return _ratio(hsic_xy, torch.linalg.norm(kc), torch.linalg.norm(lc))


def linear_cka(x: Tensor, y: Tensor, method: str = "auto") -> float:
    """Linear CKA between ``x [N, d_x]`` and ``y [N, d_y]``, in ``[0, 1]``.

    ``method="feature"`` computes ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` in O(N d^2)
    time and O(d^2) extra memory; ``"gram"`` computes ``<HKH, HLH> / (||HKH|| ||HLH||)`` with
    ``K = X X^T``, ``L = Y Y^T`` in O(N^2 d) time and O(N^2) memory. Both are the same number;
    ``"auto"`` picks the cheaper one (feature space whenever N exceeds the feature widths).
    """
    _check(x, y)
    if method not in ("auto", "feature", "gram"):
        raise ValueError(f"linear_cka: method must be 'auto', 'feature' or 'gram', found {method!r}")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if method == "auto":
        feature_cost = dx * dx + dy * dy + dx * dy
        gram_cost = n * (dx + dy + 1)
        method = "feature" if feature_cost <= gram_cost else "gram"
    if method == "feature":
        return float(batched_linear_cka(x[None], y[None])[0])
    x = x.double()
    y = y.double()
    kc = _centered_gram(x)
    lc = _centered_gram(y)
    return float(_cka_from_centered_grams(kc, lc))


def _median_distance(sq_dist: Tensor) -> Tensor:
    n = sq_dist.shape[0]
    off_diag = sq_dist[~torch.eye(n, dtype=torch.bool, device=sq_dist.device)]
    return off_diag.clamp_min(0).sqrt().median()


def _rbf_gram(x: Tensor, sigma: float | None) -> Tensor:
    sq_norms = (x * x).sum(dim=1)
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)).clamp_min_(0.0)
    sq_dist.fill_diagonal_(0.0)
    width = _median_distance(sq_dist) if sigma is None else torch.tensor(float(sigma), dtype=x.dtype)
    if not float(width) > 0:
        raise ValueError(f"rbf_cka: kernel width must be > 0, found {float(width)} (all points identical?)")
    gram = torch.exp_(sq_dist.div_(-2.0 * width**2))
    gram -= gram.mean(dim=0, keepdim=True)
    gram -= gram.mean(dim=1, keepdim=True)
    return gram


def rbf_cka(x: Tensor, y: Tensor, sigma: float | tuple[float, float] | None = None) -> float:
    """CKA with Gaussian kernels ``exp(-||a - b||^2 / (2 sigma^2))``, in ``[0, 1]``.

    ``sigma=None`` uses, for each of x and y separately, the median distance between distinct
    samples; a number sets the width of both; a pair ``(sigma_x, sigma_y)`` sets each. Gram form,
    so O(N^2) memory: meant for a few thousand samples.
    """
    _check(x, y)
    sx, sy = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    kc = _rbf_gram(x.double(), sx)
    lc = _rbf_gram(y.double(), sy)
    return float(_cka_from_centered_grams(kc, lc))


def _knn_indices(x: Tensor, k: int, block: int) -> Tensor:
    unit = F.normalize(x.float(), dim=-1)
    out = []
    for start in range(0, unit.shape[0], block):
        sims = unit[start : start + block] @ unit.T
        sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])] = float("-inf")
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def mutual_knn(x: Tensor, y: Tensor, k: int = 10, block: int = 4096) -> float:
    """Mutual k-nearest-neighbour alignment: mean over samples of ``|NN_x(i) & NN_y(i)| / k``.

    Neighbours by cosine similarity, excluding the sample itself; 1 when both spaces rank the same
    neighbours, about ``k / (N - 1)`` for unrelated features. Computed in row blocks of ``block``.
    """
    _check(x, y)
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"mutual_knn: k must be in [1, N-1] = [1, {n - 1}], found {k}")
    nn_x = _knn_indices(x, k, block)
    nn_y = _knn_indices(y, k, block)
    overlap = (nn_x[:, :, None] == nn_y[:, None, :]).sum(dim=(1, 2))
    return float(overlap.double().mean() / k)
