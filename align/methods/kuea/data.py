"""KUEA's inputs: student and target loading (with clear errors), the student's forward, and the
image dataset that pairs the student's pixels with cached (or live) target embeddings.

Every image is decoded once per item and preprocessed by *each* model's own preprocessing; the
target's embeddings come from an embedding cache keyed by sample id and the target's preprocessing
(``align.data.cache``), written once into ``OUT/cache/target-<pool>`` or given as ``data.target_cache``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.data import Dataset

from align.encoders.base import VisionEncoder

STUDENT_KINDS = ("clip", "openclip")
_SPEC_KEYS = ("kind", "embed_dim", "image_size", "patch_size", "num_prefix_tokens", "preprocess")


@dataclasses.dataclass
class KueaData:
    """Training images: any ``open_data`` source (shapes dir, image folder, pairs file, HF, shards).

    ``target_cache``: a cache of the target's pooled embeddings built beforehand (``mllm-swap
    encode``); otherwise it is built into ``OUT/cache/target-<pool>`` (resumable).
    """

    train: str = ""
    split: str | None = "train"
    target_cache: str | None = None
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    encode_batch_size: int = 64
    on_error: Literal["raise", "skip"] = "raise"


def resolve_student(spec: str) -> str:
    """``tiny-clip-shapes`` to its built directory (until the registry knows the id); others unchanged."""
    from align.embedded import tiny_model_dir

    return str(tiny_model_dir(spec)) if spec == "tiny-clip-shapes" else spec


def load_student(spec: str) -> tuple[str, VisionEncoder]:
    """(source to reload it from, encoder) for a CLIP student; clear errors otherwise."""
    from align.load import load_vision_encoder

    source = resolve_student(spec)
    try:
        encoder = load_vision_encoder(source)
    except KeyError as err:
        raise KeyError(f"student {spec!r}: {err.args[0] if err.args else err}") from None
    if encoder.kind not in STUDENT_KINDS:
        raise ValueError(
            f"student {spec!r} is a '{encoder.kind}' model; KUEA fine-tunes a CLIP image tower with a "
            "projected embedding: an HF CLIP model or an open_clip ViT (openclip:NAME/TAG or a local dir)"
        )
    encoder.train()
    return source, encoder


def load_target(spec: str, pool: str) -> VisionEncoder:
    """The frozen target encoder, checked to offer pooling ``pool``."""
    from align.load import load_vision_encoder

    try:
        encoder = load_vision_encoder(spec)
    except KeyError as err:
        raise KeyError(f"target {spec!r}: {err.args[0] if err.args else err}") from None
    if pool not in encoder.poolings:
        raise ValueError(
            f"target {spec!r} has no pooling {pool!r} (target_pool); it offers {list(encoder.poolings)}"
        )
    return encoder.eval().requires_grad_(False)


def encode_student(encoder: VisionEncoder, pixels: Tensor, layer: int | None) -> tuple[Tensor, Tensor | None]:
    """Pooled projected embedding ``[B, D]`` and, when ``layer`` is given, that layer's patch tokens.

    One forward pass: HF CLIP via ``image_embeds``/``hidden_states``, open_clip via its block outputs.
    """
    prefix = encoder.num_prefix_tokens
    if encoder.kind == "clip":
        out = encoder.model(pixel_values=pixels, output_hidden_states=layer is not None)
        tokens = out.hidden_states[layer][:, prefix:] if layer is not None else None
        return out.image_embeds, tokens
    if encoder.kind == "openclip":
        states = encoder.hidden_states(pixels)
        cls = encoder.cls_token(states[-1])
        emb = cls @ encoder.visual.proj if encoder.visual.proj is not None else cls
        return emb, states[layer][:, prefix:] if layer is not None else None
    raise ValueError(f"{encoder.source}: not a CLIP student ('{encoder.kind}')")


def _device() -> str | None:
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return None


def target_cache(recipe: Any, out_dir: Path, target: VisionEncoder, source: Any):
    """Open (building it first if needed) the cache of the target's pooled embeddings and check it fits."""
    from align.data.cache import write_cache
    from align.data.cache_read import EmbeddingCache

    data = recipe.data
    if data.target_cache:
        path = Path(data.target_cache)
    else:
        path = write_cache(
            target,
            source,
            out_dir / "cache" / f"target-{recipe.target_pool}",
            "image",
            recipe.target_pool,
            batch_size=data.encode_batch_size,
            dtype=data.cache_dtype,
            on_error=data.on_error,
            device=_device(),
        )
        target.cpu()
    cache = EmbeddingCache(path)
    made, want = cache.manifest["encoder"], target.spec
    differs = [k for k in _SPEC_KEYS if made.get(k) != want.get(k)]
    if cache.manifest["pool"] != recipe.target_pool or cache.manifest["modality"] != "image" or differs:
        raise ValueError(
            f"{path}: target cache made with {made.get('source')!r} pool {cache.manifest['pool']!r}, but the "
            f"recipe's target is {recipe.target!r} pool {recipe.target_pool!r} (differs in "
            f"{differs or ['pool']}); rebuild it or drop data.target_cache"
        )
    return cache


class KueaImages(Dataset):
    """Items ``{"pixels"}`` (student preprocessing) plus ``{"target"}`` (cached embedding) or
    ``{"target_pixels"}`` (target preprocessing, live target)."""

    def __init__(self, samples: list[Any], student: VisionEncoder, target: VisionEncoder | None, cache: Any):
        self.student_preprocess = student.preprocess
        self.target_preprocess = target.preprocess if cache is None else None
        self.cache = cache
        if cache is not None:
            index = {sid: row for row, sid in enumerate(cache.ids)}
            samples = [s for s in samples if s.id in index]  # images skipped while caching drop out
            self.rows = [index[s.id] for s in samples]
        if not samples:
            raise ValueError("KUEA: no training images left (none listed, or none found in the target cache)")
        self.samples = samples

    @classmethod
    def build(cls, recipe: Any, out_dir: Path, student: VisionEncoder, target: VisionEncoder) -> KueaImages:
        """List ``recipe.data.train`` and attach the target cache (unless ``recipe.live_target``)."""
        from align.data.readers import open_data

        if not recipe.data.train:
            raise ValueError("data.train: no training images given (set data.train=PATH)")
        source = open_data(recipe.data.train, split=recipe.data.split, on_error=recipe.data.on_error)
        if len(set(s.id for s in source.samples)) != len(source.samples):
            raise ValueError(
                f"{recipe.data.train}: sample ids are not unique; the target cache is keyed by id"
            )
        cache = None if recipe.live_target else target_cache(recipe, out_dir, target, source)
        return cls(source.samples, student, target, cache)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        from align.data.images import open_image

        image = open_image(self.samples[index].image)
        item = {"pixels": self.student_preprocess([image])[0]}
        if self.cache is not None:
            item["target"] = self.cache.get([self.rows[index]])[0]
        else:
            item["target_pixels"] = self.target_preprocess([image])[0]
        return item
