"""CKA (biased and debiased) and mutual k-NN against straightforward implementations written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from align.metrics.cka import batched_linear_cka, cka_null, linear_cka, mutual_knn, rbf_cka


def _data(n=60, dx=7, dy=11, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(dx, dy, generator=gen, dtype=torch.float64))
    return x, y + 0.3 * torch.randn(n, dy, generator=gen, dtype=torch.float64)


def _hsic(k: np.ndarray, m: np.ndarray) -> float:
    """Biased HSIC: tr(K H L H) / (n - 1)^2."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ m @ h)) / (n - 1) ** 2


def _unbiased_hsic(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, on uncentered Gram matrices with their diagonals set to 0."""
    n = k.shape[0]
    kt, mt = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
    one = np.ones(n)
    value = np.trace(kt @ mt) + (one @ kt @ one) * (one @ mt @ one) / ((n - 1) * (n - 2))
    value -= 2.0 / (n - 2) * (one @ kt @ mt @ one)
    return float(value) / (n * (n - 3))


def _naive_cka(k: np.ndarray, m: np.ndarray, debiased: bool = False) -> float:
    hsic = _unbiased_hsic if debiased else _hsic
    return hsic(k, m) / np.sqrt(hsic(k, k) * hsic(m, m))


def _rbf(x: np.ndarray, sigma: float) -> np.ndarray:
    d2 = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    return np.exp(-d2 / (2 * sigma**2))


def test_linear_cka_matches_hsic_trace_form():
    x, y = _data()
    xn, yn = x.numpy(), y.numpy()
    expected = _naive_cka(xn @ xn.T, yn @ yn.T)
    for method in ("auto", "feature", "gram"):
        assert linear_cka(x, y, method=method, debiased=False) == pytest.approx(expected, rel=1e-10)


def test_feature_and_gram_forms_agree_in_both_regimes():
    for n, d in ((200, 5), (6, 40)):
        x, y = _data(n=n, dx=d, dy=d + 3, seed=n)
        for debiased in (False, True):
            feature = linear_cka(x, y, "feature", debiased=debiased)
            assert feature == pytest.approx(linear_cka(x, y, "gram", debiased=debiased), rel=1e-10)


def test_linear_cka_identity_and_invariances():
    x, y = _data()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y) == pytest.approx(base, rel=1e-10)
    assert linear_cka(x + 5.0, y) == pytest.approx(base, rel=1e-10)
    stretched = x * torch.tensor([10.0, 1, 1, 1, 1, 1, 0.1], dtype=torch.float64)
    assert abs(linear_cka(stretched, y) - base) > 1e-3  # not invariant to anisotropic scaling
    assert 0.0 <= linear_cka(x, y, debiased=False) <= 1.0


def test_linear_cka_float32_inputs_accumulate_in_float64():
    x, y = _data(n=500)
    assert linear_cka(x.float(), y.float()) == pytest.approx(linear_cka(x, y), rel=1e-6)


def test_batched_linear_cka_equals_per_instance():
    xs = torch.randn(4, 30, 5, dtype=torch.float64)
    ys = torch.randn(4, 30, 6, dtype=torch.float64)
    got = batched_linear_cka(xs, ys)
    expected = torch.tensor(
        [linear_cka(a, b, "gram", debiased=False) for a, b in zip(xs, ys, strict=True)], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected)
    debiased = [linear_cka(a, b, "gram") for a, b in zip(xs, ys, strict=True)]
    torch.testing.assert_close(
        batched_linear_cka(xs, ys, debiased=True), torch.tensor(debiased, dtype=torch.float64)
    )


def test_linear_cka_errors():
    x, y = _data()
    with pytest.raises(ValueError, match="60 rows vs 59 rows"):
        linear_cka(x, y[:59])
    with pytest.raises(ValueError, match="zero variance"):
        linear_cka(torch.ones(10, 3), torch.randn(10, 3))
    with pytest.raises(ValueError, match="method"):
        linear_cka(x, y, method="fast")


def test_rbf_cka_matches_naive_with_given_and_median_width():
    x, y = _data(n=40)
    xn, yn = x.numpy(), y.numpy()
    for debiased in (False, True):
        got = rbf_cka(x, y, sigma=2.5, debiased=debiased)
        assert got == pytest.approx(_naive_cka(_rbf(xn, 2.5), _rbf(yn, 2.5), debiased), rel=1e-10)
        got = rbf_cka(x, y, sigma=(1.0, 3.0), debiased=debiased)
        assert got == pytest.approx(_naive_cka(_rbf(xn, 1.0), _rbf(yn, 3.0), debiased), rel=1e-10)

    def median_dist(a):
        d = np.sqrt(((a[:, None] - a[None]) ** 2).sum(-1))
        return np.sort(d[~np.eye(len(a), dtype=bool)])[(len(a) * (len(a) - 1) - 1) // 2]  # lower median

    expected = _naive_cka(_rbf(xn, median_dist(xn)), _rbf(yn, median_dist(yn)), debiased=True)
    assert rbf_cka(x, y) == pytest.approx(expected, rel=1e-10)


def test_rbf_cka_sanity():
    x, y = _data(n=80)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64))
    assert rbf_cka(x @ q + 2.0, y) == pytest.approx(rbf_cka(x, y), rel=1e-9)
    assert rbf_cka(4.0 * x, y) == pytest.approx(rbf_cka(x, y), rel=1e-9)  # median width scales along
    unrelated = torch.randn(80, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert rbf_cka(x, y) > rbf_cka(x, unrelated) + 0.2


def test_debiased_linear_cka_matches_unbiased_hsic_in_both_forms():
    x, y = _data(n=50)
    x = x + 3.0  # uncentered features: the estimator must not depend on centering
    xn, yn = x.numpy(), y.numpy()
    expected = _naive_cka(xn @ xn.T, yn @ yn.T, debiased=True)
    for method in ("auto", "feature", "gram"):
        assert linear_cka(x, y, method=method) == pytest.approx(expected, rel=1e-10)
    assert expected < linear_cka(x, y, debiased=False)  # the bias is upward and visible at n = 50


def test_debiased_cka_is_about_zero_for_independent_features():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 256, generator=gen)
    y = torch.randn(2000, 384, generator=gen)
    assert linear_cka(x, y, debiased=False) > 0.1  # the biased floor: about sqrt(256 * 384) / 2000
    assert abs(linear_cka(x, y)) < 0.02
    assert abs(rbf_cka(x, y)) < 0.02
    assert linear_cka(x, x @ torch.randn(256, 256, generator=gen)) > 0.3  # dependent stays high
    with pytest.raises(ValueError, match="debiased CKA: need at least 4 samples, found 3"):
        linear_cka(x[:3], y[:3])


def test_cka_null_is_the_score_against_permuted_rows():
    x, y = _data(n=120)
    gen = torch.Generator().manual_seed(5)
    orders = [torch.randperm(120, generator=gen) for _ in range(4)]
    for kernel, score in (("linear", linear_cka), ("rbf", rbf_cka)):
        for debiased in (False, True):
            null = cka_null(x, y, kernel, debiased=debiased, permutations=4, seed=5)
            values = torch.tensor([score(x, y[o], debiased=debiased) for o in orders], dtype=torch.float64)
            assert null["mean"] == pytest.approx(float(values.mean()), rel=1e-9)
            assert null["sd"] == pytest.approx(float(values.std()), rel=1e-9)
    biased = cka_null(x, y, debiased=False)
    debiased = cka_null(x, y)
    assert biased["mean"] > 0.02 and abs(debiased["mean"]) < 3 * debiased["sd"] + 1e-3
    assert linear_cka(x, y) > debiased["mean"] + 10 * debiased["sd"]  # the related pair stands out


def _naive_mknn(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    def neighbours(a):
        sims = torch.nn.functional.cosine_similarity(a[:, None], a[None], dim=-1).tolist()
        return [
            set(sorted((j for j in range(len(a)) if j != i), key=lambda j: -row[j])[:k])
            for i, row in enumerate(sims)
        ]

    nx, ny = neighbours(x), neighbours(y)
    return sum(len(a & b) for a, b in zip(nx, ny, strict=True)) / (k * len(nx))


def test_mutual_knn_matches_naive_and_sanity():
    x, y = _data(n=50)
    assert mutual_knn(x, y, k=5, block=7) == pytest.approx(_naive_mknn(x, y, 5))
    assert mutual_knn(x, x, k=5) == 1.0
    assert mutual_knn(x, 3.0 * x, k=5) == 1.0  # cosine neighbours ignore scale


def test_mutual_knn_shuffled_is_near_chance():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 16, generator=gen)
    shuffled = x[torch.randperm(1000, generator=gen)]
    chance = 10 / 999
    assert mutual_knn(x, shuffled, k=10) == pytest.approx(chance, abs=0.01)
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(x[:5], x[:5], k=5)
