"""SAIL: align frozen DINOv2 and a frozen sentence encoder with GLU heads and a sigmoid loss.

The recipe, top to bottom:

* encoders: a DINOv2 backbone (``vision``; features ``concat = [CLS ; mean(patches)]`` of its final
  tokens) and a sentence encoder (``text``; the model's own pooling), both frozen, encoded once into
  memory-mapped caches;
* heads: ``LayerNorm -> GLU`` per modality (width 8x, ReLU6 gate, out 1024, Xavier, no residual) or a
  linear head for alignment probing (``head.kind``);
* loss: sigmoid loss over all N^2 pairs of the (cross-process) batch with a learnable log-temperature
  (init ln 20, clamped to [0, ln 100] after every step) and bias (init -10); extra caption columns are
  extra positives, averaged jointly; ``loss.chunk_size`` keeps memory linear in N;
* loop: Lion (beta 0.9, 0.99), lr 1e-5, wd 1e-4, 10% warmup then cosine, batch 32768
  (``align.train.loop.train``);
* result: an ``AlignedEncoder`` artifact in ``OUT/artifact`` whose per-patch tokens are the image head on
  ``[CLS ; patch_i]`` (trained on ``[CLS ; mean]``; the drift is measured and stored), with zero-shot scores.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Literal

from torch import Tensor, nn

from align.data.cache_read import EmbeddingCache
from align.heads import SailTextHead, SailTokenHead
from align.losses import LogitScale, gather_features, sigmoid_loss
from align.methods.evaluation import EvalConfig
from align.methods.frozen_pairs import DataConfig, FrozenPairsMethod
from align.recipes import load_config
from align.train.config import TrainConfig

SAIL_BACKBONES = ("dinov2", "dinov2_with_registers")
TRAIN_DEFAULTS = {
    "optimizer": "lion",
    "lr": 1e-5,
    "weight_decay": 1e-4,
    "betas": [0.9, 0.99],
    "warmup": 0.1,
    "schedule": "cosine",
    "batch_size": 32768,
    "grad_clip": None,
}


@dataclasses.dataclass
class SailHeadConfig:
    kind: Literal["glu", "linear"] = "glu"
    out_dim: int = 1024
    width_factor: int = 8


@dataclasses.dataclass
class SailLossConfig:
    init_scale: float = 20.0
    init_bias: float = -10.0
    min_scale: float = 1.0
    max_scale: float = 100.0
    chunk_size: int | None = None


@dataclasses.dataclass
class SailRecipe:
    """A SAIL recipe file (YAML) with ``--set`` overrides; see ``recipes/sail_*.yaml``."""

    vision: str = "facebook/dinov2-large"
    text: str = "nvidia/NV-Embed-v2"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    head: SailHeadConfig = dataclasses.field(default_factory=SailHeadConfig)
    loss: SailLossConfig = dataclasses.field(default_factory=SailLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=1.0, **TRAIN_DEFAULTS))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> SailRecipe:
    """A :class:`SailRecipe` from YAML + overrides, on top of the paper's training defaults."""
    return load_config(SailRecipe, path, overrides, base={"train": TRAIN_DEFAULTS})


class SailModel(nn.Module):
    """The trainable part: image head, text head, logit scale and bias."""

    def __init__(self, image_head: SailTokenHead, text_head: SailTextHead, logit: LogitScale) -> None:
        super().__init__()
        self.image_head, self.text_head, self.logit = image_head, text_head, logit

    def forward(self, image: Tensor, texts: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """Cached ``concat`` features and sentence embeddings -> joint-space embeddings, scale, bias."""
        scale, bias = self.logit()
        return self.image_head.head(image), [self.text_head(t) for t in texts], scale, bias


class SailMethod(FrozenPairsMethod):
    """SAIL as an ``align.train.loop.Method`` over paired embedding caches (all caption columns)."""

    method, image_pool, text_pool = "sail", "concat", "sentence"

    def check_backbone(self, image: EmbeddingCache, spec: dict[str, Any]) -> None:
        if spec.get("kind") not in SAIL_BACKBONES:
            raise ValueError(
                f"{image.path}: SAIL takes CLS and patch tokens of a DINOv2 backbone ({SAIL_BACKBONES}); "
                f"the cache was made with a '{spec.get('kind')}' model ({spec.get('source')})"
            )

    def head_settings(self) -> dict[str, Any]:
        h = self.recipe.head
        kind = "sail_glu" if h.kind == "glu" else "sail_linear"
        return {"kind": kind, "out_dim": h.out_dim, "width_factor": h.width_factor}

    def build_model(self, cfg: TrainConfig) -> SailModel:
        image, text = self.head_configs()
        lc = self.recipe.loss
        return SailModel(
            SailTokenHead(image),
            SailTextHead(text),
            LogitScale(lc.init_scale, lc.init_bias, lc.min_scale, lc.max_scale),
        )

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, texts, scale, bias = model(batch["image"], batch["texts"])
        image, texts = gather_features(image), [gather_features(t) for t in texts]
        loss = sigmoid_loss(
            image, texts[0], scale, bias, chunk_size=self.recipe.loss.chunk_size, extra_text=texts[1:]
        )
        return loss, {"logit_scale": scale.detach(), "logit_bias": bias.detach()}

    def after_step(self, model: SailModel) -> None:
        model.logit.clamp_()

    def logit_params(self, model: SailModel) -> dict[str, float]:
        scale, bias = (v.detach() for v in model.logit())
        return {"logit_scale": float(scale), "logit_bias": float(bias)}
