"""Tiny multimodal LLMs for the embedded default and the tests, written in their real checkpoint formats.

Registered as ``mllm_swap.tiny_models`` entry points (``pyproject.toml``), so the library finds them by id
through :mod:`align.embedded` without importing this module; only tests import it.

``tiny-llava`` (HF ``LlavaForConditionalGeneration`` + ``LlavaProcessor``), ``tiny-llava-original``
(LLaVA-1.5's own layout: ``llava_llama`` config, ``mm_*`` keys, ``model.mm_projector.*``),
``tiny-idefics`` (HF ``IdeficsForVisionText2Text`` + processor) and ``tiny-openflamingo`` (an OpenFlamingo
state dict whose ``vision_encoder.*`` is tiny-openclip's visual). Every tower carries the SAME weights as
the tiny encoder it was made from, so a drop-in of that encoder is an identity swap. Models are random
(untrained): they exist to exercise loading, swapping and generation code paths, not to answer questions.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from align.embedded import build_once, tiny_model_dir
from align.encoders.base import OPENAI_MEAN, OPENAI_STD
from align.encoders.tokenizer import build_bpe_tokenizer
from mllm_swap.chat_templates import DEFAULT_CHAT_TEMPLATE
from mllm_swap.families.openflamingo import PREFIX

TINY_MLLM_VERSION = 3  # 2: chat template renders string content; 3: tiny-llava records tiny-clip, not a path
LLM = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
IDEFICS_TOKENS = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>"}


def _llama_config(tok, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **LLM,
        **extra,
    )


def _clip_tower_state(clip_dir: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """tiny-clip's vision config and its ``CLIPVisionModel`` state dict (flat 5.x keys)."""
    from transformers import CLIPVisionModel

    from mllm_swap.families.base import quiet_transformers

    with quiet_transformers():
        tower = CLIPVisionModel.from_pretrained(clip_dir)
    tower.config._name_or_path = clip_dir.name  # its tiny id, not this machine's path
    return tower.config, tower.state_dict()


