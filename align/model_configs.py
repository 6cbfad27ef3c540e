"""Shipped ``config.json`` (and preprocessor config) files of the hub models the recipes name, so real
architectures build offline on the meta device (no weights): ``model_configs/<org>/<name>/``.

``shipped_config("facebook/dinov2-large")`` is the transformers config; :func:`build_meta` the model with
every tensor on the meta device (exact shapes and parameter counts, no memory). Models whose hub config
names a custom type (remote code) are built as the transformers architecture they are made of
(:data:`BUILT_AS`), or refused when there is none (``Alibaba-NLP/gte-large-en-v1.5``, model type ``new``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.errors import UserError
from align.io import read_json
from align.paths import shipped

__all__ = ["BUILT_AS", "build_meta", "config_dir", "meta_vision_encoder", "shipped_config", "shipped_ids"]

# custom model type -> (the sub-config holding the transformers part, or None for the top level; its model type)
BUILT_AS: dict[str, tuple[str | None, str]] = {
    "nvembed": ("text_config", "mistral"),  # NV-Embed-v2: its Mistral-7B text model (latent pooling left out)
    "llava_llama": (None, "llama"),  # original LLaVA checkpoints: the LLM (tower and projector named by mm_* keys)
}


def shipped_ids() -> list[str]:
    """Every hub id with a shipped config (``org/name``), sorted."""
    root = shipped("model_configs")
    return sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/*/config.json"))


def config_dir(hub_id: str) -> Path:
    """The shipped folder of ``hub_id``; :class:`UserError` naming the shipped ids when there is none."""
    folder = shipped("model_configs") / hub_id
    if hub_id.count("/") != 1 or not (folder / "config.json").is_file():
        raise UserError(f"no shipped config for '{hub_id}'; shipped: {', '.join(shipped_ids())}")
    return folder


def shipped_config(hub_id: str) -> Any:
    """The transformers ``PretrainedConfig`` of ``hub_id`` from its shipped ``config.json`` (offline)."""
    from transformers import AutoConfig

    folder = config_dir(hub_id)
    raw = read_json(folder / "config.json")
    kind = raw.get("model_type")
    if kind in BUILT_AS:
        section, model_type = BUILT_AS[kind]
        values = dict(raw[section] if section else raw)
        values.pop("model_type", None)
        keep = {k: v for k, v in values.items() if not k.startswith(("mm_", "_"))}
        return AutoConfig.for_model(model_type, **keep)
    from transformers import CONFIG_MAPPING

    if kind not in CONFIG_MAPPING:
        raise UserError(
            f"{folder / 'config.json'}: model type '{kind}' of '{hub_id}' is custom code that transformers "
            "does not ship; its architecture facts are recorded there but it cannot be built here"
        )
    return AutoConfig.from_pretrained(str(folder))


def build_meta(config: Any, model_class: Any = None) -> Any:
    """``model_class`` (default ``AutoModel``) built from ``config`` with every tensor on the meta device."""
    import torch
    from transformers import AutoModel

    model_class = model_class or AutoModel
    build = getattr(model_class, "from_config", None) or model_class._from_config  # Auto classes / model classes
    with torch.device("meta"):
        return build(config)


def meta_vision_encoder(hub_id: str) -> Any:
    """The :class:`~align.encoders.hf_vision.HFVisionEncoder` of ``hub_id`` on the meta device, with its
    shipped image processor (so ``image_size``, prefix tokens and freezing rules are the real ones)."""
    import transformers

    from align.encoders.hf_vision import VISION_MODEL_TYPES, HFVisionEncoder, hf_preprocess

    config = shipped_config(hub_id)
    if config.model_type not in VISION_MODEL_TYPES:
        raise UserError(f"'{hub_id}' is a '{config.model_type}' model, not a vision encoder")
    class_name, kind = VISION_MODEL_TYPES[config.model_type]
    tower = getattr(config, "vision_config", config)
    model = build_meta(tower, getattr(transformers, class_name))
    preprocess = hf_preprocess(str(config_dir(hub_id)), model.config, {})
    return HFVisionEncoder(model, kind, preprocess, hub_id)
