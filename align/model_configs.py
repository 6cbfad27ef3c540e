"""Shipped ``config.json`` (and preprocessor config) files of the hub models the recipes name, so real
architectures build offline on the meta device (no weights): ``model_configs/<org>/<name>/``.

``shipped_config("facebook/dinov2-large")`` is the transformers config; :func:`build_meta` the model with
every tensor on the meta device (exact shapes and parameter counts, no memory). Models whose hub config
names a custom type (remote code) are built as the transformers architecture they are made of
(:data:`BUILT_AS`), or refused when there is none (``Alibaba-NLP/gte-large-en-v1.5``, model type ``new``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import UserError
from align.io import read_json
from align.paths import shipped

__all__ = [
    "BUILT_AS", "RANDOM_PREFIX", "RandomRef", "build_meta", "config_dir", "is_random_ref", "meta_vision_encoder",
    "parse_random", "random_model_dir", "shipped_config", "shipped_ids",
]  # fmt: skip

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


# ---- random:ORG/NAME[?layers=N]: a shipped config built with seeded random weights, as a local checkpoint ----

RANDOM_PREFIX = "random:"
RANDOM_VERSION = 1  # bump when what a random build writes changes (rebuilds cached copies)
RANDOM_KEYS = {
    "layers": "decoder layers of the language model (an MLLM's text_config; an LLM or text encoder)"
}
DUAL_OR_VISION = ("clip", "siglip", "dinov2", "dinov2_with_registers", "clip_vision_model", "siglip_vision_model")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt")


@dataclass(frozen=True)
class RandomRef:
    """A parsed ``random:`` reference: the shipped hub id and the language model's depth (None: as shipped)."""

    hub_id: str
    layers: int | None = None

    @property
    def folder_name(self) -> str:
        """The build's folder under the models directory (one per hub id and depth)."""
        name = "random--" + self.hub_id.replace("/", "--")
        return name + (f"--layers-{self.layers}" if self.layers else "")


def is_random_ref(spec: object) -> bool:
    """Whether ``spec`` is a ``random:`` model reference."""
    return str(spec).startswith(RANDOM_PREFIX)


def parse_random(spec: str) -> RandomRef:
    """``random:ORG/NAME`` or ``random:ORG/NAME?layers=N`` -> :class:`RandomRef`, validated against the
    shipped config (the id must be shipped; ``layers`` between 1 and the real depth, language models only)."""
    hub_id, _, query = str(spec)[len(RANDOM_PREFIX) :].partition("?")
    config_dir(hub_id)
    if BUILT_AS.get(read_json(config_dir(hub_id) / "config.json").get("model_type"), ("", ""))[1] == "llama":
        raise UserError(
            f"'{spec}': original LLaVA checkpoints build only their LLM; use random:llava-hf/llava-1.5-7b-hf"
        )
    options: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        key, sep, value = item.partition("=")
        if key not in RANDOM_KEYS or not sep:
            allowed = "; ".join(f"{k}=N: {v}" for k, v in RANDOM_KEYS.items())
            raise UserError(f"'{spec}': unknown option '{item}' after '?'; expected {allowed}")
        options[key] = value
    if "layers" not in options:
        return RandomRef(hub_id)
    value = options["layers"]
    depth_config = _depth_config(shipped_config(hub_id), spec)
    depth = depth_config.num_hidden_layers
    if not value.isdigit() or not 1 <= int(value) <= depth:
        raise UserError(
            f"'{spec}': layers must be a whole number from 1 to {depth} (the shipped depth), got '{value}'"
        )
    return RandomRef(hub_id, int(value))


def _depth_config(config: Any, spec: str) -> Any:
    """The (sub-)config whose ``num_hidden_layers`` ``layers`` sets: an MLLM's language model, else the model."""
    if config.model_type in DUAL_OR_VISION:
        raise UserError(
            f"'{spec}': layers applies to language models (an MLLM's LLM, an LLM, a text encoder); "
            f"'{config.model_type}' towers are built at their real depth"
        )
    return getattr(config, "text_config", None) or config


def random_config(ref: RandomRef) -> Any:
    """The shipped config of ``ref.hub_id`` with its language model shortened to ``ref.layers``."""
    config = shipped_config(ref.hub_id)
    if ref.layers:
        language = _depth_config(config, ref.hub_id)
        language.num_hidden_layers = ref.layers
        if getattr(language, "layer_types", None):  # models that list a type per layer keep one per layer
            language.layer_types = language.layer_types[: ref.layers]
    return config


def random_model_dir(spec: str) -> Path:
    """The local checkpoint a ``random:`` reference names, built once under the models directory.

    The folder holds what a hub snapshot of the model holds: ``config.json`` (dtype float32, the
    language model at ``layers`` when given), weights from the model's own initialisation under seed 0
    (in bfloat16, which halves build memory and disk; they load as float32), and the shipped
    preprocessor, processor, chat template and tokenizer files. Tokenizers that are not shipped: CLIP's is written from
    open_clip's copy of the same BPE vocabulary; a text encoder without one gets the bundled
    all-MiniLM-L6-v2's uncased WordPiece tokenizer as a stand-in (ids differ from the real model's; shapes,
    pooling and code paths are the real ones), recorded in ``random_build.json``.
    """
    from align.embedded import build_once

    ref = parse_random(spec)
    config = random_config(ref)
    return build_once(ref.folder_name, lambda out: _write_random(ref, config, out), version=RANDOM_VERSION)


def _write_random(ref: RandomRef, config: Any, out: Path) -> None:
    import shutil

    import torch
    import transformers

    raw = read_json(config_dir(ref.hub_id) / "config.json")
    names = [a for a in raw.get("architectures", []) if hasattr(transformers, a)]
    if names and raw.get("model_type") not in BUILT_AS:  # the hub's own class (LLaVA: with its LM head)
        model = getattr(transformers, names[0])._from_config(config, dtype=torch.bfloat16)
    else:
        model = transformers.AutoModel.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for sub in [config, *(getattr(config, k, None) for k in ("text_config", "vision_config"))]:
        if sub is not None:
            sub.dtype = "float32"
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    record = {"source": RANDOM_PREFIX + ref.hub_id, "layers": ref.layers, "seed": 0, "tokenizer": "shipped"}
    for item in config_dir(ref.hub_id).iterdir():
        if item.name != "config.json":
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    if not any((out / name).is_file() for name in TOKENIZER_FILES):
        record["tokenizer"] = _write_tokenizer(config, out)
    (out / "random_build.json").write_text(json.dumps(record, indent=2) + "\n")


def _write_tokenizer(config: Any, out: Path) -> str | None:
    """Write a tokenizer for a model whose shipped folder has none; returns what was written (None: none)."""
    import gzip
    import shutil

    if config.model_type == "clip":
        from open_clip.tokenizer import bytes_to_unicode, default_bpe
        from transformers import CLIPTokenizer

        with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:  # the first line is a header
            merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        CLIPTokenizer(
            str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>"
        ).save_pretrained(out)
        return "CLIP BPE (open_clip's bpe_simple_vocab_16e6)"
    if config.model_type in DUAL_OR_VISION:
        return None
    from align.encoders.registry import minilm_dir

    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm_dir() / name).is_file():
            shutil.copy2(minilm_dir() / name, out / name)
    return "stand-in: all-MiniLM-L6-v2's uncased WordPiece (bert-base-uncased vocabulary)"
