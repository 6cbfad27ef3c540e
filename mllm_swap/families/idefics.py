"""HF IDEFICS (v1): a Flamingo-style model whose tower is ``model.model.vision_model`` (CLIP architecture).

The perceiver resampler and the gated cross-attention layers consume the tower's ``last_hidden_state``
(all tokens, CLS included, before ``post_layernorm``) and were trained for its width and token layout,
so only a drop-in of the same CLIP architecture is possible: weights are replaced, anything else is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mllm_swap.families.base import (
    Family,
    Loaded,
    SwapPlan,
    TowerView,
    arch_of,
    load_pretrained,
    mismatches,
)
from mllm_swap.families.prompts import Prompter
from mllm_swap.towers import NewTower


def _view(vision_config, source: str) -> TowerView:
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return TowerView(
        source=source,
        arch=arch_of(vision_config),
        width=int(vision_config.hidden_size),
        num_tokens=patches + 1,
        image_size=int(vision_config.image_size),
        patch_size=int(vision_config.patch_size),
        prefix_rule="keeps CLS (perceiver reads every token)",
        select_layer="last_hidden_state",
    )


class IdeficsPrompter(Prompter):
    """IDEFICS' format: ``User:``/``Assistant:`` turns, images interleaved with the text."""

    def __init__(self, processor: Any, image_aspect_ratio: str = "pad") -> None:
        super().__init__(processor, image_aspect_ratio)
        self.eou = "<end_of_utterance>" if "<end_of_utterance>" in self.tokenizer.get_vocab() else ""

    def prompt(self, context: str, n_images: int, reply: str | None = None) -> str:
        text = f"User:{self.image_token * self.placeholders(context, n_images)}{context}{self.eou}\nAssistant:"
        return text if reply is None else f"{text} {reply}"

    def _tokenize(self, texts: list[str], images: list[list[Image.Image]]) -> dict:
        samples = []
        for text, ims in zip(texts, images, strict=True):
            pieces = text.split(self.image_token)
            sample = [pieces[0]]
            for image, piece in zip(ims, pieces[1:], strict=False):
                sample += [image, piece]
            samples.append([p for p in sample if not isinstance(p, str) or p])
        return self.processor(text=samples, padding=True, return_tensors="pt", add_end_of_utterance_token=False)


class Idefics(Family):
    """IDEFICS checkpoints: drop-in of a CLIP tower with the same shape; refuses anything else."""

    name = "idefics"
    modes = ("dropin",)

    formats = "IDEFICS (config.json model_type idefics)"
    prompter_class = IdeficsPrompter

    @classmethod
    def recognizes(cls, path: Path, config: dict[str, Any] | None) -> bool:
        return config is not None and config.get("model_type") == "idefics"

    def load(self, path: Path, dtype: torch.dtype | None = None, quantization_config: Any = None) -> Loaded:
        from transformers import IdeficsForVisionText2Text

        return load_pretrained(self, IdeficsForVisionText2Text, path, dtype, quantization_config)

    def old_view(self, loaded: Loaded) -> TowerView:
        return _view(loaded.model.config.vision_config, f"{loaded.path} (model.vision_model)")

    def plan(self, loaded: Loaded, tower: NewTower, mode: str, select_layer: int | None) -> SwapPlan:
        old = self.old_view(loaded)
        if tower.config is None:
            raise ValueError(
                f"{tower.source}: IDEFICS needs a transformers CLIP vision tower, found an open_clip visual"
            )
        if mode == "rebuild":
            raise ValueError(
                "IDEFICS supports drop-in only: its perceiver and cross-attention were trained for the tower"
            )
        if tower.image_size != old.image_size:
            raise ValueError(
                f"{tower.source}: encoder image size {tower.image_size} cannot be fed by {loaded.path}, whose "
                f"processor and position embeddings use {old.image_size}x{old.image_size} images"
            )
        new = _view(tower.config, tower.source)
        diffs = mismatches(old, new)
        if tower.kind != "hf":
            diffs.append(f"tower kind {tower.kind} (IDEFICS holds a plain CLIP transformer)")
        if select_layer is not None:
            diffs.append(f"select layer {select_layer} (IDEFICS always reads last_hidden_state)")
        if diffs:
            raise ValueError(
                f"refusing to swap {tower.source} into IDEFICS {loaded.path}: the perceiver resampler and gated "
                f"cross-attention were trained for the old tower; found {'; '.join(diffs)}"
            )
        reason = "requested" if mode == "dropin" else "auto: same CLIP architecture and width"
        return SwapPlan("dropin", reason, old, new)

    def apply(self, loaded: Loaded, tower: NewTower, plan: SwapPlan) -> None:
        vision = loaded.model.model.vision_model
        vision.load_state_dict(tower.state_dict, strict=True)
        new_proc = tower.image_processor
        old_proc = loaded.processor.image_processor
        if new_proc is not None:
            mean, std = list(new_proc.image_mean), list(new_proc.image_std)
            if [round(v, 6) for v in mean + std] != [
                round(v, 6) for v in list(old_proc.image_mean) + list(old_proc.image_std)
            ]:
                old_proc.image_mean, old_proc.image_std = mean, std
                plan.notes.append(f"image processor mean/std set to {tower.source}'s")

    @torch.no_grad()
    def consumed_tokens(self, loaded: Loaded, images: list[Image.Image]) -> torch.Tensor:
        pixels = loaded.processor.image_processor(images, return_tensors="pt")
        pixels = getattr(pixels, "pixel_values", pixels)
        vision = loaded.model.model.vision_model
        return vision(pixel_values=pixels.to(loaded.model.dtype)).last_hidden_state
