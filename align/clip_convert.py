"""HF ``CLIPModel`` <-> open_clip ``CLIP`` conversion of whole models: configs, tokenizers, processors,
directories (the weights: :mod:`align.clip_state_dict`).

Supported: ViT CLIP models with standard pre-norm blocks (OpenAI CLIP, LAION/DFN/MetaCLIP ViTs):
class-token pooling, ``ln_pre``, no layer scale, no attentional pooler, bias-free linear projections,
QuickGELU or exact GELU. Both towers convert; text pooling maps ``argmax`` (OpenAI vocab) <->
HF's legacy ``eos_token_id == 2`` and ``eos`` <-> HF's first-eos pooling. Tokenizers travel with
the weights: open_clip's built-in BPE becomes an HF ``CLIPTokenizer`` with the same ids, and any
HF tokenizer is stored next to the open_clip weights (``text_cfg.hf_tokenizer_name``). Not
supported (clear error): timm/ResNet towers (e.g. open_clip SigLIP), CoCa, custom attention blocks.

An open_clip export directory holds ``open_clip_config.json`` + ``open_clip_model.safetensors``
(load with ``create_model_and_transforms("local-dir:DIR")`` and ``get_tokenizer("local-dir:DIR")``) and
``<name>.json``, a model-config JSON for a named architecture: ``open_clip.add_model_config(DIR /
"<name>.json")`` then ``create_model_and_transforms("<name>", pretrained=str(DIR /
"open_clip_model.safetensors"))``. The directory travels: an HF tokenizer stored in it is named
``hf_tokenizer_name: "."``, which open_clip resolves to the directory itself under ``local-dir:``
(with a named config, take the tokenizer from ``get_tokenizer("local-dir:DIR")``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from align.clip_state_dict import (
    UnsupportedModelError,
    hf_to_openclip_state_dict,
    openclip_to_hf_state_dict,
)
from align.io import atomic_path

OPENAI_VOCAB, OPENAI_EOT = 49408, 49407


# ----------------------------------------------------------------------------- configs


def openclip_config_from_hf(config: Any, tokenizer_dir: str | None = None) -> dict[str, Any]:
    """An open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) for an HF ``CLIPConfig``."""
    v, t = config.vision_config, config.text_config
    if v.hidden_act != t.hidden_act or v.hidden_act not in ("quick_gelu", "gelu"):
        raise UnsupportedModelError(
            f"HF CLIP activations vision={v.hidden_act!r} text={t.hidden_act!r}: open_clip needs one "
            "activation for both towers, 'quick_gelu' or 'gelu'"
        )
    text_cfg: dict[str, Any] = {
        "context_length": t.max_position_embeddings,
        "vocab_size": t.vocab_size,
        "width": t.hidden_size,
        "heads": t.num_attention_heads,
        "layers": t.num_hidden_layers,
        "mlp_ratio": t.intermediate_size / t.hidden_size,
    }
    if t.eos_token_id == 2:  # HF legacy: pool at the highest token id (OpenAI's end-of-text)
        text_cfg["pool_type"] = "argmax"
    else:
        text_cfg.update(pool_type="eos", eos_id=int(t.eos_token_id))
    if tokenizer_dir is not None:
        text_cfg["hf_tokenizer_name"] = str(tokenizer_dir)
    return {
        "embed_dim": config.projection_dim,
        "quick_gelu": v.hidden_act == "quick_gelu",
        "vision_cfg": {
            "image_size": v.image_size,
            "layers": v.num_hidden_layers,
            "width": v.hidden_size,
            "head_width": v.hidden_size // v.num_attention_heads,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
            "patch_size": v.patch_size,
        },
        "text_cfg": text_cfg,
    }


def openclip_config_from_model(model: torch.nn.Module) -> dict[str, Any]:
    """Read the architecture of an instantiated open_clip ``CLIP`` (checks it is convertible)."""
    visual = getattr(model, "visual", None)
    if type(model).__name__ != "CLIP" or type(visual).__name__ != "VisionTransformer":
        raise UnsupportedModelError(
            f"open_clip model {type(model).__name__} with visual {type(visual).__name__}: only CLIP with a "
            "VisionTransformer tower converts to HF CLIP (timm/ResNet/CoCa towers do not)"
        )
    block = visual.transformer.resblocks[0]
    checks = {
        "attentional pooler": visual.attn_pool is not None,
        f"pool_type {visual.pool_type!r}": visual.pool_type != "tok",
        "final_ln_after_pool": visual.final_ln_after_pool,
        "no ln_pre": isinstance(visual.ln_pre, torch.nn.Identity),
        "layer scale": not isinstance(getattr(block, "ls_1", torch.nn.Identity()), torch.nn.Identity),
        "custom attention block": not isinstance(getattr(block, "attn", None), torch.nn.MultiheadAttention),
        "linear text projection": not isinstance(model.text_projection, torch.nn.Parameter),
        f"text pool {model.text_pool_type!r}": model.text_pool_type not in ("argmax", "eos"),
    }
    bad = [name for name, hit in checks.items() if hit]
    if bad:
        raise UnsupportedModelError(f"open_clip model has features HF CLIP lacks: {', '.join(bad)}")
    gelu = type(block.mlp.gelu).__name__
    width = visual.transformer.width
    tblock = model.transformer.resblocks[0]
    text_cfg = {
        "context_length": model.positional_embedding.shape[0],
        "vocab_size": model.token_embedding.num_embeddings,
        "width": model.transformer.width,
        "heads": tblock.attn.num_heads,
        "layers": len(model.transformer.resblocks),
        "mlp_ratio": tblock.mlp.c_fc.out_features / model.transformer.width,
        "pool_type": model.text_pool_type,
    }
    if model.text_pool_type == "eos":
        text_cfg["eos_id"] = int(model.text_eos_id)
    return {
        "embed_dim": visual.proj.shape[1],
        "quick_gelu": gelu == "QuickGELU",
        "vision_cfg": {
            "image_size": visual.image_size[0],
            "layers": len(visual.transformer.resblocks),
            "width": width,
            "head_width": width // block.attn.num_heads,
            "mlp_ratio": block.mlp.c_fc.out_features / width,
            "patch_size": visual.patch_size[0],
        },
        "text_cfg": text_cfg,
    }


def hf_config_from_openclip(model_cfg: dict[str, Any]):
    """An HF ``CLIPConfig`` equivalent to an open_clip model config."""
    from transformers import CLIPConfig

    v, t = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    pool = t.get("pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise UnsupportedModelError(
            f"open_clip text pool_type {pool!r}: HF CLIP pools at an end-of-text token"
        )
    vocab = t.get("vocab_size", OPENAI_VOCAB)
    eos = 2 if pool == "argmax" else int(t.get("eos_id", 2))
    common = {"hidden_act": act, "projection_dim": model_cfg["embed_dim"]}
    text = dict(
        common,
        vocab_size=vocab,
        hidden_size=t["width"],
        intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=t["layers"],
        num_attention_heads=t["heads"],
        max_position_embeddings=t.get("context_length", 77),
        eos_token_id=eos,
    )
    vision = dict(
        common,
        hidden_size=v["width"],
        intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=v["layers"],
        num_attention_heads=v["width"] // v.get("head_width", 64),
        image_size=v["image_size"],
        patch_size=v["patch_size"],
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=model_cfg["embed_dim"])


# ----------------------------------------------------------------------------- tokenizers, processors


def hf_tokenizer_from_simple(simple: Any):
    """An HF ``CLIPTokenizer`` with the same vocabulary, merges and ids as open_clip's ``SimpleTokenizer``."""
    from transformers import CLIPTokenizer

    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): idx for tok, idx in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = simple.context_length
    return tok


