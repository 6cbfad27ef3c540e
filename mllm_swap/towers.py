"""Vision towers as MLLMs hold them: an encoder turned into a tower (:class:`NewTower`), aligned-tower
Auto-class registration, and the remote code written with checkpoints that hold one.

An encoder becomes what an MLLM holds (:func:`new_tower`): an HF vision config + weights (plain or aligned),
or an open_clip visual. Prefix-token rule (``prefix``): ``"drop"`` feeds only the ``(S/p)^2`` patch tokens:
one CLS is dropped by the MLLM's own rule (HF ``"default"``, original ``"patch"``), while CLS + registers
(DINOv2-with-registers) are dropped inside an ``AlignedTower`` with token rule ``"patch"``, because the MLLMs'
rules remove index 0 only. ``"keep"`` feeds every token. Aligned artifacts bring their own rule.

The aligned tower itself (``AlignedTowerConfig``, ``AlignedTower``, its token rule; the fused tower built by
:mod:`mllm_swap.fuse`) lives in :mod:`align.modeling_aligned_tower`, also the checkpoints' remote code.
Importing this module (``import mllm_swap`` does it) registers the tower with ``AutoConfig`` /
``AutoModel``, so checkpoints with an aligned tower reload with plain ``from_pretrained`` and no
``trust_remote_code``. :func:`add_remote_code` makes a written checkpoint load without this package.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

from align import modeling_aligned_tower
from align.io import read_json, write_json
from align.modeling_aligned_tower import (  # noqa: F401  (the tower's public names, re-exported)
    FUSED_MODEL_TYPE,
    MODEL_TYPE,
    TOKEN_RULES,
    AlignedLlavaConfig,
    AlignedLlavaForConditionalGeneration,
    AlignedTower,
    AlignedTowerConfig,
    FusedLlavaConfig,
    FusedLlavaForConditionalGeneration,
    FusedTower,
    FusedTowerConfig,
    prefix_tokens_of,
)

# auto_map of a checkpoint with an aligned (or fused) tower: by the tower's model_type, then the model_type of
# its config.json (a Llava holding the tower, or the tower saved alone)
AUTO_MAP = {
    tower: {
        "llava": {"AutoConfig": llava_config, "AutoModelForImageTextToText": llava_model},
        tower: {"AutoConfig": config, "AutoModel": model},
    }
    for tower, llava_config, llava_model, config, model in (
        (MODEL_TYPE, AlignedLlavaConfig, AlignedLlavaForConditionalGeneration, AlignedTowerConfig, AlignedTower),
        (FUSED_MODEL_TYPE, FusedLlavaConfig, FusedLlavaForConditionalGeneration, FusedTowerConfig, FusedTower),
    )
}  # fmt: skip


def register_towers() -> None:
    """Register the tower configs with ``AutoConfig`` (idempotent; the module registers the models itself)."""
    AutoConfig.register(MODEL_TYPE, AlignedTowerConfig, exist_ok=True)
    AutoConfig.register(FUSED_MODEL_TYPE, FusedTowerConfig, exist_ok=True)


def remote_code_files() -> list[Path]:
    """The remote-code files: the tower module and the sibling modules it imports, recursively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    module = Path(modeling_aligned_tower.__file__)
    return [module, *(Path(f) for f in get_relative_import_files(str(module)))]


def add_remote_code(directory: str | Path) -> list[str]:
    """Make the checkpoint in ``directory`` load without this package (Hugging Face's remote-code convention).

    When its ``config.json`` is an aligned (or fused) tower's or has one as ``vision_config``, the tower's source files
    are copied next to it and ``auto_map`` names their classes, so ``from_pretrained(directory,
    trust_remote_code=True)`` works in an environment without ``mllm_swap``. ``auto_map`` entries of an
    aligned tower that is no longer there (a checkpoint swapped back to a plain tower) are removed; other
    directories (adapters without ``config.json``) are left as they are. Returns the file names written.
    """
    path = Path(directory) / "config.json"
    if not path.is_file():
        return []
    config = read_json(path)
    model_type = config.get("model_type")
    vision = (config.get("vision_config") or {}).get("model_type")
    tower_type = model_type if model_type in AUTO_MAP else vision
    aligned = tower_type in AUTO_MAP
    if aligned and model_type not in AUTO_MAP[tower_type]:
        raise ValueError(
            f"{path}: an aligned tower inside a '{model_type}' model has no remote code; "
            f"expected model_type one of {sorted(AUTO_MAP[tower_type])}"
        )
    files = remote_code_files() if aligned else []
    module = Path(modeling_aligned_tower.__file__).stem
    old = config.get("auto_map") or {}
    new = {k: v for k, v in old.items() if not str(v).startswith(f"{module}.")}
    if aligned:
        new.update(
            {auto: f"{module}.{cls.__name__}" for auto, cls in AUTO_MAP[tower_type][model_type].items()}
        )
    for file in files:
        shutil.copyfile(file, path.parent / file.name)
    if new != old:
        config.pop("auto_map", None)
        write_json(path, {**config, **({"auto_map": new} if new else {})})
    return [file.name for file in files]


