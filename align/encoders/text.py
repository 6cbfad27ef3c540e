"""Hugging Face text encoders: sentence-transformers folders, plain HF models, CLIP/SigLIP text towers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer, PretrainedConfig

from align.encoders.base import TextEncoder
from align.encoders.hf_vision import quiet_transformers

# Default sentence pooling by model type when no sentence-transformers config says otherwise.
DEFAULT_POOLING = {"bert": "cls", "roberta": "cls", "xlm-roberta": "cls", "mpnet": "mean"}
DECODER_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")


def sentence_transformers_pooling(folder: Path) -> tuple[str, bool] | None:
    """(pooling, normalize) from a sentence-transformers folder's ``modules.json``; None if not one."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    pooling, normalize = "mean", False
    for module in modules:
        kind = module.get("type", "")
        if kind.endswith("Pooling"):
            cfg = json.loads((folder / module["path"] / "config.json").read_text())
            if cfg.get("pooling_mode_cls_token"):
                pooling = "cls"
            elif cfg.get("pooling_mode_lasttoken"):
                pooling = "last"
            elif cfg.get("pooling_mode_mean_tokens"):
                pooling = "mean"
            else:
                modes = [k for k, v in cfg.items() if k.startswith("pooling_mode") and v]
                raise ValueError(f"{folder}: unsupported sentence-transformers pooling {modes}")
        elif kind.endswith("Normalize"):
            normalize = True
    return pooling, normalize


class HFTextEncoder(TextEncoder):
    """A transformers encoder (or decoder) with the model's own sentence pooling."""

    kind = "hf"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        pooling: str,
        normalize: bool,
        source: str,
        max_length: int = 256,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize_output = normalize
        self.source = source
        self.max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length) or max_length)
        self.embed_dim = model.config.hidden_size

    def tokenize(self, texts):
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class HFClipTextEncoder(TextEncoder):
    """The text tower of an HF CLIP (projected EOS embedding) or SigLIP (its pooler head) model."""

    pooling = "projected"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, kind: str, source: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.source = source
        cfg = model.config
        self.embed_dim = getattr(cfg, "projection_dim", None) if kind == "clip" else cfg.hidden_size
        self.max_length = cfg.max_position_embeddings

    def tokenize(self, texts):
        padding = "max_length" if self.kind == "siglip" else True  # SigLIP was trained on max-length padding
        enc = self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = enc.get("attention_mask", torch.ones_like(enc["input_ids"]))
        return {"input_ids": enc["input_ids"], "attention_mask": mask}

    def _run(self, input_ids, attention_mask):
        mask = attention_mask if self.kind == "clip" else None
        return self.model(input_ids=input_ids, attention_mask=mask)

    def token_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids, attention_mask).last_hidden_state

    def sentence_embedding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self._run(input_ids, attention_mask)
        return out.text_embeds if self.kind == "clip" else out.pooler_output


def load_hf_text(
    source: str | Path, config: PretrainedConfig, pooling: str | None = None, **model_kwargs: Any
) -> TextEncoder:
    """Load a text encoder from a hub id or directory with the model's own pooling."""
    import transformers

    src = str(source)
    tokenizer = AutoTokenizer.from_pretrained(src, **model_kwargs)
    if config.model_type in ("clip", "clip_text_model", "siglip", "siglip_text_model"):
        kind = "clip" if config.model_type.startswith("clip") else "siglip"
        cls = transformers.CLIPTextModelWithProjection if kind == "clip" else transformers.SiglipTextModel
        with quiet_transformers():
            model = cls.from_pretrained(src, **model_kwargs).eval()
        return HFClipTextEncoder(model, tokenizer, kind, src)
    st = sentence_transformers_pooling(Path(src)) if Path(src).is_dir() else None
    normalize = False
    if st is not None:
        st_pooling, normalize = st
        pooling = pooling or st_pooling
    elif pooling is None:
        pooling = (
            "last" if config.model_type in DECODER_TYPES else DEFAULT_POOLING.get(config.model_type, "mean")
        )
    if pooling == "last" and tokenizer.padding_side != "right":
        tokenizer.padding_side = "right"
    model = AutoModel.from_pretrained(src, **model_kwargs).eval()
    return HFTextEncoder(model, tokenizer, pooling, normalize, src)