def is_openai_tokenizer(tokenizer: Any) -> bool:
    """True when an HF tokenizer is OpenAI CLIP's BPE (open_clip's default tokenizer is the same)."""
    return len(tokenizer) == OPENAI_VOCAB and tokenizer.convert_tokens_to_ids("<|endoftext|>") == OPENAI_EOT


def image_processor_from_preprocess(cfg: dict[str, Any]):
    """A ``CLIPImageProcessor`` for an open_clip preprocess config (shortest-edge resize, centre crop)."""
    from transformers import CLIPImageProcessor

    size = cfg["size"][0] if isinstance(cfg["size"], list | tuple) else int(cfg["size"])
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(cfg["mean"]),
        image_std=list(cfg["std"]),
    )


def preprocess_from_image_processor(processor: Any) -> dict[str, Any]:
    """open_clip preprocess config (``size``, ``mean``, ``std``, ``interpolation``, ``resize_mode``)."""
    crop = processor.crop_size or {}
    size = crop.get("height") or processor.size.get("shortest_edge") or processor.size.get("height")
    return {
        "size": int(size),
        "mean": list(processor.image_mean),
        "std": list(processor.image_std),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


# ----------------------------------------------------------------------------- whole models on disk


def save_openclip(
    out: str | os.PathLike,
    model_cfg: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    preprocess_cfg: dict[str, Any],
    tokenizer: Any = None,
    name: str = "exported-clip",
) -> Path:
    """Write an open_clip export directory atomically (see module doc); returns it.

    ``tokenizer``: an HF tokenizer to store beside the weights (``None`` or OpenAI's BPE: open_clip's
    own tokenizer is used).
    """
    out = Path(out)
    cfg = json.loads(json.dumps(model_cfg))
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        if tokenizer is not None and not is_openai_tokenizer(tokenizer):
            tokenizer.save_pretrained(tmp)
            cfg["text_cfg"]["hf_tokenizer_name"] = "."  # this directory: see the module doc
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if k != "attn_mask"}
        save_file(tensors, str(tmp / "open_clip_model.safetensors"))
        (tmp / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
        )
        (tmp / f"{name}.json").write_text(json.dumps(cfg, indent=2))
    return out


