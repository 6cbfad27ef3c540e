"""Optimization pieces of the training loop: parameter groups, optimizers and lr schedules.

Schedules: linear warmup, then cosine, linear or constant decay.

The multiplier for optimizer step ``s`` (0-based: the factor applied to the update of step
``s + 1``) follows the conventions of ``transformers.get_*_schedule_with_warmup``:

* warmup ``w``: ``s / w`` for ``s < w``;
* cosine: ``m + (1 - m) * 0.5 * (1 + cos(pi * p))`` with ``p = (s - w) / (T - w)``;
* linear: ``m + (1 - m) * (1 - p)``;
* constant: 1,

where ``T`` is the total number of optimizer steps and ``m`` is ``min_lr_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "DEFAULT_NO_DECAY",
    "build_optimizer",
    "build_scheduler",
    "check_param_groups",
    "default_param_groups",
    "lr_multiplier",
]

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(
    step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float = 0.0
) -> float:
    """Factor on each parameter group's base lr at optimizer step ``step`` (0-based)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, found {schedule!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
) -> LambdaLR:
    """A ``LambdaLR`` stepping once per optimizer step; per-group learning rates are scaled alike."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, found {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup steps must be in [0, total_steps={total_steps}], found {warmup_steps}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, found {schedule!r}")

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps, warmup_steps, schedule, min_lr_ratio)

    return LambdaLR(optimizer, factor)


# Parameter names (substrings) that never get weight decay: temperatures, biases of the sigmoid
# loss, trainable kernel parameters, and the usual embeddings of position/class tokens.
DEFAULT_NO_DECAY = ("logit_scale", "logit_bias", "temperature", "gamma", "coef0", "bandwidth")

_NORM_TYPES = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def default_param_groups(
    model: nn.Module, weight_decay: float, no_decay: Sequence[str] = DEFAULT_NO_DECAY
) -> list[dict[str, Any]]:
    """Two optimizer groups over the trainable parameters of ``model``.

    No weight decay for: biases, parameters of normalization layers (any module whose class is a
    torch norm or whose class name ends in ``Norm``), every parameter with fewer than 2 dimensions,
    and parameters whose name contains one of ``no_decay``. Everything else gets ``weight_decay``.
    Empty groups are left out. Parameters shared between modules are listed once.
    """
    norm_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm"):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = (
            param.ndim < 2
            or name.endswith("bias")
            or id(param) in norm_params
            or any(token in name for token in no_decay)
        )
        (plain if skip else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    groups: Iterable[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float,
    betas: Sequence[float],
    eps: float,
) -> torch.optim.Optimizer:
    """``adamw`` (torch) or ``lion`` (timm's maintained Lion) over ``groups``; group keys win."""
    groups = list(groups)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if name == "lion":
        from timm.optim import Lion

        return Lion(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'lion', found {name!r}")


def check_param_groups(groups: Iterable[dict[str, Any]], model: nn.Module) -> list[dict[str, Any]]:
    """Validate optimizer groups: every trainable parameter of ``model`` exactly once, none frozen."""
    groups = [dict(g) for g in groups]
    names = {id(p): n for n, p in model.named_parameters()}
    seen: set[int] = set()
    for i, group in enumerate(groups):
        group["params"] = list(group["params"])
        for p in group["params"]:
            label = names.get(id(p), f"<group {i} parameter not in the model>")
            if id(p) in seen:
                raise ValueError(f"param_groups: parameter '{label}' appears in more than one group")
            if not p.requires_grad:
                raise ValueError(f"param_groups: parameter '{label}' is frozen (requires_grad=False)")
            seen.add(id(p))
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"param_groups: trainable parameters missing from every group: {missing[:8]}")
    if not seen:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    return groups
