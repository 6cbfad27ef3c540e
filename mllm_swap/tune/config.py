"""One tuning stage's settings (``TuneConfig``): which model, which data, what trains, at which learning rates."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from align.errors import UserError
from align.train.config import TrainConfig

STAGES = ("connector", "lora", "full")
QLORA_MESSAGE = (
    "QLoRA needs a CUDA GPU with bitsandbytes: 4-bit quantized training does not run on this machine "
    "({why}); set qlora: false (plain LoRA runs on CPU) or run on a CUDA GPU"
)


@dataclass
class ShapesData:
    """Generate the shapes world (train conversations) when no ``data`` file is given."""

    n: int = 2000
    seed: int = 0


@dataclass
class TuneConfig:
    """One tuning stage: which model, which data, what trains, at which learning rates."""

    model: str = "tiny-llava"  # a directory, a hub id, or a tiny MLLM id
    data: Path | None = None  # LLaVA conversation JSON
    image_folder: Path | None = None
    shapes: ShapesData | None = None
    stage: Literal["connector", "lora", "full"] = "lora"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    # peft modules_to_save: full copies trained and saved with the adapter (e.g. lm_head when the LLM was
    # never pretrained, as in the tiny default; LLaVA-1.5 itself uses none)
    modules_to_save: list[str] = field(default_factory=list)
    connector_lr: float | None = None  # None: train.lr
    tower_lr: float | None = None  # None: train.lr (tower and head)
    unfreeze_tower: bool = False
    unfreeze_head: bool = False
    qlora: bool = False
    init_trainables: Path | None = None  # a previous stage's non_lora_trainables.safetensors
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_length: int = 2048
    image_aspect_ratio: Literal["pad", "none"] = "pad"
    on_error: Literal["skip", "raise"] = "skip"
    group_by_length: bool = True
    deepspeed: Path | None = None  # DeepSpeed JSON, used when launched without an accelerate config
    # tower_cache: an image token cache of the frozen tower's tokens (`mllm-swap encode --encoder E --data D
    # --pool tokens --layer L --prefix drop --dtype fp32`, E the encoder swapped in, L the model's
    # vision_feature_layer; keep the prefix tokens when the swap fed them): the stage reads them instead of
    # running the tower every step (stage 1 speed-up); refused unless layer, token count and model fingerprint
    # match; the tower must stay frozen
    tower_cache: Path | None = None
    eval_vqa: str | None = None  # a vqa_test.jsonl scored at the end, or "shapes" (the generated world's)
    eval_limit: int | None = 200
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))

    def __post_init__(self) -> None:
        if self.qlora and self.stage != "lora":
            raise ValueError(f"qlora applies to the 'lora' stage only (stage is {self.stage!r})")
        if self.modules_to_save and self.stage != "lora":
            raise ValueError(f"modules_to_save applies to the 'lora' stage only (stage is {self.stage!r})")
        if self.unfreeze_tower and self.unfreeze_head:
            raise ValueError("set unfreeze_tower (whole tower) or unfreeze_head (head only), not both")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(
                f"lora_r must be >= 1, lora_alpha > 0 and lora_dropout in [0, 1); found "
                f"r={self.lora_r}, alpha={self.lora_alpha}, dropout={self.lora_dropout}"
            )
        if self.tower_cache is not None and (self.unfreeze_tower or self.unfreeze_head):
            raise ValueError(
                "tower_cache replaces a frozen tower's forward pass: unset unfreeze_tower/unfreeze_head"
            )
        if self.data is None and self.shapes is None:
            raise ValueError("set 'data' (LLaVA conversation JSON) or 'shapes' (generate the shapes world)")
        if self.eval_vqa == "shapes" and self.shapes is None:
            raise ValueError("eval_vqa: 'shapes' needs the 'shapes' section (the generated world)")


def check_qlora_available() -> None:
    """Raise before any loading when 4-bit QLoRA cannot run here (no CUDA GPU or no bitsandbytes)."""
    if not torch.cuda.is_available():
        raise UserError(QLORA_MESSAGE.format(why="no CUDA GPU is visible"))
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(QLORA_MESSAGE.format(why="bitsandbytes is not installed")) from None
