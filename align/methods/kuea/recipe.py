"""KUEA: fine-tune a CLIP image tower so its kernel matrix matches a vision-centric target's.

The recipe, top to bottom:

* encoders: the student, a CLIP image tower (HF ``CLIPVisionModelWithProjection`` or an open_clip
  ViT), trained whole (``freeze_blocks``: keep the embeddings and the first K blocks frozen); a frozen
  copy of it (the anchor's reference); the target, any registered ``VisionEncoder`` with pooling
  ``target_pool`` (DINOv2: final-LayerNorm CLS, ``cls``). Each sees the image through its *own*
  preprocessing;
* embeddings: student ``f(x) = ln_post(CLS) @ proj`` (pooled projected, unnormalized);
* kernels: normalized polynomial (degree 3; target gamma = 1/dim, c = 1 fixed; student gamma, c
  trainable from 0.0032, 0.191623), Gaussian or cosine (``align.kernels.build_kernel``). The student's
  are registered parameters of the trained module, so the optimizer, checkpoints and artifact see the
  very objects that train (the reference rebinds them to a device copy and they never change);
* loss: ``anchor_weight * mean_i ||f(x_i) - f_0(x_i)||^2 + kernel_weight * mean_{i,j} (k_s - k_t)^2``
  (+ ``patch_anchor_weight`` times the same L2 on layer ``patch_anchor_layer`` patch tokens, the ones
  LLaVA reads); the means run over the global batch, gathered from every process
  (``align.losses.gather_features``), so N processes train as one;
* data: images only, any ``open_data`` source; target embeddings are computed once into an embedding
  cache (``OUT/cache/target-<pool>``, keyed by image id and the target's preprocessing) unless
  ``live_target``;
* loop: AdamW lr 1e-5, wd 1e-4 (0 for kernel parameters), batch 64, 40k steps, warmup 2800 then
  cosine (``align.train.loop.train``; bf16 via ``train.mixed_precision``, ``train.gradient_checkpointing``);
* result: ``OUT/artifact`` (AlignedEncoder with the fine-tuned backbone), ``OUT/hf_clip``,
  ``OUT/open_clip`` and the compatibility report ``OUT/compat_report.json`` (printed as a table).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from align.distributed import whole_model
from align.encoders.base import VisionEncoder
from align.kernels import build_kernel
from align.losses import anchor_loss, gather_features, kernel_alignment_loss
from align.methods.evaluation import EvalConfig
from align.methods.kuea.data import KueaData, KueaImages, encode_student, load_student, load_target
from align.recipes import load_config
from align.train.config import TrainConfig

TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 40000,
    "lr": 1e-5,
    "weight_decay": 1e-4,
    "batch_size": 64,
    "warmup": 2800,
    "schedule": "cosine",
}


@dataclasses.dataclass
class KernelConfig:
    """Kernel family and per-role overrides of ``build_kernel``'s KUEA defaults (e.g. ``gamma``)."""

    name: Literal["polynomial", "gaussian", "cosine"] = "polynomial"
    student: dict[str, float | int | bool] = dataclasses.field(default_factory=dict)
    target: dict[str, float | int | bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class KueaLoss:
    anchor_weight: float = 1.0
    kernel_weight: float = 0.5
    patch_anchor_weight: float = 0.0
    patch_anchor_layer: int = -2


@dataclasses.dataclass
class KueaRecipe:
    """A KUEA recipe file (YAML) with ``--set`` overrides; see ``recipes/kuea_*.yaml``."""

    student: str = "openai/clip-vit-large-patch14-336"
    target: str = "facebook/dinov2-large"
    target_pool: str = "cls"
    freeze_blocks: int = 0
    live_target: bool = False
    kernel: KernelConfig = dataclasses.field(default_factory=KernelConfig)
    loss: KueaLoss = dataclasses.field(default_factory=KueaLoss)
    data: KueaData = dataclasses.field(default_factory=KueaData)
    train: TrainConfig = dataclasses.field(default_factory=lambda: TrainConfig(**TRAIN_DEFAULTS))
    eval: EvalConfig = dataclasses.field(default_factory=lambda: EvalConfig(limit=512))
    export_name: str = "kuea-clip"


def load_recipe(path: str | os.PathLike | None, overrides: list[str] = ()) -> KueaRecipe:
    """A :class:`KueaRecipe` from YAML + overrides, on top of the paper's training defaults."""
    return load_config(KueaRecipe, path, overrides, base={"train": TRAIN_DEFAULTS})


class KueaModel(nn.Module):
    """What the optimizer sees: the student tower and the student kernel (trainable parameters).

    The frozen original and the (live) target are held outside the module tree, so they are not in
    ``state_dict()`` (checkpoints and artifacts stay the student's size) nor in ``parameters()``; they
    still follow ``.to()``/``.half()`` through ``_apply`` and always stay in eval mode.
    """

    def __init__(
        self, student: VisionEncoder, target: VisionEncoder | None, recipe: KueaRecipe, target_dim: int
    ):
        super().__init__()
        self.student = student
        kc = recipe.kernel
        self.student_kernel = build_kernel(kc.name, student.projection_dim, "student", **kc.student)
        self.target_kernel = build_kernel(kc.name, target_dim, "target", **kc.target)
        original = whole_model(student, copy_always=True)  # whole also when a ZeRO-3 config partitioned it
        self.frozen = {"original": original.eval().requires_grad_(False)}
        if target is not None:
            self.frozen["target"] = target.eval().requires_grad_(False)
        self.target_pool, self.weights = recipe.target_pool, recipe.loss
        lw = recipe.loss
        self.patch_layer = lw.patch_anchor_layer if lw.patch_anchor_weight > 0 else None

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        super()._apply(fn, recurse)
        for module in self.frozen.values():
            module._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> KueaModel:
        super().train(mode)
        for module in self.frozen.values():
            module.eval()
        return self

    def forward(
        self, pixels: Tensor, target: Tensor | None = None, target_pixels: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Loss terms of one batch: cached ``target`` embeddings, or ``target_pixels`` for the live target."""
        emb, tokens = encode_student(self.student, pixels, self.patch_layer)
        with torch.no_grad():
            emb0, tokens0 = encode_student(self.frozen["original"], pixels, self.patch_layer)
            if target is None:
                if "target" not in self.frozen or target_pixels is None:
                    raise ValueError(
                        "KueaModel: no cached target embeddings and no live target to compute them"
                    )
                target = self.frozen["target"].pooled(target_pixels, self.target_pool)
        # The kernel term pairs every sample of the global batch: gather it from every process.
        emb, emb0, target = gather_features(emb), gather_features(emb0), gather_features(target)
        if tokens is not None:
            tokens, tokens0 = gather_features(tokens), gather_features(tokens0)
        w = self.weights
        terms = {
            "anchor": anchor_loss(emb.float(), emb0.float()),
            "kernel": kernel_alignment_loss(emb, target.float(), self.student_kernel, self.target_kernel),
        }
        total = w.anchor_weight * terms["anchor"] + w.kernel_weight * terms["kernel"]
        if tokens is not None:
            terms["patch_anchor"] = anchor_loss(tokens.float(), tokens0.float())
            total = total + w.patch_anchor_weight * terms["patch_anchor"]
        return {"loss": total, **terms}


class KueaMethod:
    """KUEA as an ``align.train.method.Method``."""

    def __init__(self, recipe: KueaRecipe, out_dir: str | os.PathLike) -> None:
        self.recipe, self.out_dir = recipe, Path(out_dir)
        if (
            recipe.loss.anchor_weight < 0
            or recipe.loss.kernel_weight < 0
            or recipe.loss.patch_anchor_weight < 0
        ):
            raise ValueError(f"loss weights must be >= 0, found {dataclasses.asdict(recipe.loss)}")
        self.student_source, student = load_student(recipe.student)
        target = load_target(recipe.target, recipe.target_pool)
        self.target_dim = target.pooled_dim(recipe.target_pool)
        self.target_spec = target.spec
        self.images = KueaImages.build(recipe, self.out_dir, student, target)
        self._target = target if recipe.live_target else None
        self.initial_kernel: dict[str, float] = {}
        self.report: dict[str, Any] = {}

    def build_model(self, cfg: TrainConfig) -> KueaModel:
        student = load_student(self.recipe.student)[1]  # fresh weights on every call
        if cfg.gradient_checkpointing:
            if student.kind == "clip":
                student.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            else:
                student.visual.set_grad_checkpointing(True)
        model = KueaModel(student, self._target, self.recipe, self.target_dim)
        freeze_early_blocks(student, self.recipe.freeze_blocks)
        self.initial_kernel = model.student_kernel.values()
        self.initial_kernel_module = copy.deepcopy(model.student_kernel).requires_grad_(False)
        return model

    def param_groups(self, model: KueaModel, cfg: TrainConfig) -> list[dict[str, Any]]:
        """Student weights with ``cfg.weight_decay``; the kernel parameters without decay."""
        student = [p for p in model.student.parameters() if p.requires_grad]
        kernel = [p for p in model.student_kernel.parameters() if p.requires_grad]
        groups = [{"params": student, "weight_decay": cfg.weight_decay}]
        return groups + ([{"params": kernel, "weight_decay": 0.0}] if kernel else [])

    def train_dataset(self) -> KueaImages:
        return self.images

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        from align.train.accelerator import unwrap

        out = model(batch["pixels"], batch.get("target"), batch.get("target_pixels"))
        metrics = {k: v.detach() for k, v in out.items() if k != "loss"}
        metrics.update({f"kernel_{k}": v for k, v in unwrap(model).student_kernel.values().items()})
        return out["loss"], metrics

    def evaluate(self, model: KueaModel) -> dict[str, Any]:
        from align.methods.kuea.report import kuea_report

        self.report = kuea_report(self, model)
        return self.report

    def save(self, model: KueaModel, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        from align.methods.kuea.export import save_outputs

        save_outputs(self, model, out_dir)


def freeze_early_blocks(student: VisionEncoder, blocks: int) -> None:
    """Freeze the patch/position embeddings, pre-norm and the first ``blocks`` transformer blocks."""
    if blocks <= 0:
        return
    if blocks > student.num_layers:
        raise ValueError(f"freeze_blocks={blocks}: the student has only {student.num_layers} blocks")
    if student.kind == "clip":
        vm = student.model.vision_model
        frozen = [vm.embeddings, vm.pre_layrnorm, *vm.encoder.layers[:blocks]]
    else:
        v = student.visual
        frozen = [v.conv1, v.ln_pre, *v.transformer.resblocks[:blocks]]
        v.class_embedding.requires_grad_(False)
        v.positional_embedding.requires_grad_(False)
    for module in frozen:
        module.requires_grad_(False)
