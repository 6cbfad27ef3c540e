"""What a run logs: the log window's averages, ``metrics.jsonl`` (cut back on resume), tracker
hyperparameters and ``loss.png``."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from align.io import atomic_path, read_jsonl

__all__ = ["LogWindow", "plot_loss", "tracker_config", "truncate_metrics"]

logger = logging.getLogger(__name__)


class LogWindow:
    """Sums of loss and method metrics since the last log row (saved in checkpoints)."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        state = state or {}
        self.loss, self.n = float(state.get("loss", 0.0)), int(state.get("n", 0))
        self.metrics: dict[str, float] = dict(state.get("metrics", {}))

    def add(self, loss: float, metrics: Mapping[str, Any]) -> None:
        """Count one micro-batch's loss and metrics."""
        self.loss += loss
        self.n += 1
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)

    def state(self) -> dict[str, Any]:
        """The sums as JSON-able data for a checkpoint (``LogWindow(state)`` restores them)."""
        return {"loss": self.loss, "n": self.n, "metrics": self.metrics}

    def row(self, accelerator: Accelerator) -> dict[str, float]:
        """The window's mean loss and metrics (metrics averaged over processes); the window restarts."""
        keys = sorted(self.metrics)
        local = torch.tensor([self.metrics[k] / max(1, self.n) for k in keys], dtype=torch.float64)
        if keys and accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="mean").cpu()
        row = {"loss": self.loss / max(1, self.n)}
        row.update({k: float(v) for k, v in zip(keys, local.tolist(), strict=True)})
        self.loss, self.n, self.metrics = 0.0, 0, {}
        return row


def truncate_metrics(path: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """Keep the rows of a metrics file up to ``step`` (a resumed run drops the lost tail); return them.

    A torn last line (a kill while appending) is dropped with a warning; a malformed line elsewhere
    is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # the run was killed while appending it
            logger.warning("%s:%d: dropping a torn last line %.60r", path, len(lines), lines[-1])
            lines.pop()
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    rows = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def tracker_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config dict to scalar values (lists and None as strings) for tracker hparams."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def plot_loss(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "training loss") -> None:
    """Write a PNG of loss (and learning rate, when logged) against step, atomically."""
    from align.plots import pyplot, save_figure

    plt = pyplot()

    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in rows if isinstance(r.get("lr"), (int, float))]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="tab:orange", alpha=0.6, label="lr")
        twin.set_ylabel("learning rate")
    fig.tight_layout()
    save_figure(fig, path)
