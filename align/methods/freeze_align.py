"""freeze-align: token projectors on frozen DINOv2 and sentence-encoder tokens, trained with InfoNCE.

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

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from align.heads import FreezeAlignTextHead, FreezeAlignTokenHead
from align.losses import Temperature, gather_features, infonce_loss
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
class ProjectorHeadConfig:
    out_dim: int = 1024
    dropout: float = 0.1


@dataclasses.dataclass
class ProjectorLossConfig:
    init_temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5


@dataclasses.dataclass
class ProjectorRecipe:
    """A freeze-align recipe file (YAML) with ``--set`` overrides; see ``recipes/freeze_align_*.yaml``."""

    vision: str = "facebook/dinov2-large"
    text: str = "sentence-transformers/all-roberta-large-v1"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    head: ProjectorHeadConfig = dataclasses.field(default_factory=ProjectorHeadConfig)
    loss: ProjectorLossConfig = dataclasses.field(default_factory=ProjectorLossConfig)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(epochs=1.0, **TRAIN_DEFAULTS))
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> ProjectorRecipe:
    """A :class:`ProjectorRecipe` from YAML + overrides, on top of the paper's training defaults."""
    return load_config(ProjectorRecipe, path, overrides, base={"train": TRAIN_DEFAULTS})


class ProjectorModel(nn.Module):
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


class ProjectorMethod:
    """freeze-align as an ``align.train.method.Method`` over paired token caches."""

    def __init__(self, recipe: ProjectorRecipe, out_dir: str | os.PathLike) -> None:
        self.recipe, self.out_dir = recipe, Path(out_dir)
        data = dataclasses.replace(recipe.data, captions=recipe.data.captions[:1])
        data.text_caches = data.text_caches[:1]
        image, texts = prepare_caches(recipe.vision, recipe.text, data, out_dir, "tokens", "tokens")
        spec = image.manifest["encoder"]
        if spec.get("num_prefix_tokens", 0) < 1:
            raise ValueError(f"{image.path}: freeze-align needs a CLS token; '{spec.get('source')}' has none")
        self.backbone_spec, self.text_spec = spec, texts[0].manifest["encoder"]
        self.dataset = PairedCaches(image, texts)
        self.scores: dict[str, Any] = {}

    def head_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        h = self.recipe.head
        common = {"kind": "freeze_align", "out_dim": h.out_dim, "dropout": h.dropout}
        image = {
            **common,
            "in_dim": self.backbone_spec["embed_dim"],
            "num_prefix_tokens": self.backbone_spec["num_prefix_tokens"],
        }
        return image, {**common, "in_dim": self.text_spec["embed_dim"]}

    def build_model(self, cfg: TrainConfig) -> ProjectorModel:
        image, text = self.head_configs()
        lc = self.recipe.loss
        temperature = Temperature(lc.init_temperature, lc.min_temperature, lc.max_temperature)
        return ProjectorModel(FreezeAlignTokenHead(image), FreezeAlignTextHead(text), temperature)

    def train_dataset(self) -> PairedCaches:
        return self.dataset

    def collate(self, indices: list[int]) -> dict[str, Any]:
        return self.dataset.collate(indices)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        image, text, scale = model(batch["image"], batch["texts"][0])
        loss = infonce_loss(gather_features(image), gather_features(text), scale)
        return loss, {"temperature": 1.0 / scale.detach()}

    def after_step(self, model: ProjectorModel) -> None:
        model.temperature.clamp_()

    def aligned(self, model: ProjectorModel) -> Any:
        """The trained projectors on the (re-loaded) frozen encoders, as an ``AlignedEncoder``."""
        from align.artifact import AlignedEncoder
        from align.encoders.registry import load_text_encoder, load_vision_encoder

        return AlignedEncoder(
            load_vision_encoder(self.recipe.vision),
            load_text_encoder(self.recipe.text),
            copy.deepcopy(model.image_head).cpu().eval(),
            copy.deepcopy(model.text_head).cpu().eval(),
            method="freeze_align",
            logit_scale=float(model.temperature().detach()),
        )

    def evaluate(self, model: ProjectorModel) -> dict[str, Any]:
        self.scores = zero_shot_scores(self.aligned(model), self.recipe.eval, self.recipe.data)
        return self.scores

    def save(self, model: ProjectorModel, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
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
    """Train freeze-align from a recipe file into ``out_dir``; returns the artifact directory."""
    recipe = load_recipe(config, overrides)
    with OutDir(out_dir, "align projector", overwrite, collective=True):  # before its caches are written into out_dir
        run_recipe(ProjectorMethod(recipe, out_dir), recipe, out_dir, resume, overwrite=overwrite)
    return Path(out_dir) / "artifact"
