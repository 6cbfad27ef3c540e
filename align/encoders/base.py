"""The two encoder interfaces every method and every MLLM family works through."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

POOLINGS = ("cls", "mean", "concat", "projected")
# OpenAI CLIP's image normalisation (open_clip's default when a model names none).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class ImagePreprocess:
    """A model's own image preprocessing: what it is (for manifests and processors) and how to run it."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int  # shortest edge before the crop (== image_size when the model resizes directly)
    crop: bool = True
    transform: Callable[[Sequence[Image.Image]], torch.Tensor] | None = field(default=None, repr=False)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Turn PIL images into a float batch ``[B, 3, S, S]`` the model accepts."""
        if self.transform is None:
            raise RuntimeError("this ImagePreprocess only describes a preprocessing; it has no transform")
        images = [im.convert("RGB") for im in images]
        return self.transform(images)

    def describe(self) -> dict[str, Any]:
        """JSON-able description (cache keys, model cards, processors)."""
        out = asdict(self)
        out.pop("transform")
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out


class VisionEncoder(nn.Module):
    """A frozen-or-trainable image backbone with a uniform token and pooling contract.

    ``forward(pixel_values, layer=-1)`` returns ``[B, num_prefix_tokens + num_patches, D]``. ``layer=-1`` is
    the model's final token output (after its final norm where the model applies one to all tokens, e.g.
    DINOv2); other values index HF-style hidden states (0 = embeddings, -2 = what LLaVA consumes).
    """

    embed_dim: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    num_layers: int
    preprocess: ImagePreprocess
    poolings: tuple[str, ...] = ("cls", "mean", "concat")
    source: str = ""
    kind: str = ""

    @property
    def num_patches(self) -> int:
        """Patch tokens per image, known before any image is seen."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """All tokens per image: prefix (CLS, registers) plus patches."""
        return self.num_prefix_tokens + self.num_patches

    def forward(self, pixel_values: torch.Tensor, layer: int = -1) -> torch.Tensor:
        raise NotImplementedError

    def cls_token(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled CLS embedding from final-layer tokens (after the model's final norm)."""
        if self.num_prefix_tokens == 0:
            raise ValueError(f"{self.source}: this encoder has no CLS token; use pool 'mean' or 'projected'")
        return tokens[:, 0]

    def pooled(self, pixel_values: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """A global embedding: ``cls``, ``mean`` (patches), ``concat`` ([cls ; mean]) or ``projected``."""
        if pool not in self.poolings:
            raise ValueError(
                f"{self.source}: pooling '{pool}' is not available; expected one of {list(self.poolings)}"
            )
        if pool == "projected":
            return self.projected(pixel_values)
        tokens = self(pixel_values)
        mean = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if pool == "mean":
            return mean
        cls = self.cls_token(tokens)
        return cls if pool == "cls" else torch.cat([cls, mean], dim=-1)

    def pooled_dim(self, pool: str) -> int:
        """Width of ``pooled(..., pool)``."""
        if pool == "concat":
            return 2 * self.embed_dim
        return self.projection_dim if pool == "projected" else self.embed_dim

    @property
    def projection_dim(self) -> int:
        raise ValueError(f"{self.source}: no projected embedding (not a CLIP-like model)")

    def projected(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise ValueError(f"{self.source}: no projected embedding (not a CLIP-like model)")

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able description of the encoder and its token contract."""
        return {
            "source": self.source,
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_patches": self.num_patches,
            "num_layers": self.num_layers,
            "poolings": list(self.poolings),
            "preprocess": self.preprocess.describe(),
        }

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image], pool: str = "cls") -> torch.Tensor:
        """Preprocess and pool a list of PIL images (no gradients, model's device and dtype)."""
        param = next(self.parameters())
        pixels = self.preprocess(images).to(param.device, param.dtype)
        return self.pooled(pixels, pool)


class TextEncoder(nn.Module):
    """A text model with its own tokenizer and its own sentence pooling."""

    embed_dim: int
    pooling: str  # "mean" | "cls" | "last" | "projected"
    source: str = ""
    kind: str = ""
    normalize_output: bool = False

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Per-token hidden states ``[B, T, D]``."""
        raise NotImplementedError

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's own sentence pooling over ``token_features``."""
        tokens = self.token_features(input_ids, attention_mask)
        return pool_tokens(tokens, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.sentence_embedding(input_ids, attention_mask)

    @torch.no_grad()
    def encode(
        self, texts: Sequence[str], batch_size: int = 64, normalize: bool | None = None
    ) -> torch.Tensor:
        """Sentence embeddings ``[N, D]`` (float32, CPU) for a list of strings."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        device = next(self.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(list(texts[start : start + batch_size]))
            batch = {k: v.to(device) for k, v in batch.items()}
            out.append(self.sentence_embedding(batch["input_ids"], batch["attention_mask"]).float().cpu())
        emb = torch.cat(out) if out else torch.empty(0, self.embed_dim)
        if normalize if normalize is not None else self.normalize_output:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb

    @property
    def spec(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "embed_dim": self.embed_dim,
            "pooling": self.pooling,
        }


def pool_tokens(tokens: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``[B, T, D]`` token states with an attention mask: ``mean``, ``cls`` or ``last`` (last real token)."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "last":
        last = attention_mask.long().sum(1) - 1
        return tokens[torch.arange(tokens.shape[0], device=tokens.device), last]
    raise ValueError(f"unknown text pooling '{pooling}'; expected mean, cls or last")
