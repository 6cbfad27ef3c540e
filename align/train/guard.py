"""The loss guard: which losses and weights are bad (:class:`LossGuard`), and how a run that went bad
stops (:func:`stop_error`: the checkpoint that gave the bad loss is set aside, the last good one named).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from align.errors import UserError
from align.train.accelerator import unwrap
from align.train.checkpoints import list_checkpoints, reject_checkpoint
from align.train.method import Method

__all__ = [
    "EXPLODE_FACTOR",
    "EXPLODE_WINDOW",
    "LossGuard",
    "NonFiniteLossError",
    "stop_error",
    "weights_finite",
]

EXPLODE_FACTOR = 100.0  # see LossGuard
EXPLODE_WINDOW = 20


class NonFiniteLossError(UserError):
    """The loss became NaN/inf or exploded, or the weights did; the run stopped and kept its last good
    checkpoint (the rule: :class:`align.train.guard.LossGuard`)."""


class LossGuard:
    """Judges each step's loss, and through it the weights that produced it.

    A loss is bad when it is NaN/inf, or when it explodes: ``|loss| > EXPLODE_FACTOR * max(|m|, 1)``
    where ``m`` is the median of the last ``EXPLODE_WINDOW`` good micro-batch losses (the window travels in
    checkpoints, so a resumed run judges as an uninterrupted one would). A checkpoint is good only when
    its weights are finite and the first loss computed with them (the next step's, or the final check's)
    is good.
    """

    def __init__(self, window: Sequence[float] | None = None) -> None:
        self.window = [float(v) for v in (window or [])][-EXPLODE_WINDOW:]

    def problem(self, losses: torch.Tensor) -> str | None:
        """What is wrong with the (gathered) losses of one micro-batch, or None."""
        values = losses.detach().float().flatten()
        if not torch.isfinite(values).all():
            return f"non-finite loss {values.tolist()}"
        if self.window:
            limit = EXPLODE_FACTOR * max(abs(float(np.median(self.window))), 1.0)
            worst = float(values.abs().max())
            if worst > limit:
                return (
                    f"exploding loss {worst:.4g} (more than {EXPLODE_FACTOR:g} x the recent median "
                    f"{float(np.median(self.window)):.4g})"
                )
        return None

    def add(self, loss: float) -> None:
        """Count a good micro-batch loss in the window."""
        self.window = [*self.window, float(loss)][-EXPLODE_WINDOW:]

    def final_problem(
        self, method: Method, model: nn.Module, batch: Any, accelerator: Accelerator
    ) -> str | None:
        """Judge the final weights before they are saved: finite, and a good loss on the last batch."""
        if not weights_finite(unwrap(model)):
            return "non-finite weights"
        if batch is None:  # no step ran in this session
            return None
        counters = method.state_dict() if hasattr(method, "state_dict") else None
        model.eval()
        with torch.no_grad():
            loss, _ = method.loss(model, batch)
        model.train()
        if counters is not None:  # the check is not training: counters stay as they were
            method.load_state_dict(counters)
        return self.problem(accelerator.gather(loss.detach().float().reshape(1)))


def weights_finite(model: nn.Module) -> bool:
    """Whether every trainable parameter of ``model`` is finite."""
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def stop_error(
    problem: str, out_dir: Path, bad: Path | None, good: Path | None, is_main: bool
) -> NonFiniteLossError:
    """The error ending a run that went bad; a checkpoint whose weights gave the bad loss is set aside."""
    if bad is not None and is_main and bad.is_dir():
        reject_checkpoint(bad)
    if good is None:
        remaining = list_checkpoints(out_dir / "checkpoints")
        good = remaining[-1][1] if remaining else None
    return NonFiniteLossError(
        f"{problem}; stopped without saving the final weights. Last good checkpoint: {good or 'none'}"
        " (resume from it with a lower train.lr, or see the loss guard in align.train.guard.LossGuard)"
    )
