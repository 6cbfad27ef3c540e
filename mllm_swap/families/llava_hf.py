"""HF ``LlavaForConditionalGeneration`` (transformers 5.x layout) and LLaVA-NeXT (drop-in only).

Paths: ``model.model.vision_tower``, ``model.model.multi_modal_projector`` (``linear_1``, act, ``linear_2``),
``model.model.language_model``, ``model.lm_head``. The processor expands ``<image>`` into
``(S/p)^2 + num_additional_image_tokens - (1 if "default")`` copies, which must equal what the tower feeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from mllm_swap.families.base import (
    LLAVA_TYPES,
    Family,
    Loaded,
    SwapPlan,
    TowerView,
    arch_of,
    load_pretrained,
    mismatches,
)
from mllm_swap.towers import FUSED_MODEL_TYPE, MODEL_TYPE, NewTower, prefix_tokens_of


def fed_image_size(image_processor: Any) -> int | None:
    """The side of the pixels ``image_processor`` feeds the tower (its crop, else its resize); None if unknown.

    It sets the patch count, not the tower config's ``image_size``: DINOv2's config says 518 (its position
    table) while its processor feeds 224 (256 patches), and the tower interpolates.
    """
    crop = getattr(image_processor, "do_center_crop", False) and getattr(image_processor, "crop_size", None)
    size = dict(crop or getattr(image_processor, "size", None) or {})
    side = size.get("height") or size.get("shortest_edge")
    return int(side) if side else None


def feed_view(
    vision_config, strategy: str, layer: int | list[int], source: str, image_size: int | None = None
) -> TowerView:
    """How a Llava model with this tower config, strategy and layer feeds image tokens to its connector,
    for ``image_size`` pixels a side (the processor's, :func:`fed_image_size`; None: the config's)."""
    image_size = int(image_size or vision_config.image_size)
    patches = (image_size // vision_config.patch_size) ** 2
    if vision_config.model_type in (MODEL_TYPE, FUSED_MODEL_TYPE):
        out_prefix = vision_config.num_output_prefix_tokens
        rule = f"tower rule '{vision_config.token_rule}'" + (" + head" if vision_config.head_config else "")
    else:
        out_prefix = prefix_tokens_of(vision_config)
        rule = "tower outputs all tokens"
    tokens = patches + out_prefix - (1 if strategy == "default" else 0)
    rule += f", strategy '{strategy}' ({'drops index 0' if strategy == 'default' else 'keeps all'})"
    return TowerView(
        source=source,
        arch=arch_of(vision_config),
        width=int(vision_config.hidden_size) * (len(layer) if isinstance(layer, list) else 1),
        num_tokens=tokens,
        image_size=image_size,
        patch_size=int(vision_config.patch_size),
        prefix_rule=rule,
        select_layer=layer,
    )


def strategy_for(tower: NewTower) -> tuple[str, int]:
    """(vision_feature_select_strategy, processor num_additional_image_tokens) for a new tower."""
    if tower.kind == "hf" and tower.num_prefix_tokens == 1 and tower.num_tokens == tower.num_patches:
        return "default", 1  # HF's own rule drops the CLS
    return "full", tower.num_tokens - tower.num_patches


class LlavaHF(Family):
    """HF Llava checkpoints: drop-in replaces ``vision_tower`` weights; rebuild replaces tower and ``linear_1``."""

    name = "llava_hf"
    formats = "HF Llava / LlavaNext (config.json model_type llava, llava_next)"
    part_paths = {
        "tower": "model.vision_tower",
        "connector": "model.multi_modal_projector",
        "llm": "model.language_model",
        "lm_head": "lm_head",
    }

    @classmethod
    def recognizes(cls, path: Path, config: dict[str, Any] | None) -> bool:
        return config is not None and config.get("model_type") in LLAVA_TYPES

    def load(self, path: Path, dtype: torch.dtype | None = None, quantization_config: Any = None) -> Loaded:
        from transformers import AutoModelForImageTextToText

        loaded = load_pretrained(self, AutoModelForImageTextToText, path, dtype, quantization_config)
        if loaded.model.config.model_type not in LLAVA_TYPES:
            raise ValueError(
                f"{path}: model_type '{loaded.model.config.model_type}' is not one of {list(LLAVA_TYPES)}"
            )
        return loaded

    def old_view(self, loaded: Loaded) -> TowerView:
        cfg = loaded.model.config
        vc = cfg.vision_config
        source = getattr(vc, "source", "") or vc.name_or_path or f"{loaded.path} (vision_tower)"
        side = fed_image_size(getattr(loaded.processor, "image_processor", None))
        return feed_view(vc, cfg.vision_feature_select_strategy, cfg.vision_feature_layer, source, side)

    def plan(self, loaded: Loaded, tower: NewTower, mode: str, select_layer: int | None) -> SwapPlan:
        if tower.config is None:
            raise ValueError(
                f"{tower.source}: an open_clip visual cannot be a Llava tower; export it as an HF "
                "CLIPVisionModel (aligned KUEA artifacts do) and swap that"
            )
        cfg = loaded.model.config
        old = self.old_view(loaded)
        same = feed_view(
            tower.config,
            cfg.vision_feature_select_strategy,
            cfg.vision_feature_layer,
            tower.source,
            tower.image_size,
        )
        same.num_tokens = tower.num_tokens  # what the tower's token contract feeds (prefix rule applied)
        diffs = mismatches(old, same)
        if not diffs:
            old_state = loaded.model.model.vision_tower.state_dict()
            shapes = {k: tuple(v.shape) for k, v in tower.state_dict.items()}
            if shapes != {k: tuple(v.shape) for k, v in old_state.items()}:
                diffs.append("tower weights have different names or shapes")
        if select_layer is not None and select_layer != cfg.vision_feature_layer:
            diffs.append(f"select layer {cfg.vision_feature_layer} vs {select_layer}")
        if mode == "dropin" and diffs:
            raise ValueError(
                f"drop-in of {tower.source} into {loaded.path} needs the same tower, found: {'; '.join(diffs)}. "
                "Use --mode rebuild (or auto)."
            )
        if mode == "dropin" or (mode == "auto" and not diffs):
            reason = "requested" if mode == "dropin" else "auto: same architecture, width and token layout"
            plan = SwapPlan("dropin", reason, old, same, new_modules=[], untrained=[])
            if cfg.model_type == "llava_next":
                plan.notes.append(
                    "LLaVA-NeXT: image tokens are counted per crop; anyres adds crops per image"
                )
            return plan
        if cfg.model_type == "llava_next":
            raise ValueError(
                f"{loaded.path}: LLaVA-NeXT supports drop-in only (its anyres image processor, grid pinpoints "
                f"and image_newline are tied to the tower); found {'; '.join(diffs)}"
            )
        strategy, _ = strategy_for(tower)
        layer = select_layer if select_layer is not None else tower.head_layer
        layer = cfg.vision_feature_layer if layer is None else layer
        new = feed_view(tower.config, strategy, layer, tower.source, tower.image_size)
        if new.num_tokens != tower.num_tokens:
            raise AssertionError(f"token accounting: view {new.num_tokens} vs tower {tower.num_tokens}")
        hidden = cfg.text_config.hidden_size
        reason = "requested" if mode == "rebuild" else "auto: " + "; ".join(diffs)
        return SwapPlan(
            "rebuild",
            reason,
            old,
            new,
            new_modules=[
                f"model.vision_tower ({type(tower.config).__name__})",
                f"model.multi_modal_projector.linear_1 ({new.width} -> {hidden}, re-initialised)",
            ],
            untrained=["model.multi_modal_projector.linear_1"],
            notes=[
                "model.multi_modal_projector.linear_2 is kept but was trained on the old tower's features: "
                "pretrain the whole connector (stage 1) before LoRA tuning",
                f"processor: {tower.source}'s image processor, {new.num_tokens} <image> tokens per image",
            ],
        )

    def apply(self, loaded: Loaded, tower: NewTower, plan: SwapPlan) -> None:
        model = loaded.model
        if plan.mode == "dropin":
            model.model.vision_tower.load_state_dict(tower.state_dict, strict=True)
            model.config.vision_config._name_or_path = str(tower.source)  # the next swap's "old tower"
            if tower.image_processor is not None and _differs(
                loaded.processor.image_processor, tower.image_processor
            ):
                loaded.processor.image_processor = tower.image_processor
                plan.notes.append(f"image processor replaced by {tower.source}'s (different resize/mean/std)")
            return
        from transformers import LlavaProcessor

        cfg = model.config
        strategy, additional = strategy_for(tower)
        cfg.vision_config = tower.config
        cfg.vision_config._name_or_path = str(tower.source)  # an id or a path relative to the checkpoint
        cfg.vision_feature_select_strategy = strategy
        cfg.vision_feature_layer = plan.new.select_layer
        cfg.image_seq_length = plan.new.num_tokens
        model.model.vision_tower = tower.module()
        old = model.model.multi_modal_projector.linear_1
        generator = torch.Generator().manual_seed(0)
        new = nn.Linear(tower.width, old.out_features, bias=old.bias is not None)
        with torch.no_grad():
            new.weight.copy_(
                torch.randn(new.weight.shape, generator=generator) * cfg.text_config.initializer_range
            )
            if new.bias is not None:
                new.bias.zero_()
        model.model.multi_modal_projector.linear_1 = new.to(old.weight.dtype)
        proc = loaded.processor
        loaded.processor = LlavaProcessor(
            image_processor=tower.image_processor or proc.image_processor,
            tokenizer=proc.tokenizer,
            patch_size=tower.patch_size,
            vision_feature_select_strategy=strategy,
            num_additional_image_tokens=additional,
            chat_template=proc.chat_template,
            image_token=proc.image_token,
        )

    @torch.no_grad()
    def consumed_tokens(self, loaded: Loaded, images: list[Image.Image]) -> torch.Tensor:
        model = loaded.model
        cfg = model.config
        pixels = loaded.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if pixels.ndim == 5:  # LLaVA-NeXT anyres: [B, crops, 3, S, S]; crop 0 is the whole image resized
            pixels = pixels[:, 0]
        tower = model.model.vision_tower
        pixels = pixels.to(next(tower.parameters()).dtype)
        layers = cfg.vision_feature_layer
        states = tower(pixels, output_hidden_states=True, return_dict=True).hidden_states
        picked = [states[i] for i in (layers if isinstance(layers, list) else [layers])]
        if cfg.vision_feature_select_strategy == "default":
            picked = [h[:, 1:] for h in picked]
        return torch.cat(picked, dim=-1)


def _differs(old, new) -> bool:
    """Whether two image processors would produce different pixels (size, crop, mean, std)."""
    keys = (
        "size",
        "crop_size",
        "image_mean",
        "image_std",
        "do_center_crop",
        "do_normalize",
        "rescale_factor",
    )
    return any(_norm(getattr(old, k, None)) != _norm(getattr(new, k, None)) for k in keys)


def _norm(value):
    if hasattr(value, "items"):
        return {k: v for k, v in dict(value).items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [round(float(v), 6) for v in value]
    return value