PREFIX_RULES = ("drop", "keep")


@dataclass
class NewTower:
    """An encoder turned into something an MLLM can hold: an HF vision config + weights, or an open_clip visual.

    ``kind``: ``"hf"`` (a plain transformers vision model), ``"aligned"`` (an :class:`AlignedTower`),
    ``"fused"`` (a :class:`FusedTower`; ``parts`` describes its towers) or ``"openclip"`` (``visual`` only;
    for OpenFlamingo). ``num_tokens`` is what the MLLM receives per image.
    """

    source: str
    encoder: Any
    kind: str
    config: PretrainedConfig | None
    state_dict: dict[str, torch.Tensor]
    image_processor: Any | None
    width: int
    image_size: int
    patch_size: int
    num_prefix_tokens: int
    num_tokens: int
    prefix_rule: str
    head_layer: int | None = None
    notes: list[str] = field(default_factory=list)
    parts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def module(self) -> nn.Module:
        """A fresh tower module with the encoder's weights (every key must match)."""
        if self.config is None:
            raise ValueError(f"{self.source}: an open_clip visual has no transformers module")
        tower = AutoModel.from_config(self.config)
        tower.load_state_dict(self.state_dict, strict=True)
        return tower.eval()

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports."""
        return {
            "source": self.source,
            "kind": self.kind,
            "model_type": getattr(self.config, "model_type", "open_clip"),
            "width": self.width,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "prefix_tokens": self.num_prefix_tokens,
            "image_tokens": self.num_tokens,
            "prefix_rule": self.prefix_rule,
            **({"parts": self.parts} if self.parts else {}),
        }


def _hf_vision_parts(encoder: Any) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """The vision config and the weights of a plain transformers vision model for an HF ``VisionEncoder``."""
    model = encoder.model
    config = model.config
    inner = getattr(model, "vision_model", None)  # CLIPVisionModelWithProjection wraps the transformer
    state = (inner if inner is not None and config.model_type.startswith("clip") else model).state_dict()
    return config, {k: v.detach().clone() for k, v in state.items()}


def _image_processor(source: str) -> Any | None:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError):
        return None


def new_tower(encoder: Any, prefix: str = "drop") -> NewTower:
    """Describe how ``encoder`` (an ``align.encoders`` ``VisionEncoder``) goes into an MLLM.

    ``prefix="drop"`` feeds only patch tokens: one CLS is dropped by the MLLM's own rule ("default" /
    "patch"), while CLS + registers (DINOv2-with-registers) are dropped inside an :class:`AlignedTower` with
    token rule "patch", because the MLLMs' own rules remove index 0 only. ``prefix="keep"`` feeds every token.
    """
    if prefix not in PREFIX_RULES:
        raise ValueError(f"prefix rule '{prefix}': expected one of {list(PREFIX_RULES)}")
    source = str(getattr(encoder, "source", "")) or type(encoder).__name__
    if getattr(encoder, "kind", "") == "aligned":
        return _aligned_tower(encoder, prefix, source)
    prefix_n = int(encoder.num_prefix_tokens)
    patches = int(encoder.num_patches)
    common = dict(
        source=source,
        encoder=encoder,
        width=int(encoder.embed_dim),
        image_size=int(encoder.image_size),
        patch_size=int(encoder.patch_size),
        num_prefix_tokens=prefix_n,
    )
    if getattr(encoder, "kind", "") == "openclip":
        visual = encoder.visual
        state = {k: v.detach().clone() for k, v in visual.state_dict().items()}
        return NewTower(
            kind="openclip",
            config=None,
            state_dict=state,
            image_processor=None,
            num_tokens=patches,
            prefix_rule="drop (open_clip output_tokens drops CLS)",
            **common,
        )
    if not hasattr(encoder, "model"):
        raise ValueError(
            f"{source}: {type(encoder).__name__} is not a transformers vision model or open_clip visual; "
            "expected an encoder from align.encoders.load_vision_encoder"
        )
    config, state = _hf_vision_parts(encoder)
    processor = _image_processor(getattr(encoder.model, "name_or_path", "") or source)
    if prefix == "keep" or prefix_n <= 1:
        kept = prefix_n if prefix == "keep" else 0
        rule = (
            "keep all prefix tokens" if prefix == "keep" else ("drop CLS" if prefix_n else "no prefix tokens")
        )
        return NewTower(
            kind="hf",
            config=config,
            state_dict=state,
            image_processor=processor,
            num_tokens=patches + kept,
            prefix_rule=rule,
            **common,
        )
    tower_config = AlignedTowerConfig(
        vision_backbone=backbone_config(config), token_rule="patch", source=source
    )
    return NewTower(
        kind="aligned",
        config=tower_config,
        image_processor=processor,
        state_dict={f"backbone.{k}": v for k, v in state.items()},
        num_tokens=patches,
        prefix_rule=f"drop CLS + {prefix_n - 1} registers (tower token rule 'patch')",
        **common,
    )


def bridged_tower(tower: NewTower, head_config: dict[str, Any], head_state: dict[str, torch.Tensor], layer: int) -> NewTower:  # fmt: skip
    """``tower`` (a plain HF or token-rule tower) carrying a trained bridge head (:class:`align.heads.TokenBridgeHead`)
    applied on ``layer``: an :class:`AlignedTower` feeding the head's ``out_grid``-squared tokens of width
    ``out_dim`` (a fused tower: on its fused tokens); its patch size is the output grid's (how Llava's processor
    counts the image tokens: :func:`~align.modeling_aligned_tower.output_patch_size`)."""
    if tower.kind == "fused":
        c = tower.config
        config: Any = FusedTowerConfig(parts=c.parts, pixels=c.pixels, grid=c.grid, source=c.source, head_config=head_config)  # fmt: skip
        state, rule = dict(tower.state_dict), tower.prefix_rule
    else:
        backbone, state = backbone_parts(tower, "carry a bridge")
        config = AlignedTowerConfig(vision_backbone=backbone_config(backbone), head_config=head_config, token_rule="patch", source=tower.source)  # fmt: skip
        rule = f"drop CLS + registers ({tower.num_prefix_tokens} prefix tokens)"
    grid = int(head_config["out_grid"])
    return NewTower(
        source=tower.source,
        encoder=tower.encoder,
        kind=tower.kind if tower.kind == "fused" else "aligned",
        config=config,
        state_dict={**state, **{f"head.{k}": v for k, v in head_state.items()}},
        image_processor=tower.image_processor,
        width=int(head_config["out_dim"]),
        image_size=tower.image_size,
        patch_size=config.patch_size,
        num_prefix_tokens=tower.num_prefix_tokens,
        num_tokens=grid * grid,
        prefix_rule=f"{rule}, bridge to a {grid}x{grid} grid",
        head_layer=layer,
        notes=list(tower.notes),
        parts=list(tower.parts),
    )


def backbone_parts(tower: NewTower, purpose: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(backbone config, weights under ``backbone.``) of a plain HF or token-rule tower, to build an
    :class:`AlignedTower` around; other towers are refused, naming ``purpose``."""
    if tower.kind == "aligned" and not tower.config.head_config:  # a token-rule tower: already prefixed
        return tower.config.vision_backbone, dict(tower.state_dict)
    if tower.kind == "hf":
        return tower.config, {f"backbone.{k}": v for k, v in tower.state_dict.items()}
    what = "an aligned tower with an image head" if tower.kind == "aligned" else f"a {tower.kind} tower"
    raise ValueError(f"{tower.source}: {what} cannot {purpose}; expected a plain transformers vision tower")


