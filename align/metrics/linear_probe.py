"""Linear probes: how much of a class label a frozen feature space holds linearly.

A multinomial logistic regression on features standardized with the training rows' mean and std,
fitted full-batch with L-BFGS from zero weights (so the same features always give the same probe), with
an L2 penalty ``l2 * ||W||^2`` on the weights (not the biases) added to the mean cross-entropy: the
optimum of scikit-learn's ``LogisticRegression(C=1 / (2 * l2 * n_train))``. Scored on held-out rows with
the baselines a reader needs: chance (``1 / num_classes``) and the majority class of the training rows.

The fit is SciPy's L-BFGS-B on the loss and its analytic gradient (no autograd: a probe is a few matrix
products per step). With more features than training rows (D > N) the optimum's weights lie in the rows'
span (the gradient ``X^T G + 2 l2 W`` does), so the fit runs on the rows' coordinates in that span
(``X = U S V^T``, ``W = V Z``: the same loss, with ``r <= N`` rows of weights instead of D) and maps back.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp
from torch import Tensor

from align.metrics.probe import standardize

__all__ = ["fit_logistic", "linear_probe"]


def _fit(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int) -> np.ndarray:
    """``[W; b]`` (``[D + 1, C]``) minimising ``mean CE(x W + b, y) + l2 * ||W||^2`` by L-BFGS from zero."""
    n, dim = x.shape
    rows = np.arange(n)
    onehot = np.zeros((n, num_classes))
    onehot[rows, y] = 1.0

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: dim * num_classes].reshape(dim, num_classes), theta[dim * num_classes :]
        logits = x @ w + b
        lse = logsumexp(logits, axis=1)
        loss = float((lse - logits[rows, y]).mean() + l2 * np.dot(w.ravel(), w.ravel()))
        g = (np.exp(logits - lse[:, None]) - onehot) / n
        return loss, np.concatenate([(x.T @ g + 2 * l2 * w).ravel(), g.sum(axis=0)])

    found = minimize(loss_and_grad, np.zeros(dim * num_classes + num_classes), jac=True, method="L-BFGS-B",
                     options={"maxiter": max_iter, "maxfun": 2 * max_iter, "maxcor": 20, "gtol": 1e-8,
                              "ftol": 1e-16})  # fmt: skip
    return found.x.reshape(dim + 1, num_classes)


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Weights ``[D, C]`` and biases ``[C]`` minimising ``mean CE(x W + b, y) + l2 * ||W||^2`` (float64)."""
    x64 = x.double().numpy()
    labels = y.numpy()
    if x64.shape[1] > x64.shape[0]:  # more features than rows: fit in the rows' span (module doc)
        _, s, vt = np.linalg.svd(x64, full_matrices=False)
        basis = vt[s > s[0] * 1e-12].T  # [D, r]
        theta = _fit(x64 @ basis, labels, num_classes, l2, max_iter)
        w = basis @ theta[:-1]
    else:
        theta = _fit(x64, labels, num_classes, l2, max_iter)
        w = theta[:-1]
    return torch.from_numpy(np.ascontiguousarray(w)), torch.from_numpy(theta[-1].copy())


def linear_probe(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, l2: float = 1e-3,
    max_iter: int = 500,
) -> dict:  # fmt: skip
    """Fit on ``train`` rows, score on ``test`` rows (labels are class indices in ``[0, num_classes)``).

    Returns held-out ``accuracy`` and its binomial standard error ``stderr``, ``train_accuracy``,
    ``chance`` (``1 / num_classes``), ``majority`` (test accuracy of always answering the most frequent
    training class), ``n_train``, ``n_test`` and ``num_classes``.
    """
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"linear_probe: expected features [N, D] with the same D, found {tuple(train_x.shape)} and "
            f"{tuple(test_x.shape)}"
        )
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or not len(test_y):
        raise ValueError(
            f"linear_probe: {len(train_x)}/{len(train_y)} train and {len(test_x)}/{len(test_y)} test "
            "feature/label rows; expected equal counts and at least one test row"
        )
    tr, te = standardize(train_x.double(), test_x.double())
    w, b = fit_logistic(tr, train_y, num_classes, l2, max_iter)
    accuracy = float(((te @ w + b).argmax(dim=1) == test_y).double().mean())
    majority_class = torch.bincount(train_y, minlength=num_classes).argmax()
    return {
        "accuracy": accuracy,
        "stderr": math.sqrt(accuracy * (1 - accuracy) / len(test_y)),
        "train_accuracy": float(((tr @ w + b).argmax(dim=1) == train_y).double().mean()),
        "chance": 1 / num_classes,
        "majority": float((test_y == majority_class).double().mean()),
        "n_train": len(train_y),
        "n_test": len(test_y),
        "num_classes": num_classes,
    }
