"""Representation similarity between paired features: linear and RBF CKA, mutual k-NN.

``x [N, d_x]`` and ``y [N, d_y]`` hold features of the same N samples (row i of each is sample i).
CKA is ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``. By default HSIC is the unbiased estimator of Song
et al. (2012), "debiased CKA" (Nguyen et al., 2021), which is about 0 for independent features at any
N (it can be slightly negative); ``debiased=False`` gives the biased estimator ``tr(HKHL)`` (Kornblith
et al., 2019), which scores independent features at about ``sqrt(r_x r_y) / N`` (``r``: effective
ranks), e.g. 0.2 for 1024-d features at N = 5000. Sums are accumulated in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["batched_linear_cka", "cka_null", "linear_cka", "mutual_knn", "rbf_cka"]


def _check(x: Tensor, y: Tensor, min_rows: int = 2, what: str = "") -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"expected x [N, d_x] and y [N, d_y], found shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must hold the same samples: {x.shape[0]} rows vs {y.shape[0]} rows")
    if x.shape[0] < min_rows:
        raise ValueError(f"{what}need at least {min_rows} samples, found {x.shape[0]}")


def _ratio(hsic_xy: Tensor, norm_x: Tensor, norm_y: Tensor) -> Tensor:
    if bool((norm_x == 0).any()) or bool((norm_y == 0).any()):
        raise ValueError("CKA is undefined: x or y has zero variance (every row is the same)")
    return hsic_xy / (norm_x * norm_y)


def _unbiased_hsic_features(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased HSIC (Song et al. 2012) of the linear kernels of ``a [.., N, d_a]``, ``b [.., N, d_b]``.

    The Gram-form estimator on ``K~ = A A^T``, ``L~ = B B^T`` with zeroed diagonals,
    ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``, written with feature-space
    products only: O(N d_a d_b) time, nothing of size N^2.
    """
    n = a.shape[-2]
    ka, kb = (a * a).sum(-1), (b * b).sum(-1)  # diagonals of K, L: [.., N]
    sa, sb = a.sum(-2), b.sum(-2)  # column sums: [.., d]
    trace = torch.linalg.matrix_norm(a.transpose(-1, -2) @ b) ** 2 - (ka * kb).sum(-1)
    row_a = (a @ sa.unsqueeze(-1)).squeeze(-1) - ka  # K~ 1
    row_b = (b @ sb.unsqueeze(-1)).squeeze(-1) - kb  # L~ 1
    total_a, total_b = row_a.sum(-1), row_b.sum(-1)
    middle = (row_a * row_b).sum(-1)
    return (trace + total_a * total_b / ((n - 1) * (n - 2)) - 2.0 * middle / (n - 2)) / (n * (n - 3))


def batched_linear_cka(x: Tensor, y: Tensor, debiased: bool = False) -> Tensor:
    """Linear CKA in feature space for a batch of independent problems.

    ``x [B, N, d_x]``, ``y [B, N, d_y]`` -> ``[B]`` (float64). Biased (the default here, as in the
    freeze_align toy): ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centered
    ``Xc, Yc``; ``debiased=True``: the same ratio of unbiased HSIC estimates (needs N >= 4).
    """
    x = x.double()
    y = y.double()
    xc = x - x.mean(dim=-2, keepdim=True)
    yc = y - y.mean(dim=-2, keepdim=True)
    if debiased:
        return _ratio(
            _unbiased_hsic_features(xc, yc),
            _unbiased_hsic_features(xc, xc).clamp_min(0).sqrt(),
            _unbiased_hsic_features(yc, yc).clamp_min(0).sqrt(),
        )
    cross = torch.linalg.matrix_norm(yc.transpose(-1, -2) @ xc) ** 2
    norm_x = torch.linalg.matrix_norm(xc.transpose(-1, -2) @ xc)
    norm_y = torch.linalg.matrix_norm(yc.transpose(-1, -2) @ yc)
    return _ratio(cross, norm_x, norm_y)


def _center_(gram: Tensor) -> Tensor:
    """``H K H``, in place."""
    gram -= gram.mean(dim=0, keepdim=True)
    gram -= gram.mean(dim=1, keepdim=True)
    return gram


def _unbiased_hsic_gram(k: Tensor, m: Tensor) -> Tensor:
    """Unbiased HSIC of Gram matrices ``k``, ``m`` ``[N, N]`` (diagonals ignored), O(N^2)."""
    n = k.shape[0]
    k, m = k.clone().fill_diagonal_(0), m.clone().fill_diagonal_(0)
    row_k, row_m = k.sum(1), m.sum(1)
    trace = torch.dot(k.reshape(-1), m.reshape(-1))
    return (
        trace + row_k.sum() * row_m.sum() / ((n - 1) * (n - 2)) - 2.0 * torch.dot(row_k, row_m) / (n - 2)
    ) / (n * (n - 3))


