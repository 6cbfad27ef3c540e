"""The three terms of DINOv2's objective, as pure functions of logits and features.

* :func:`dino_loss`: cross-entropy between the teacher's centred, sharpened prototype distribution of each
  global view's CLS token and the student's distribution of every other view (DINO).
* :func:`ibot_loss`: the same on the patch tokens the student saw masked, against the teacher's tokens at
  those positions of the unmasked view, each image weighted equally (iBOT, as DINOv2 weights it).
* :func:`koleo_loss`: the Kozachenko-Leonenko entropy estimator on L2-normalised features: minus the
  mean log distance to the nearest neighbour in the batch (spreads the CLS tokens out).

Follows ``dinov2/loss/{dino_clstoken_loss,ibot_patch_loss,koleo_loss}.py``. The teacher's targets come
from one of DINOv2's two centrings: :func:`teacher_probs` with :func:`update_center` (DINO's ``centering``:
subtract an EMA of the batch means, then sharpen) or :func:`sinkhorn_knopp` (DINOv2's default: a few
Sinkhorn-Knopp iterations that spread the batch evenly over the prototypes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dino_loss", "ibot_loss", "koleo_loss", "sinkhorn_knopp", "teacher_probs", "update_center"]


def teacher_probs(logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """The teacher's targets: ``softmax((logits - center) / temperature)`` (centring, then sharpening)."""
    return F.softmax((logits - center) / temperature, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, logits: Tensor, momentum: float) -> None:
    """``center <- momentum * center + (1 - momentum) * mean(logits)`` in place, averaged over processes."""
    mean = logits.float().mean(dim=0, keepdim=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    center.mul_(momentum).add_(mean, alpha=1 - momentum)


@torch.no_grad()
def sinkhorn_knopp(logits: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """The teacher's targets by DINOv2's ``sinkhorn_knopp_teacher``: ``Q = exp(logits / temperature)``
    (``[B, K]``, the ``B`` rows of all processes together) scaled ``iterations`` times so that each
    prototype's column carries ``1 / K`` of the mass, then each row ``1 / B``; returned times ``B``, so every
    row is a distribution. Computed in log space (DINOv2's constant factors cancel), so no temperature
    overflows or underflows it."""
    log_q = logits.float() / temperature
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    for _ in range(iterations):
        peak = log_q.max(dim=0, keepdim=True).values
        if distributed:
            torch.distributed.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        mass = (log_q - peak).exp().sum(dim=0, keepdim=True)
        if distributed:
            torch.distributed.all_reduce(mass)
        log_q = log_q - peak - mass.log()  # every prototype's column: equal mass over all processes
        log_q = log_q.log_softmax(dim=1)  # every row: a distribution
    return log_q.exp()


def dino_loss(student_logits: Tensor, teacher: Tensor, n_views: int, student_temp: float) -> Tensor:
    """Mean cross-entropy over the pairs (teacher view ``t``, student view ``s``) with ``s != t``.

    ``student_logits``: ``[V * B, K]``, views stacked view-major (the global views first);
    ``teacher``: ``[G * B, K]`` target probabilities of the ``G`` global views, in the same order.
    """
    logp = F.log_softmax(student_logits / student_temp, dim=-1).chunk(n_views)
    targets = teacher.chunk(len(teacher) // len(logp[0]))
    terms = [
        -(t * lp).sum(dim=-1).mean() for i, t in enumerate(targets) for j, lp in enumerate(logp) if i != j
    ]
    return torch.stack(terms).mean()


def ibot_loss(student_logits: Tensor, teacher: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """Cross-entropy on masked patches: ``student_logits`` and ``teacher`` are ``[M, K]`` rows of the
    ``M = masks.sum()`` masked positions of ``masks [N, P]`` (row-major); each image with a mask counts once."""
    per_token = -(teacher * F.log_softmax(student_logits / student_temp, dim=-1)).sum(dim=-1)
    counts = masks.sum(dim=1, keepdim=True).clamp(min=1)
    weights = (1.0 / counts).expand_as(masks)[masks]
    images = (masks.sum(dim=1) > 0).sum().clamp(min=1)
    return (per_token * weights).sum() / images


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """``-mean_i log ||x_i - x_nn(i)||`` over L2-normalised rows ``x`` (nearest neighbour by cosine)."""
    x = F.normalize(features, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
