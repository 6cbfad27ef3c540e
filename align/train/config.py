"""The settings of a training run (``TrainConfig``): the ``train:`` section of every recipe."""

from __future__ import annotations

import dataclasses
from typing import Literal

from align.recipes import ConfigError

__all__ = ["FLOAT32_MAX", "TrainConfig"]

# The largest float32: a learning rate above it overflows in the optimizer's float32 arithmetic.
FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass
class TrainConfig:
    """Settings of the shared training loop (``align.train.loop.train``).

    Exactly one of ``steps`` (optimizer steps) or ``epochs`` (passes over the data) must be set.
    ``batch_size`` is per process and per micro-batch: one optimizer step sees
    ``batch_size * grad_accum * num_processes`` samples. ``warmup`` is a number of steps (int) or a
    fraction of all steps (float in [0, 1]). ``grad_clip`` of ``None`` or 0 disables clipping;
    ``save_every`` 0 disables periodic checkpoints; ``keep_checkpoints`` is how many of the newest
    checkpoints are kept. ``gradient_checkpointing`` is read by the method when it builds its model.
    ``report_to``: ``jsonl`` (``metrics.jsonl``), ``tensorboard``, ``wandb`` (accelerate's trackers).
    """

    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "lion"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int | float = 0
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    num_workers: int = 0
    gradient_checkpointing: bool = False
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = dataclasses.field(
        default_factory=lambda: ["jsonl", "tensorboard"]
    )

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"set exactly one of 'steps' or 'epochs' (found steps={self.steps}, epochs={self.epochs})"
            )
        checks = {
            "steps": self.steps is None or self.steps > 0,
            "epochs": self.epochs is None or self.epochs > 0,
            "batch_size": self.batch_size > 0,
            "grad_accum": self.grad_accum > 0,
            "lr": 0 <= self.lr <= FLOAT32_MAX,
            "weight_decay": 0 <= self.weight_decay <= FLOAT32_MAX,
            "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
            "warmup": self.warmup >= 0 and (isinstance(self.warmup, int) or self.warmup <= 1.0),
            "grad_clip": self.grad_clip is None or self.grad_clip >= 0,
            "save_every": self.save_every >= 0,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "log_every": self.log_every > 0,
            "num_workers": self.num_workers >= 0,
        }
        expected = {
            "warmup": "an int number of steps >= 0 or a float fraction in [0, 1]",
            "min_lr_ratio": "a value in [0, 1]",
            "lr": f"a finite number in [0, {FLOAT32_MAX:.4g}] (float32)",
            "weight_decay": f"a finite number in [0, {FLOAT32_MAX:.4g}] (float32)",
            "steps": "> 0",
            "epochs": "> 0",
            "batch_size": "> 0",
            "grad_accum": "> 0",
            "keep_checkpoints": ">= 1",
            "log_every": "> 0",
        }
        for key, ok in checks.items():
            if not ok:
                want = expected.get(key, ">= 0")
                raise ConfigError(f"'{key}' must be {want}, found {getattr(self, key)!r}", key=key)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps`` steps."""
        if isinstance(self.warmup, float):
            return int(round(self.warmup * total_steps))
        return int(self.warmup)