def _cka_from_grams(k: Tensor, m: Tensor, debiased: bool) -> Tensor:
    """CKA of two (uncentered) Gram matrices; ``k`` and ``m`` may be modified in place."""
    if debiased:
        kk, mm = _unbiased_hsic_gram(k, k), _unbiased_hsic_gram(m, m)
        return _ratio(_unbiased_hsic_gram(k, m), kk.clamp_min(0).sqrt(), mm.clamp_min(0).sqrt())
    kc, mc = _center_(k), _center_(m)
    hsic_xy = torch.dot(kc.reshape(-1), mc.reshape(-1))
    return _ratio(hsic_xy, torch.linalg.norm(kc), torch.linalg.norm(mc))


def linear_cka(x: Tensor, y: Tensor, method: str = "auto", debiased: bool = True) -> float:
    """Linear CKA between ``x [N, d_x]`` and ``y [N, d_y]``: 1 for identical features, about 0 for
    independent ones (debiased, can be slightly negative; needs N >= 4); ``debiased=False``: the biased
    estimator, in ``[0, 1]``.

    ``method="feature"`` computes it from ``d x d`` products in O(N d^2) time and O(d^2) extra memory
    (biased: ``||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``); ``"gram"`` from the ``N x N`` Gram
    matrices ``K = X X^T``, ``L = Y Y^T`` in O(N^2 d) time and O(N^2) memory (biased:
    ``<HKH, HLH> / (||HKH|| ||HLH||)``). Both are the same number; ``"auto"`` picks the cheaper one
    (feature space whenever N exceeds the feature widths).
    """
    _check(x, y, 4 if debiased else 2, "debiased CKA: " if debiased else "")
    if method not in ("auto", "feature", "gram"):
        raise ValueError(f"linear_cka: method must be 'auto', 'feature' or 'gram', found {method!r}")
    n, dx, dy = x.shape[0], x.shape[1], y.shape[1]
    if method == "auto":
        feature_cost = dx * dx + dy * dy + dx * dy
        gram_cost = n * (dx + dy + 1)
        method = "feature" if feature_cost <= gram_cost else "gram"
    if method == "feature":
        return float(batched_linear_cka(x[None], y[None], debiased=debiased)[0])
    x = x.double()
    y = y.double()
    x, y = x - x.mean(0), y - y.mean(0)
    return float(_cka_from_grams(x @ x.T, y @ y.T, debiased))


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
    return torch.exp_(sq_dist.div_(-2.0 * width**2))


def rbf_cka(
    x: Tensor, y: Tensor, sigma: float | tuple[float, float] | None = None, debiased: bool = True
) -> float:
    """CKA with Gaussian kernels ``exp(-||a - b||^2 / (2 sigma^2))``: 1 for identical features, about 0
    for independent ones (debiased, needs N >= 4); ``debiased=False``: the biased estimator.

    ``sigma=None`` uses, for each of x and y separately, the median distance between distinct
    samples; a number sets the width of both; a pair ``(sigma_x, sigma_y)`` sets each. Gram form,
    so O(N^2) memory: meant for a few thousand samples.
    """
    _check(x, y, 4 if debiased else 2, "debiased CKA: " if debiased else "")
    sx, sy = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    return float(_cka_from_grams(_rbf_gram(x.double(), sx), _rbf_gram(y.double(), sy), debiased))


def cka_null(
    x: Tensor,
    y: Tensor,
    kernel: str = "linear",
    debiased: bool = True,
    permutations: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """The noise floor of CKA for these N and feature widths: CKA of ``x`` against row-permuted copies
    of ``y`` (pairing destroyed, each side's own structure kept).

    ``kernel``: ``"linear"`` (:func:`linear_cka`) or ``"rbf"`` (:func:`rbf_cka`, median widths).
    Returns ``{"mean", "sd", "permutations"}`` over ``permutations`` seeded shuffles; a difference
    between two scores within a few ``sd`` of each other is not evidence of better alignment.
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"cka_null: kernel must be 'linear' or 'rbf', found {kernel!r}")
    if permutations < 2:
        raise ValueError(f"cka_null: permutations must be >= 2, found {permutations}")
    _check(x, y, 4 if debiased else 2)
    gen = torch.Generator().manual_seed(seed)
    orders = [torch.randperm(x.shape[0], generator=gen) for _ in range(permutations)]
    if kernel == "linear":
        values = [linear_cka(x, y[order], debiased=debiased) for order in orders]
    else:  # one pair of Gram matrices; a permutation of y permutes L's rows and columns
        k, m = _rbf_gram(x.double(), None), _rbf_gram(y.double(), None)
        values = [float(_cka_from_grams(k.clone(), m[order][:, order], debiased)) for order in orders]
    scores = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(scores.mean()), "sd": float(scores.std()), "permutations": permutations}


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
