"""Hugging Face vision backbones (CLIP, SigLIP, DINOv2, DINOv2-with-registers) behind ``VisionEncoder``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import AutoImageProcessor, PretrainedConfig

from align.encoders.base import ImagePreprocess, VisionEncoder

# model_type in config.json -> (HF class name, kind). Composite CLIP/SigLIP configs load their vision part.
VISION_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "clip": ("CLIPVisionModelWithProjection", "clip"),
    "clip_vision_model": ("CLIPVisionModelWithProjection", "clip"),
    "siglip": ("SiglipVisionModel", "siglip"),
    "siglip_vision_model": ("SiglipVisionModel", "siglip"),
    "dinov2": ("Dinov2Model", "dinov2"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "dinov2_with_registers"),
}


def hf_preprocess(source: str, config: PretrainedConfig, model_kwargs: dict[str, Any]) -> ImagePreprocess:
    """The model's own image processor, wrapped with its describable fields."""
    processor = AutoImageProcessor.from_pretrained(source, **model_kwargs)
    size = processor.size or {}
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if crop:
        image_size, resize = crop["height"], size.get("shortest_edge", crop["height"])
    else:
        image_size = size.get("height") or size.get("shortest_edge") or config.image_size
        resize = image_size

    def transform(images):
        return processor(images=images, return_tensors="pt")["pixel_values"]

    return ImagePreprocess(
        image_size=int(image_size),
        mean=tuple(float(v) for v in processor.image_mean),
        std=tuple(float(v) for v in processor.image_std),
        resize=int(resize),
        crop=bool(crop),
        transform=transform,
    )


class HFVisionEncoder(VisionEncoder):
    """A ``transformers`` vision model; tokens from ``hidden_states`` and pooling per model family."""

    def __init__(self, model: torch.nn.Module, kind: str, preprocess: ImagePreprocess, source: str):
        super().__init__()
        self.model = model
        self.kind = kind
        self.source = source
        self.preprocess = preprocess
        cfg = model.config
        self.embed_dim = cfg.hidden_size
        self.image_size = preprocess.image_size
        self.patch_size = cfg.patch_size
        self.num_layers = cfg.num_hidden_layers
        registers = getattr(cfg, "num_register_tokens", 0) if kind == "dinov2_with_registers" else 0
        self.num_prefix_tokens = 0 if kind == "siglip" else 1 + registers
        if kind == "clip":
            self.poolings = ("cls", "mean", "concat", "projected")
        elif kind == "siglip":
            self.poolings = ("mean", "projected") if getattr(cfg, "vision_use_head", True) else ("mean",)

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        if layer == -1:
            return self.model(pixel_values=pixel_values).last_hidden_state
        n = self.num_layers + 1
        if not -n <= layer < n:
            raise ValueError(f"{self.source}: layer {layer} out of range for {self.num_layers} layers")
        return self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer]

    def cls_token(self, tokens: torch.Tensor) -> torch.Tensor:
        cls = super().cls_token(tokens)
        if self.kind == "clip":  # HF CLIP's last_hidden_state is before post_layernorm
            cls = self.model.vision_model.post_layernorm(cls)
        return cls

    @property
    def projection_dim(self) -> int:
        if self.kind == "clip":
            return self.model.config.projection_dim
        if self.kind == "siglip" and "projected" in self.poolings:
            return self.embed_dim
        return super().projection_dim

    def projected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """CLIP: ``visual_projection(post_layernorm(CLS))``; SigLIP: its attention-pooling head output."""
        if self.kind == "clip":
            return self.model(pixel_values=pixel_values).image_embeds
        if self.kind == "siglip" and "projected" in self.poolings:
            return self.model(pixel_values=pixel_values).pooler_output
        return super().projected(pixel_values)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' load reports (unused keys of the other tower) for the duration."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def load_hf_vision(source: str | Path, config: PretrainedConfig, **model_kwargs: Any) -> HFVisionEncoder:
    """Load a supported HF vision model from a hub id or directory whose config is ``config``."""
    import transformers

    class_name, kind = VISION_MODEL_TYPES[config.model_type]
    model_cls = getattr(transformers, class_name)
    with quiet_transformers():  # loading one tower of a CLIP/SigLIP checkpoint reports the other as unused
        model = model_cls.from_pretrained(str(source), **model_kwargs)
    model.eval()
    preprocess = hf_preprocess(
        str(source),
        model.config,
        {k: v for k, v in model_kwargs.items() if k in ("revision", "cache_dir", "local_files_only")},
    )
    return HFVisionEncoder(model, kind, preprocess, str(source))
