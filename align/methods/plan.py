"""The cost stages of an alignment recipe (:mod:`align.cost`), built at the real configs on the meta device.

Each recipe is read with its own method's loader (``load_recipe`` of the :data:`~align.methods.METHODS`
module); the models are the shipped configs of its hub ids (:mod:`align.model_configs`):

* KUEA: the CLIP student trains (``freeze_blocks`` as the method freezes them), its frozen copy runs forward
  for the anchor, the target runs forward every step (``live_target``) or once per image into a cache;
* SAIL / freeze_align: both encoders run once per sample into caches (an ``encode`` stage), then the
  heads train on the cached features (SAIL: pooled ``[CLS ; mean]`` and one sentence embedding per caption;
  freeze_align: every token).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

from align.cost import Part, Stage
from align.errors import UserError
from align.io import read_json
from align.methods import METHODS
from align.model_configs import build_meta, config_dir, meta_vision_encoder, shipped_config

__all__ = ["align_stages", "read_align_recipe"]

TEXT_TOKENS = 77  # tokens per caption assumed for encoding text (CLIP's context length)


def read_align_recipe(path: str | os.PathLike, overrides: list[str]) -> tuple[str, Any] | None:
    """``(method, recipe)`` for the one method whose loader accepts the file, or ``None`` if none does."""
    found = []
    for name, entry in METHODS.items():
        try:
            found.append((name, importlib.import_module(entry.module).load_recipe(path, overrides)))
        except (ValueError, TypeError):
            continue
    return found[0] if len(found) == 1 else None


def _image_tokens(encoder: Any) -> int:
    return encoder.num_prefix_tokens + (encoder.image_size // encoder.patch_size) ** 2


def _vision_part(name: str, encoder: Any, grad_flows: bool = False) -> Part:
    return Part(name, encoder, _image_tokens(encoder), encoder.num_layers, encoder.embed_dim, grad_flows)


def _text_part(hub_id: str, captions: int, notes: list[str]) -> Part | None:
    """The frozen text encoder encoding ``captions`` captions per sample (``None``, with a note, when its
    shipped config is custom code transformers cannot build)."""
    try:
        config = shipped_config(hub_id)
    except UserError as err:
        notes.append(f"text encoder not built: {err}")
        return None
    model = build_meta(config).requires_grad_(False)
    return Part(f"text {hub_id}", model, TEXT_TOKENS * captions, config.num_hidden_layers, config.hidden_size)


def _kuea(recipe: Any, dataset_size: int | None) -> list[Stage]:
    from align.kernels import build_kernel
    from align.methods.kuea.recipe import freeze_early_blocks

    student = meta_vision_encoder(recipe.student).requires_grad_(True)
    freeze_early_blocks(student, recipe.freeze_blocks)
    original = meta_vision_encoder(recipe.student).requires_grad_(False)
    target = meta_vision_encoder(recipe.target).requires_grad_(False)
    kc = recipe.kernel
    with torch.device("meta"):
        kernel = build_kernel(kc.name, student.projection_dim, "student", **kc.student)
    parts = [
        _vision_part(f"student {recipe.student}", student, grad_flows=True),
        _vision_part("frozen student copy (anchor)", original),
        Part("student kernel", kernel, 0),
    ]
    t, notes = recipe.train, []
    if recipe.live_target:
        parts.append(_vision_part(f"target {recipe.target}", target))
    else:
        notes.append(f"target {recipe.target} cached once per image: see the 'encode target' stage")
    stages = [
        Stage("train", parts, t.batch_size, t.grad_accum, t.steps, t.epochs, dataset_size, t.optimizer,
              t.gradient_checkpointing, image_tokens=parts[0].tokens, notes=notes)
    ]  # fmt: skip
    if not recipe.live_target:
        stages.insert(0, Stage("encode target", [_vision_part(f"target {recipe.target}", target)],
                               recipe.data.encode_batch_size, trains=False, epochs=1.0, dataset_size=dataset_size,
                               image_tokens=_image_tokens(target), notes=["one pass over the images"]))  # fmt: skip
    return stages


def _frozen_pairs(name: str, recipe: Any, dataset_size: int | None) -> list[Stage]:
    from align.heads import build_text_head, build_token_head

    entry = METHODS[name]
    method_class = getattr(importlib.import_module(entry.module), entry.method)
    method = method_class.__new__(method_class)  # not set up (no caches): only its head_settings() is read
    method.recipe = recipe
    captions = len(recipe.data.captions) if name == "sail" else 1
    vision = meta_vision_encoder(recipe.vision).requires_grad_(False)
    notes: list[str] = []
    text = _text_part(recipe.text, captions, notes)
    text_dim = text.width if text else int(read_json(config_dir(recipe.text) / "config.json")["hidden_size"])
    settings = method.head_settings()
    with torch.device("meta"):
        image_head = build_token_head(
            {**settings, "in_dim": vision.embed_dim, "num_prefix_tokens": vision.num_prefix_tokens}
        )
        text_head = build_text_head({**settings, "in_dim": text_dim})
    tokens = _image_tokens(vision)
    image_head_tokens = 1 if name == "sail" else tokens  # SAIL: the pooled [CLS ; mean] feature
    text_head_tokens = captions if name == "sail" else recipe.data.max_tokens * captions
    t = recipe.train
    encode = [_vision_part(f"vision {recipe.vision}", vision)] + ([text] if text else [])
    encode_notes = [f"{captions} caption(s) per sample, {TEXT_TOKENS} text tokens each (assumed)"]
    heads = [
        Part("image head", image_head, image_head_tokens, grad_flows=True),
        Part("text head", text_head, text_head_tokens, grad_flows=True),
    ]
    return [
        Stage("encode (caches)", encode, t.batch_size, trains=False, epochs=1.0, dataset_size=dataset_size,
              image_tokens=tokens, notes=encode_notes + notes),
        Stage("train heads", heads, t.batch_size, t.grad_accum, t.steps, t.epochs, dataset_size, t.optimizer,
              False, image_tokens=tokens, notes=["encoders frozen and cached: not in GPU memory while training"]),
    ]  # fmt: skip


def align_stages(name: str, recipe: Any, dataset_size: int | None = None) -> list[Stage]:
    """The cost stages of alignment method ``name``'s ``recipe`` (``dataset_size``: samples per epoch)."""
    return _kuea(recipe, dataset_size) if name == "kuea" else _frozen_pairs(name, recipe, dataset_size)