def backbone_config(config: Any) -> dict[str, Any]:
    """The backbone's config for a tower config, without the machine path it was loaded from."""
    data = config if isinstance(config, dict) else config.to_dict()
    return {k: v for k, v in data.items() if k != "_name_or_path"}


def _aligned_tower(encoder: Any, prefix: str, source: str) -> NewTower:
    """An ``align.artifact.AlignedEncoder``: headless (KUEA) = its backbone with the artifact's token rule;
    with an image head (SAIL, freeze_align) = an :class:`AlignedTower` applying the head per token on the
    layer the head was trained on (the backbone's final token output, ``hidden_states[-1]``)."""
    backbone = encoder.backbone
    if encoder.image_head is None:
        rule = "keep" if encoder.token_rule == "all" else "drop"
        tower = new_tower(backbone, prefix=rule)
        tower.source, tower.encoder = source, encoder
        if rule != prefix:
            tower.notes.append(
                f"prefix rule '{rule}' taken from the artifact's token rule '{encoder.token_rule}'"
            )
        return tower
    if not hasattr(backbone, "model"):
        raise ValueError(
            f"{source}: an aligned head over a {type(backbone).__name__} backbone cannot become a transformers "
            "tower; expected a transformers backbone (CLIP, SigLIP, DINOv2)"
        )
    config, state = _hf_vision_parts(backbone)
    head_state = {f"head.{k}": v.detach().clone() for k, v in encoder.image_head.state_dict().items()}
    tower_config = AlignedTowerConfig(
        vision_backbone=backbone_config(config),
        head_config=encoder.image_head_config,
        token_rule="patch",
        source=source,
    )
    patches = int(backbone.num_patches)
    return NewTower(
        source=source,
        encoder=encoder,
        kind="aligned",
        config=tower_config,
        state_dict={**{f"backbone.{k}": v for k, v in state.items()}, **head_state},
        image_processor=_image_processor(getattr(backbone.model, "name_or_path", "") or backbone.source),
        width=int(encoder.out_dim),
        image_size=int(backbone.image_size),
        patch_size=int(backbone.patch_size),
        num_prefix_tokens=int(backbone.num_prefix_tokens),
        num_tokens=patches,
        prefix_rule=f"{encoder.token_rule} (prefix tokens folded into the head)",
        head_layer=-1,
    )


