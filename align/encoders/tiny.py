"""The embedded default's tiny encoders: built deterministically, written in their real formats.

Each builder writes a directory that the ordinary loaders read (HF ``from_pretrained``, open_clip's
``local-dir:``, sentence-transformers folders), so tiny models exercise the same code as real checkpoints.
All vision models take 64x64 images with patch size 8 (64 patches).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from align.embedded import build_once
from align.encoders.tokenizer import build_bpe_tokenizer, build_wordpiece_tokenizer

IMAGE_SIZE, PATCH_SIZE = 64, 8
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
CLIP_VISION = dict(
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=IMAGE_SIZE,
    patch_size=PATCH_SIZE,
)


def _clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=OPENAI_MEAN,
        image_std=OPENAI_STD,
    )


def build_tiny_clip(out: Path) -> None:
    """HF ``CLIPModel`` (vision + text + projections), tokenizer and ``CLIPImageProcessor``."""
    from transformers import CLIPConfig, CLIPModel

    tok = build_bpe_tokenizer(add_eos=True, model_max_length=32)
    text = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        projection_dim=64,
    )
    vision = dict(CLIP_VISION, projection_dim=64)  # sub-configs carry it: the towers load on their own
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _clip_processor().save_pretrained(out)


def build_tiny_openclip(out: Path) -> None:
    """An open_clip ``CLIP`` in open_clip's ``local-dir`` format (config JSON + safetensors)."""
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    cfg = {
        "embed_dim": 64,
        "quick_gelu": True,
        "vision_cfg": {
            "image_size": IMAGE_SIZE,
            "layers": 4,
            "width": 64,
            "head_width": 16,
            "mlp_ratio": 4.0,
            "patch_size": PATCH_SIZE,
        },
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
    }
    model = CLIP(**cfg)
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors")
    )
    preprocess = {"mean": OPENAI_MEAN, "std": OPENAI_STD, "size": IMAGE_SIZE}
    (out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2)
    )


def _dinov2(out: Path, registers: int) -> None:
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    common = dict(
        hidden_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    model.save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    ).save_pretrained(out)


def build_tiny_siglip(out: Path) -> None:
    """HF ``SiglipVisionModel`` (no CLS token; attention-pooling head) and its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    model = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
        )
    )
    model.save_pretrained(out)
    SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(out)


def build_tiny_text(out: Path) -> None:
    """A sentence-transformers folder: BERT + mean pooling + normalize, as all-MiniLM-style models ship."""
    from transformers import BertConfig, BertModel

    tok = build_wordpiece_tokenizer()
    model = BertModel(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
            pad_token_id=tok.pad_token_id,
        )
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir()
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 64,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            },
            indent=2,
        )
    )
    (out / "2_Normalize").mkdir()
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": True}))


TINY_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-clip": build_tiny_clip,
    "tiny-openclip": build_tiny_openclip,
    "tiny-dinov2": lambda out: _dinov2(out, registers=0),
    "tiny-dinov2-reg": lambda out: _dinov2(out, registers=4),
    "tiny-siglip": build_tiny_siglip,
    "tiny-text": build_tiny_text,
}
TINY_VISION = ("tiny-clip", "tiny-openclip", "tiny-dinov2", "tiny-dinov2-reg", "tiny-siglip")
TINY_TEXT = ("tiny-text", "tiny-clip", "tiny-openclip")


def ensure_tiny(name: str) -> Path:
    """Directory of the tiny model ``name``, building it on first use."""
    if name not in TINY_BUILDERS:
        raise KeyError(f"unknown tiny model '{name}'; expected one of {sorted(TINY_BUILDERS)}")
    return build_once(name, TINY_BUILDERS[name])
