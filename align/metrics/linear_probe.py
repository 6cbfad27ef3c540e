"""Linear probes: how much of a class label a frozen feature space holds linearly.

A multinomial logistic regression on features standardized with the training rows' mean and std,
fitted full-batch with L-BFGS from zero weights (so the same features always give the same probe), with
an L2 penalty ``l2 * ||W||^2`` on the weights (not the biases) added to the mean cross-entropy: the
optimum of scikit-learn's ``LogisticRegression(C=1 / (2 * l2 * n_train))``. Scored on held-out rows with
the baselines a reader needs: chance (``1 / num_classes``) and the majority class of the training rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from align.metrics.probe import standardize

__all__ = ["fit_logistic", "linear_probe"]


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float = 1e-3, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Weights ``[D, C]`` and biases ``[C]`` minimising ``mean CE(x W + b, y) + l2 * ||W||^2`` (float64)."""
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9, tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


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