def build_tiny_llava(out: Path) -> None:
    """HF Llava: Llama (2 layers, width 64) + tiny-clip's vision tower, layer -2, "default", gelu MLP."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mllm_swap.families.base import save_checkpoint

    clip_dir = tiny_model_dir("tiny-clip")
    vision_config, tower_state = _clip_tower_state(clip_dir)
    tok = build_bpe_tokenizer(extra_special_tokens={"image_token": "<image>"})
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=_llama_config(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=patches,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tok.pad_token_id,
    )
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower_state, strict=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor.from_pretrained(clip_dir),
        tokenizer=tok,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )
    save_checkpoint(model, processor, out)


def build_tiny_llava_original(out: Path) -> None:
    """LLaVA-1.5's own layout: ``llava_llama`` config with ``mm_*`` keys, tower rebuilt from tiny-clip's dir.

    The tokenizer has no ``<image>`` token (upstream marks the image with index -200 and splices the
    features in); the tower's weights are stored in the checkpoint as upstream saves them, but the
    loader takes the tower from ``mm_vision_tower``.
    """
    from transformers import CLIPImageProcessor, LlamaForCausalLM

    clip_dir = tiny_model_dir("tiny-clip")
    vision_config, tower_state = _clip_tower_state(clip_dir)
    tok = build_bpe_tokenizer()
    llama_config = _llama_config(tok)
    lm = LlamaForCausalLM(llama_config)
    width, hidden = vision_config.hidden_size, llama_config.hidden_size
    projector = torch.nn.Sequential(
        torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden)
    )
    state = dict(lm.state_dict())
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    state.update({f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in tower_state.items()})
    config = llama_config.to_dict()
    config.update(
        architectures=["LlavaLlamaForCausalLM"],
        model_type="llava_llama",
        mm_vision_tower=str(clip_dir),
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=width,
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        image_aspect_ratio="pad",
        use_mm_proj=True,
        tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
        unfreeze_mm_vision_tower=False,
        tokenizer_model_max_length=tok.model_max_length,
        tokenizer_padding_side="right",
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), {"format": "pt"})
    tok.save_pretrained(out)
    # Upstream takes the image processor from the tower directory; a copy here documents what was used.
    CLIPImageProcessor.from_pretrained(clip_dir).save_pretrained(out)


def build_tiny_idefics(out: Path) -> None:
    """HF IDEFICS (v1): Llama-style decoder with gated cross-attention every layer, a perceiver resampler
    (8 latents) and a CLIP-architecture tower with tiny-clip's shape and weights."""
    from transformers import (
        IdeficsConfig,
        IdeficsForVisionText2Text,
        IdeficsImageProcessor,
        IdeficsProcessor,
    )

    clip_dir = tiny_model_dir("tiny-clip")
    clip_config, tower_state = _clip_tower_state(clip_dir)
    tok = build_bpe_tokenizer(extra_special_tokens=IDEFICS_TOKENS)
    vision = dict(
        embed_dim=clip_config.hidden_size,
        image_size=clip_config.image_size,
        patch_size=clip_config.patch_size,
        num_hidden_layers=clip_config.num_hidden_layers,
        num_attention_heads=clip_config.num_attention_heads,
        intermediate_size=clip_config.intermediate_size,
        hidden_act=clip_config.hidden_act,
        layer_norm_eps=clip_config.layer_norm_eps,
    )
    config = IdeficsConfig(
        vocab_size=len(tok),
        hidden_size=LLM["hidden_size"],
        intermediate_size=LLM["intermediate_size"],
        num_hidden_layers=LLM["num_hidden_layers"],
        num_attention_heads=LLM["num_attention_heads"],
        max_position_embeddings=LLM["max_position_embeddings"],
        cross_layer_interval=1,
        vision_config=vision,
        perceiver_config=dict(
            use_resampler=True,
            resampler_n_latents=8,
            resampler_depth=1,
            resampler_n_heads=2,
            resampler_head_dim=16,
        ),
        use_resampler=True,
        alpha_initializer="normal",  # non-zero gates: the image must reach the text (zeros = blind model)
        alpha_type="vector",
        alphas_initializer_range=0.5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = IdeficsForVisionText2Text(config)
    model.model.vision_model.load_state_dict(tower_state, strict=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    image_processor = IdeficsImageProcessor(
        image_size=clip_config.image_size,
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )
    processor = IdeficsProcessor(
        image_processor=image_processor, tokenizer=tok, image_size=clip_config.image_size
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def tiny_openflamingo_state(
    clip_dir: Path,
    latents: int = 8,
    depth: int = 1,
    heads: int = 2,
    dim_head: int = 16,
    lm_width: int = 64,
    lm_layers: int = 2,
    vocab: int = 512,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A tiny OpenFlamingo state dict: tiny-openclip's visual + random perceiver and gated-xattn MPT-style LM,
    with OpenFlamingo's key names and shapes (``PerceiverResampler``, ``GatedCrossAttentionBlock``)."""
    from align.encoders.openclip import load_openclip

    model, _, _ = load_openclip(clip_dir)
    vis = model.visual.transformer.width
    state = {PREFIX + k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    inner = heads * dim_head

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape) * 0.02

    state["perceiver.latents"] = torch.randn(latents, vis)
    for i in range(depth):
        p = f"perceiver.layers.{i}."
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = torch.ones(vis), torch.zeros(vis)
        state[p + "0.to_q.weight"], state[p + "0.to_kv.weight"] = rnd(inner, vis), rnd(2 * inner, vis)
        state[p + "0.to_out.weight"], state[p + "1.1.weight"], state[p + "1.3.weight"] = (
            rnd(vis, inner),
            rnd(4 * vis, vis),
            rnd(vis, 4 * vis),
        )
    state["perceiver.norm.weight"], state["perceiver.norm.bias"] = torch.ones(vis), torch.zeros(vis)
    lm = "lang_encoder."
    state[lm + "transformer.wte.weight"] = rnd(vocab, lm_width)
    for i in range(lm_layers):
        b, x = f"{lm}transformer.blocks.{i}.", f"{lm}gated_cross_attn_layers.{i}."
        state[b + "norm_1.weight"], state[b + "norm_2.weight"] = torch.ones(lm_width), torch.ones(lm_width)
        state[b + "attn.Wqkv.weight"], state[b + "attn.out_proj.weight"] = (
            rnd(3 * lm_width, lm_width),
            rnd(lm_width, lm_width),
        )
        state[b + "ffn.up_proj.weight"], state[b + "ffn.down_proj.weight"] = (
            rnd(4 * lm_width, lm_width),
            rnd(lm_width, 4 * lm_width),
        )
        state[x + "attn.norm.weight"], state[x + "attn.norm.bias"] = (
            torch.ones(lm_width),
            torch.zeros(lm_width),
        )
        state[x + "attn.to_q.weight"], state[x + "attn.to_kv.weight"] = (
            rnd(inner, lm_width),
            rnd(2 * inner, vis),
        )
        state[x + "attn.to_out.weight"] = rnd(lm_width, inner)
        state[x + "attn_gate"], state[x + "ff_gate"] = torch.zeros(1), torch.zeros(1)
        state[x + "ff.0.weight"], state[x + "ff.0.bias"] = torch.ones(lm_width), torch.zeros(lm_width)
        state[x + "ff.1.weight"], state[x + "ff.3.weight"] = (
            rnd(4 * lm_width, lm_width),
            rnd(lm_width, 4 * lm_width),
        )
    state[lm + "transformer.norm_f.weight"] = torch.ones(lm_width)
    meta = {
        "format": "openflamingo",
        "clip_vision_encoder_path": f"local-dir:{clip_dir}",
        "clip_vision_encoder_pretrained": None,
        "cross_attn_every_n_layers": 1,
        "vis_dim": vis,
        "note": "tiny test checkpoint: perceiver and language model are random (the language model is an "
        "MPT-style state dict without an HF config of its own)",
    }
    return {k: v.contiguous() for k, v in state.items()}, meta


def build_tiny_openflamingo(out: Path) -> None:
    """An OpenFlamingo-format checkpoint: tiny-openclip's visual as ``vision_encoder.*``, a random perceiver
    resampler and a random gated-cross-attention LM state dict (see ``families.openflamingo``)."""
    clip_dir = tiny_model_dir("tiny-openclip")
    state, meta = tiny_openflamingo_state(clip_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "checkpoint.safetensors"), {"format": "pt"})
    (out / "openflamingo.json").write_text(json.dumps(meta, indent=2) + "\n")


TINY_MLLM_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llava": build_tiny_llava,
    "tiny-llava-original": build_tiny_llava_original,
    "tiny-idefics": build_tiny_idefics,
    "tiny-openflamingo": build_tiny_openflamingo,
}


def ensure_tiny_mllm(name: str) -> Path:
    """Directory of the tiny MLLM ``name`` under ``align.paths.models_dir()``, built (atomically) on first use."""
    if name not in TINY_MLLM_BUILDERS:
        raise KeyError(f"unknown tiny MLLM '{name}'; expected one of {sorted(TINY_MLLM_BUILDERS)}")
    return build_once(name, TINY_MLLM_BUILDERS[name], version=TINY_MLLM_VERSION)
