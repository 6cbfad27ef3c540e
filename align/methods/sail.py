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

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from torch import Tensor, nn

from align.heads import SailTextHead, SailTokenHead
from align.losses import LogitScale, gather_features, sigmoid_loss
from align.methods.common import (
    DataConfig,
    EvalConfig,
    PairedCaches,
    prepare_caches,
    run_recipe,
    training_record,
    zero_shot_scores,
)
from align.recipes import load_config
from align.rundir import OutDir
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


class SailMethod:
    """SAIL as an ``align.train.method.Method`` over paired embedding caches."""

    def __init__(self, recipe: SailRecipe, out_dir: str | os.PathLike) -> None:
        self.recipe, self.out_dir = recipe, Path(out_dir)
        image, texts = prepare_caches(recipe.vision, recipe.text, recipe.data, out_dir, "concat", "sentence")
        spec = image.manifest["encoder"]
        if spec.get("kind") not in SAIL_BACKBONES:
            raise ValueError(
                f"{image.path}: SAIL takes CLS and patch tokens of a DINOv2 backbone ({SAIL_BACKBONES}); "
                f"the cache was made with a '{spec.get('kind')}' model ({spec.get('source')})"
            )
        self.backbone_spec, self.text_spec = spec, texts[0].manifest["encoder"]
        self.dataset = PairedCaches(image, texts)
        self.scores: dict[str, Any] = {}

    def head_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        h = self.recipe.head
        kind = "sail_glu" if h.kind == "glu" else "sail_linear"
        common = {"kind": kind, "out_dim": h.out_dim, "width_factor": h.width_factor}
        image = {
            **common,
            "in_dim": self.backbone_spec["embed_dim"],
            "num_prefix_tokens": self.backbone_spec["num_prefix_tokens"],
        }
        return image, {**common, "in_dim": self.text_spec["embed_dim"]}

    def build_model(self, cfg: TrainConfig) -> SailModel:
        image, text = self.head_configs()
        lc = self.recipe.loss
        return SailModel(
            SailTokenHead(image),
            SailTextHead(text),
            LogitScale(lc.init_scale, lc.init_bias, lc.min_scale, lc.max_scale),
        )

    def train_dataset(self) -> PairedCaches:
        return self.dataset

    def collate(self, indices: list[int]) -> dict[str, Any]:
        return self.dataset.collate(indices)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, texts, scale, bias = model(batch["image"], batch["texts"])
        image, texts = gather_features(image), [gather_features(t) for t in texts]
        loss = sigmoid_loss(
            image, texts[0], scale, bias, chunk_size=self.recipe.loss.chunk_size, extra_text=texts[1:]
        )
        return loss, {"logit_scale": scale.detach(), "logit_bias": bias.detach()}

    def after_step(self, model: SailModel) -> None:
        model.logit.clamp_()

    def aligned(self, model: SailModel) -> Any:
        """The trained heads on the (re-loaded) frozen encoders, as an ``AlignedEncoder``."""
        from align.artifact import AlignedEncoder
        from align.encoders.registry import load_text_encoder, load_vision_encoder

        scale, bias = (v.detach() for v in model.logit())
        return AlignedEncoder(
            load_vision_encoder(self.recipe.vision),
            load_text_encoder(self.recipe.text),
            copy.deepcopy(model.image_head).cpu().eval(),
            copy.deepcopy(model.text_head).cpu().eval(),
            method="sail",
            logit_scale=float(scale),
            logit_bias=float(bias),
        )

    def evaluate(self, model: SailModel) -> dict[str, Any]:
        self.scores = zero_shot_scores(self.aligned(model), self.recipe.eval, self.recipe.data)
        return self.scores

    def save(self, model: SailModel, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        from align.artifact import save_aligned

        record = training_record(self.recipe, self.dataset, out_dir)
        save_aligned(out_dir / "artifact", self.aligned(model), training=record, metrics=self.scores)


def run(
    config: str | os.PathLike | None,
    overrides: list[str],
    out_dir: str | os.PathLike,
    resume: bool | str = "auto",
    overwrite: bool = False,
) -> Path:
    """Train SAIL from a recipe file into ``out_dir``; returns the artifact directory."""
    recipe = load_recipe(config, overrides)
    with OutDir(out_dir, "align sail", overwrite, collective=True):  # before its caches are written into out_dir
        run_recipe(SailMethod(recipe, out_dir), recipe, out_dir, resume, overwrite=overwrite)
    return Path(out_dir) / "artifact"