def hf_clip_to_openclip_dir(
    model: Any, processor: Any, tokenizer: Any, out: str | os.PathLike, name: str = "exported-clip"
) -> Path:
    """Export an HF ``CLIPModel`` (+ its image processor and tokenizer) as an open_clip directory."""
    cfg = openclip_config_from_hf(model.config)
    sd = hf_to_openclip_state_dict(model.state_dict())
    return save_openclip(out, cfg, sd, preprocess_from_image_processor(processor), tokenizer, name)


def openclip_to_hf_clip(model: torch.nn.Module) -> Any:
    """An HF ``CLIPModel`` with the weights of an open_clip ``CLIP`` (same outputs, both towers)."""
    from transformers import CLIPModel

    cfg = openclip_config_from_model(model)
    hf = CLIPModel(hf_config_from_openclip(cfg)).eval()
    missing, unexpected = hf.load_state_dict(openclip_to_hf_state_dict(model.state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise UnsupportedModelError(f"open_clip -> HF: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return hf


def openclip_to_hf_dir(model: torch.nn.Module, tokenizer: Any, out: str | os.PathLike) -> Path:
    """Write an HF ``CLIPModel`` directory (weights, tokenizer, ``CLIPImageProcessor``) from open_clip."""
    from open_clip.model import get_model_preprocess_cfg

    hf = openclip_to_hf_clip(model)
    hf_tok = tokenizer.tokenizer if hasattr(tokenizer, "tokenizer") else hf_tokenizer_from_simple(tokenizer)
    processor = image_processor_from_preprocess(get_model_preprocess_cfg(model))
    out = Path(out)
    with atomic_path(out) as tmp:
        hf.save_pretrained(tmp)
        hf_tok.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
