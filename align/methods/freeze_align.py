"""freeze_align: token projectors on frozen DINOv2 and sentence-encoder tokens, trained with InfoNCE.

The recipe, top to bottom:

* encoders: a vision backbone (``vision``; final-layer tokens, CLS first) and a text encoder (``text``;
  per-token states), both frozen, encoded once into memory-mapped token caches;
* heads: vision = a shared patch projector over patch tokens, averaged, plus a separate CLS projector,
  summed and L2-normalized; text = a token projector, attention-mask mean, then the global head
  ``Linear -> GELU -> Linear -> Dropout`` with residual and LayerNorm, L2-normalized
  (``TokenProjector = LayerNorm -> Dropout(0.1) -> Linear + [Linear -> GELU -> Linear]``, out 1024);
* loss: symmetric InfoNCE over the batch gathered from every process, learnable temperature (init 0.07,
  clamped to [0.001, 0.5] after every step);
* loop: AdamW lr 1e-3, wd 0.02 (not on the temperature, norms or biases), warmup then cosine;
* result: an ``AlignedEncoder`` artifact in ``OUT/artifact`` whose per-patch tokens are
  ``patch_proj(patch_i) + cls_proj(CLS)``, with zero-shot scores. Concept-balanced data comes from
  ``mllm-swap curate`` (:mod:`align.data.curate`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from torch import Tensor, nn

from align.data.cache_read import EmbeddingCache
from align.heads import FreezeAlignTextHead, FreezeAlignTokenHead
from align.losses import Temperature, gather_features, infonce_loss
from align.methods.evaluation import EvalConfig
from align.methods.frozen_pairs import DataConfig, FrozenPairsMethod
from align.recipes import load_config
from align.train.config import TrainConfig

TRAIN_DEFAULTS = {
    "optimizer": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.02,
    "betas": [0.9, 0.999],
    "warmup": 0.05,
    "schedule": "cosine",
    "batch_size": 4096,
    "grad_clip": 1.0,
}


@dataclasses.dataclass
class FreezeAlignHeadConfig:
    out_dim: int = 1024
    dropout: float = 0.1


@dataclasses.dataclass
class FreezeAlignLossConfig:
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5


@dataclasses.dataclass
class FreezeAlignRecipe:
    """A freeze_align recipe file (YAML) with ``--set`` overrides; see ``recipes/freeze_align_*.yaml``."""

    vision: str = "facebook/dinov2-large"
    text: str = "sentence-transformers/all-roberta-large-v1"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    head: FreezeAlignHeadConfig = dataclasses.field(default_factory=FreezeAlignHeadConfig)
    loss: FreezeAlignLossConfig = dataclasses.field(default_factory=FreezeAlignLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=1.0, **TRAIN_DEFAULTS))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> FreezeAlignRecipe:
    """A :class:`FreezeAlignRecipe` from YAML + overrides, on top of the paper's training defaults."""
    return load_config(FreezeAlignRecipe, path, overrides, base={"train": TRAIN_DEFAULTS})


class FreezeAlignModel(nn.Module):
    """The trainable part: vision token head, text head and temperature."""

    def __init__(
        self, image_head: FreezeAlignTokenHead, text_head: FreezeAlignTextHead, temperature: Temperature
    ):
        super().__init__()
        self.image_head, self.text_head, self.temperature = image_head, text_head, temperature

    def forward(
        self, image: tuple[Tensor, Tensor], text: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Cached ``(tokens, mask)`` of both sides -> global embeddings (unnormalized) and ``1 / tau``."""
        tokens, _ = image
        return self.image_head.pool(tokens), self.text_head(*text), self.temperature()


class FreezeAlignMethod(FrozenPairsMethod):
    """freeze_align as an ``align.train.loop.Method`` over paired token caches (the first caption column)."""

    method, image_pool, text_pool, positives = "freeze_align", "tokens", "tokens", 1

    def check_backbone(self, image: EmbeddingCache, spec: dict[str, Any]) -> None:
        if spec.get("num_prefix_tokens", 0) < 1:
            raise ValueError(f"{image.path}: freeze_align needs a CLS token; '{spec.get('source')}' has none")

    def head_settings(self) -> dict[str, Any]:
        h = self.recipe.head
        return {"kind": "freeze_align", "out_dim": h.out_dim, "dropout": h.dropout}

    def build_model(self, cfg: TrainConfig) -> FreezeAlignModel:
        image, text = self.head_configs()
        lc = self.recipe.loss
        temperature = Temperature(lc.init_temperature, lc.min_temperature, lc.max_temperature)
        return FreezeAlignModel(FreezeAlignTokenHead(image), FreezeAlignTextHead(text), temperature)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, text, scale = model(batch["image"], batch["texts"][0])
        loss = infonce_loss(gather_features(image), gather_features(text), scale)
        return loss, {"temperature": 1.0 / scale.detach()}

    def after_step(self, model: FreezeAlignModel) -> None:
        model.temperature.clamp_()

    def logit_params(self, model: FreezeAlignModel) -> dict[str, float]:
        return {"logit_scale": float(model.temperature().detach())}
