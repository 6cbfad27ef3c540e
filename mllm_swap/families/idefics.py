"""HF IDEFICS (v1): a Flamingo-style model whose tower is ``model.model.vision_model`` (CLIP architecture).

The perceiver resampler and the gated cross-attention layers consume the tower's ``last_hidden_state``
(all tokens, CLS included, before ``post_layernorm``) and were trained for its width and token layout,
so only a drop-in of the same CLIP architecture is possible: weights are replaced, anything else is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from mllm_swap.families.base import (
    Family,
    Loaded,
    SwapPlan,
    TowerView,
    arch_of,
    mismatches,
    quiet_transformers,
    require_files,
)
from mllm_swap.families.llava_hf import PROCESSOR, TOKENIZER, WEIGHTS
from mllm_swap.families.new_tower import NewTower


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


class Idefics(Family):
    """IDEFICS checkpoints: drop-in of a CLIP tower with the same shape; refuses anything else."""

    name = "idefics"
    modes = ("dropin",)

    def load(self, path: Path) -> Loaded:
        from transformers import AutoProcessor, IdeficsForVisionText2Text

        require_files(path, "IDEFICS", [("config.json",), WEIGHTS, PROCESSOR, TOKENIZER])
        with quiet_transformers():
            model = IdeficsForVisionText2Text.from_pretrained(path).eval()
            processor = AutoProcessor.from_pretrained(path)
        return Loaded(path=path, model=model, processor=processor)

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

    def save(self, loaded: Loaded, out: Path, final: Path, plan: SwapPlan, tower: NewTower) -> None:
        loaded.model.save_pretrained(out)
        loaded.processor.save_pretrained(out)

    @torch.no_grad()
    def consumed_tokens(self, loaded: Loaded, images: list[Image.Image]) -> torch.Tensor:
        pixels = loaded.processor.image_processor(images, return_tensors="pt")
        pixels = getattr(pixels, "pixel_values", pixels)
        vision = loaded.model.model.vision_model
        return vision(pixel_values=pixels.to(loaded.model.dtype)).last_hidden_state

    def _inputs(self, loaded: Loaded, image: Image.Image, prompt: str) -> dict:
        return loaded.processor(images=[image], text=[f"User: {prompt}\nAssistant:"], return_tensors="pt")

    @torch.no_grad()
    def next_token_logprobs(self, loaded: Loaded, image: Image.Image, prompt: str) -> torch.Tensor:
        logits = loaded.model(**self._inputs(loaded, image, prompt)).logits[0, -1]
        return torch.log_softmax(logits.double(), dim=-1)

    @torch.no_grad()
    def generate(self, loaded: Loaded, image: Image.Image, prompt: str, max_new_tokens: int = 8) -> str:
        inputs = self._inputs(loaded, image, prompt)
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return loaded.processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