def openclip_as_hf(tower: NewTower) -> NewTower:
    """An open_clip ViT visual as an HF ``CLIPVisionModel`` tower (key mapping of ``align.clip_convert``).

    HF CLIP's ``hidden_states`` equal the open_clip encoder's HF-style hidden states, so LLaVA's layer -2
    tokens are unchanged by the conversion; the processor is built from the encoder's preprocessing.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from align.clip_convert import openclip_to_hf_state_dict

    visual = tower.encoder.visual if hasattr(tower.encoder, "visual") else tower.encoder.backbone.visual
    block = visual.transformer.resblocks[0]
    width = visual.transformer.width
    config = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=block.mlp.c_fc.out_features,
        num_hidden_layers=len(visual.transformer.resblocks),
        num_attention_heads=block.attn.num_heads,
        image_size=tower.image_size,
        patch_size=tower.patch_size,
        hidden_act="quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu",
        layer_norm_eps=visual.ln_pre.eps,
        projection_dim=visual.proj.shape[1] if visual.proj is not None else width,
    )
    state = openclip_to_hf_state_dict({f"visual.{k}": v for k, v in tower.state_dict.items()}, text=False)
    state = {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
    pre = tower.encoder.preprocess
    processor = CLIPImageProcessor(
        size={"shortest_edge": pre.resize},
        crop_size={"height": pre.image_size, "width": pre.image_size},
        image_mean=list(pre.mean),
        image_std=list(pre.std),
    )
    return NewTower(
        source=tower.source,
        encoder=tower.encoder,
        kind="hf",
        config=config,
        state_dict=state,
        image_processor=processor,
        width=tower.width,
        image_size=tower.image_size,
        patch_size=tower.patch_size,
        num_prefix_tokens=1,
        num_tokens=tower.num_patches,
        prefix_rule="drop CLS",
        notes=[*tower.notes, "open_clip visual converted to an HF CLIPVisionModel"],
    )


register_towers()
