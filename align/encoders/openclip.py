"""open_clip models behind ``VisionEncoder`` / ``TextEncoder``.

Specs: ``openclip:<name>/<pretrained tag or weights file>`` (built-in architectures, e.g.
``openclip:ViT-L-14-336/openai``) or a directory holding ``open_clip_config.json`` and weights
(open_clip's ``local-dir:`` format, which is also how the tiny open_clip model is written).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from align.encoders.base import OPENAI_MEAN, OPENAI_STD, ImagePreprocess, TextEncoder, VisionEncoder


def parse_openclip_spec(spec: str | Path) -> tuple[str, str | None]:
    """``openclip:NAME/TAG`` -> (NAME, TAG); a directory -> (``local-dir:DIR``, None)."""
    spec = str(spec)
    if Path(spec).is_dir():
        return f"local-dir:{Path(spec).resolve()}", None
    body = spec.removeprefix("openclip:")
    name, _, tag = body.partition("/")
    if not name:
        raise ValueError(f"'{spec}': expected 'openclip:<architecture>/<pretrained tag or file>'")
    return name, tag or None


@lru_cache(maxsize=4)
def _create(name: str, pretrained: str | None):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    tokenizer = open_clip.get_tokenizer(name)
    return model, preprocess, tokenizer


def load_openclip(spec: str | Path) -> tuple[torch.nn.Module, Any, Any]:
    """(model, torchvision preprocess, tokenizer); a fresh copy of the model each call."""
    import copy

    model, preprocess, tokenizer = _create(*parse_openclip_spec(spec))
    return copy.deepcopy(model).eval(), preprocess, tokenizer


def _describe_transform(transform: Any, visual: torch.nn.Module) -> tuple[int, int, tuple, tuple]:
    size = visual.image_size
    image_size = size[0] if isinstance(size, tuple | list) else int(size)
    resize = image_size
    for t in getattr(transform, "transforms", []):
        if type(t).__name__ == "Resize":
            s = t.size
            resize = s if isinstance(s, int) else s[0]
    mean = getattr(visual, "image_mean", None) or OPENAI_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_STD
    return image_size, int(resize), tuple(mean), tuple(std)


class OpenClipVisionEncoder(VisionEncoder):
    """An open_clip ``VisionTransformer``; ``layer=-1`` is the last block's output (before ``ln_post``),
    matching HF CLIP's ``last_hidden_state``, so converted weights give identical tokens."""

    kind = "openclip"
    poolings = ("cls", "mean", "concat", "projected")

    def __init__(self, visual: torch.nn.Module, transform: Any, source: str):
        super().__init__()
        if type(visual).__name__ != "VisionTransformer":
            raise ValueError(
                f"{source}: open_clip visual tower '{type(visual).__name__}' is not supported for token access; "
                "expected open_clip's VisionTransformer (ViT CLIP models)"
            )
        self.visual = visual
        self.source = source
        image_size, resize, mean, std = _describe_transform(transform, visual)

        def run(images):
            return torch.stack([transform(im) for im in images])

        self.preprocess = ImagePreprocess(
            image_size, mean, std, resize, crop=resize != image_size, transform=run
        )
        self.embed_dim = visual.transformer.width
        self.image_size = image_size
        patch = visual.patch_size
        self.patch_size = patch[0] if isinstance(patch, tuple | list) else int(patch)
        self.num_layers = len(visual.transformer.resblocks)
        self.num_prefix_tokens = 1

    def hidden_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """HF-style list: embeddings after ``ln_pre``, then each block's output."""
        x = self.visual._embeds(pixel_values)
        _, intermediates = self.visual.transformer.forward_intermediates(x)
        return [x, *intermediates]

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        states = self.hidden_states(pixel_values)
        if not -len(states) <= layer < len(states):
            raise ValueError(f"{self.source}: layer {layer} out of range for {self.num_layers} layers")
        return states[layer]

    def cls_token(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens[:, 0])

    @property
    def projection_dim(self) -> int:
        return self.visual.proj.shape[1] if self.visual.proj is not None else self.embed_dim

    def projected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls = self.cls_token(self(pixel_values))
        return cls @ self.visual.proj if self.visual.proj is not None else cls


class OpenClipTextEncoder(TextEncoder):
    """The text tower of an open_clip model; sentence embedding = ``encode_text`` (projected)."""

    kind = "openclip"
    pooling = "projected"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, source: str):
        super().__init__()
        self.clip = model
        self.clip.visual = None  # the text encoder carries no image tower
        self._tokenizer = tokenizer
        self.source = source
        self.embed_dim = (
            model.text_projection.shape[1] if model.text_projection is not None else model.transformer.width
        )

    def tokenize(self, texts):
        ids = self._tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = self.clip
        x = m.token_embedding(input_ids) + m.positional_embedding[: input_ids.shape[1]]
        x = m.transformer(x, attn_mask=m.attn_mask[: input_ids.shape[1], : input_ids.shape[1]])
        return m.ln_final(x)

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(input_ids)


def load_openclip_vision(spec: str | Path) -> OpenClipVisionEncoder:
    model, transform, _ = load_openclip(spec)
    return OpenClipVisionEncoder(model.visual, transform, str(spec))


def load_openclip_text(spec: str | Path) -> OpenClipTextEncoder:
    model, _, tokenizer = load_openclip(spec)
    return OpenClipTextEncoder(model, tokenizer, str(spec))
