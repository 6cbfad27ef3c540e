"""accelerate for one run: a fresh ``Accelerator`` (precision, gradient accumulation, trackers, process
group backend), the DeepSpeed config's ``auto`` values, and ``unwrap`` to reach the trained module."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    extract_model_from_parallel,
    is_tensorboard_available,
    is_wandb_available,
)
from torch import nn

from align.distributed import fill_deepspeed_autos, launch_backend
from align.errors import UserError
from align.train.config import TrainConfig

__all__ = ["configure_deepspeed", "make_accelerator", "unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DeepSpeed/compile wrappers (the one ``build_model`` returned)."""
    return extract_model_from_parallel(model)


def _wandb_tracker(out_dir: Path) -> Any:
    """accelerate's wandb tracker: project ``$WANDB_PROJECT`` (default ``mllm-swap``), run named after
    ``out_dir``, files under ``out_dir/wandb`` (``WANDB_MODE=offline`` keeps them local for `wandb sync`)."""
    if not is_wandb_available():
        raise UserError(
            "train.report_to lists 'wandb' but the wandb package is not installed (pip install wandb)"
        )
    from accelerate.tracking import WandBTracker

    project = os.environ.get("WANDB_PROJECT", "mllm-swap")
    return WandBTracker(project, dir=str(out_dir), name=out_dir.resolve().name)


def make_accelerator(cfg: TrainConfig, out_dir: Path, extra: Mapping[str, Any] | None) -> Accelerator:
    """A fresh ``Accelerator`` for a run of ``cfg`` writing to ``out_dir``; ``extra`` kwargs win.

    Each run gets a fresh accelerate state, so several runs can follow one another in a process.
    """
    AcceleratorState._reset_state()
    GradientState._reset_state()
    use_tb = "tensorboard" in cfg.report_to and is_tensorboard_available()
    trackers: list[Any] = ["tensorboard"] if use_tb else []
    if "wandb" in cfg.report_to:
        trackers.append(_wandb_tracker(out_dir))
    kwargs: dict[str, Any] = {
        "mixed_precision": cfg.mixed_precision,
        "gradient_accumulation_plugin": GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        "step_scheduler_with_optimizer": False,
        "log_with": trackers or None,
        "project_config": ProjectConfiguration(
            project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")
        ),
    }
    backend = launch_backend()
    if backend:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend)]
    kwargs.update(extra or {})
    return Accelerator(**kwargs)


def configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig, model: nn.Module) -> None:
    """Fill the DeepSpeed config's ``auto`` clipping and sizes (train config, model width); refuse its
    own optimizer; give parameters added after a ZeRO-Init load the training dtype."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    conf = plugin.deepspeed_config
    fill_deepspeed_autos(conf, model)
    for section in ("optimizer", "scheduler"):
        if section in conf:
            raise ValueError(
                f"DeepSpeed config: remove the '{section}' section; the loop builds the optimizer and "
                "lr schedule from the train config (train.optimizer, train.lr, train.schedule)"
            )
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = float(cfg.grad_clip or 0.0)
    _cast_like_zero_init(conf, model)


def _cast_like_zero_init(conf: Mapping[str, Any], model: nn.Module) -> None:
    """Give parameters created after a ZeRO-Init load (LoRA, peft's ``modules_to_save`` copies) the
    16-bit training dtype.

    DeepSpeed casts a model to bf16/fp16 itself, except one already partitioned at load (ZeRO-3 with
    ``zero3_init_flag``): there later parameters would keep fp32 beside bf16 ones, which its flat
    ZeRO-3 buffers refuse (``defragment``: one dtype).
    """
    if conf.get("zero_optimization", {}).get("stage") != 3:
        return
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    dtypes = [dtype for key, dtype in half.items() if str(conf.get(key, {}).get("enabled")).lower() == "true"]
    params = list(model.parameters())
    if not dtypes or not any(hasattr(p, "ds_id") for p in params):
        return
    for param in params:
        if not hasattr(param, "ds_id") and param.is_floating_point():
            param.data = param.data.to(dtypes[0])
