"""HF ``CLIPModel`` <-> open_clip ``CLIP`` state-dict conversion (both towers, or the vision tower alone).

Keys map one to one except attention: open_clip's fused ``in_proj`` splits into HF's ``q/k/v_proj`` and
back; projections are transposed. A weight with no counterpart raises :class:`UnsupportedModelError`
(which structures convert: :mod:`align.clip_convert`).
"""

from __future__ import annotations

import torch

__all__ = ["UnsupportedModelError", "hf_to_openclip_state_dict", "openclip_to_hf_state_dict"]

# per-block names: open_clip resblock key -> HF encoder-layer key (attention in_proj handled apart)
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_VISION = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}


class UnsupportedModelError(ValueError):
    """A model whose structure has no counterpart in the other library."""


def _blocks_to_hf(sd: dict, src: str, dst: str, layers: int, out: dict) -> None:
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        qkv_w, qkv_b = sd.pop(s + "attn.in_proj_weight"), sd.pop(s + "attn.in_proj_bias")
        for name, w, b in zip(("q", "k", "v"), qkv_w.chunk(3), qkv_b.chunk(3), strict=True):
            out[f"{d}self_attn.{name}_proj.weight"] = w.clone()
            out[f"{d}self_attn.{name}_proj.bias"] = b.clone()
        for oc, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{d}{hf}.{p}"] = sd.pop(f"{s}{oc}.{p}")


def _blocks_to_openclip(sd: dict, src: str, dst: str, layers: int, out: dict) -> None:
    for i in range(layers):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for p in ("weight", "bias"):
            out[f"{d}attn.in_proj_{p}"] = torch.cat([sd.pop(f"{s}self_attn.{n}_proj.{p}") for n in "qkv"])
        for oc, hf in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{d}{oc}.{p}"] = sd.pop(f"{s}{hf}.{p}")


def _count_layers(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def _leftovers(sd: dict, where: str) -> None:
    rest = sorted(k for k in sd if not k.endswith("position_ids") and k != "attn_mask")
    if rest:
        raise UnsupportedModelError(
            f"{where}: {len(rest)} weight(s) have no counterpart in the conversion (e.g. {rest[:4]}); "
            "only standard ViT CLIP towers convert (see align.clip_convert)"
        )


def openclip_to_hf_state_dict(
    state_dict: dict[str, torch.Tensor], text: bool = True
) -> dict[str, torch.Tensor]:
    """open_clip ``CLIP`` keys (``visual.*`` and text keys) -> HF ``CLIPModel`` keys.

    With ``text=False`` only the vision tower is converted (``vision_model.*``, ``visual_projection``);
    text keys are then ignored. Unknown vision keys raise :class:`UnsupportedModelError`.
    """
    sd = {k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    visual = {k[len("visual.") :]: sd.pop(k) for k in list(sd) if k.startswith("visual.")}
    if not visual:
        raise UnsupportedModelError("open_clip state dict: no 'visual.*' weights found")
    _blocks_to_hf(visual, "transformer.resblocks.", "vision_model.encoder.layers.",
                  _count_layers(visual, "transformer.resblocks."), out)  # fmt: skip
    for oc, hf in _VISION.items():
        if oc not in visual:
            raise UnsupportedModelError(f"open_clip visual: missing '{oc}' (not a standard CLIP ViT)")
        out["vision_model." + hf] = visual.pop(oc)
    out["visual_projection.weight"] = visual.pop("proj").T.contiguous()
    _leftovers(visual, "open_clip visual")
    if not text:
        return out
    _blocks_to_hf(sd, "transformer.resblocks.", "text_model.encoder.layers.",
                  _count_layers(sd, "transformer.resblocks."), out)  # fmt: skip
    for oc, hf in _TEXT.items():
        out["text_model." + hf] = sd.pop(oc)
    out["text_projection.weight"] = sd.pop("text_projection").T.contiguous()
    out["logit_scale"] = sd.pop("logit_scale").reshape(())
    _leftovers(sd, "open_clip text tower")
    return out


def hf_to_openclip_state_dict(
    state_dict: dict[str, torch.Tensor], text: bool = True
) -> dict[str, torch.Tensor]:
    """HF ``CLIPModel`` / ``CLIPVisionModelWithProjection`` keys -> open_clip ``CLIP`` keys.

    With ``text=False`` only ``visual.*`` keys are produced (text keys, if any, are ignored).
    """
    sd = {k: v for k, v in state_dict.items()}
    out: dict[str, torch.Tensor] = {}
    vision = {k[len("vision_model.") :]: sd.pop(k) for k in list(sd) if k.startswith("vision_model.")}
    if not vision or "visual_projection.weight" not in sd:
        raise UnsupportedModelError(
            "HF state dict: expected 'vision_model.*' and 'visual_projection.weight' (a CLIPModel or "
            "CLIPVisionModelWithProjection)"
        )
    _blocks_to_openclip(vision, "encoder.layers.", "visual.transformer.resblocks.",
                        _count_layers(vision, "encoder.layers."), out)  # fmt: skip
    for oc, hf in _VISION.items():
        out["visual." + oc] = vision.pop(hf)
    out["visual.proj"] = sd.pop("visual_projection.weight").T.contiguous()
    _leftovers(vision, "HF vision_model")
    if not text:
        return out
    textsd = {k[len("text_model.") :]: sd.pop(k) for k in list(sd) if k.startswith("text_model.")}
    if not textsd:
        raise UnsupportedModelError(
            "HF state dict: no 'text_model.*' weights (pass text=False for vision only)"
        )
    _blocks_to_openclip(textsd, "encoder.layers.", "transformer.resblocks.",
                        _count_layers(textsd, "encoder.layers."), out)  # fmt: skip
    for oc, hf in _TEXT.items():
        out[oc] = textsd.pop(hf)
    out["text_projection"] = sd.pop("text_projection.weight").T.contiguous()
    out["logit_scale"] = sd.pop("logit_scale").reshape(())
    _leftovers({**textsd, **sd}, "HF text_model")
    return out
