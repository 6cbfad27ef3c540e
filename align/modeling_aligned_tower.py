"""Aligned vision towers as transformers models: a backbone, an optional per-token head, a token rule.

This file is the remote code of every checkpoint with an aligned tower. ``mllm_swap`` copies it verbatim
into such checkpoints (with the head module it imports, ``heads.py``) and
points the config's ``auto_map`` at it, so they load without this project:
``AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)``. It therefore imports only
torch, transformers and its sibling modules (relative imports), never ``align`` or ``mllm_swap``.

``AlignedTowerConfig`` / ``AlignedTower`` are the tower; ``import mllm_swap`` registers them with
``AutoConfig`` / ``AutoModel`` (``mllm_swap.towers``), so ``LlavaConfig(vision_config=AlignedTowerConfig(...))``
checkpoints then reload with plain ``from_pretrained`` and no remote code. A ``LlavaConfig`` resolves a
nested ``vision_config`` by its ``model_type`` in ``CONFIG_MAPPING`` only (a nested ``auto_map`` is
ignored), so the remote entry points are the top-level ``AlignedLlavaConfig`` (whose vision sub-config
spec names ``AlignedTowerConfig`` directly) and ``AlignedLlavaForConditionalGeneration``. Importing this
module registers ``AlignedTower`` for ``AutoModel.from_config`` (which ``LlavaModel`` builds its tower with)
and Llava's checkpoint key renaming for ``AlignedLlavaForConditionalGeneration``.

Token rule (what the tower hands the MLLM, per layer): ``"patch"`` removes every prefix token (CLS and
registers) and keeps the ``(S/p)^2`` patch tokens; ``"all"`` keeps prefix and patch tokens. With a head, the
head sees the full token sequence (SAIL uses ``[CLS ; patch_i]``, freeze_align ``cls_proj(CLS)``) and returns
per-patch outputs, so the rule only decides whether prefix tokens are fed through as well.

Layer indexing follows the ``VisionEncoder`` contract: ``hidden_states[i]`` are the backbone's HF hidden
states, except that the last entry is the backbone's final token output (``last_hidden_state``: after the
final norm for DINOv2 and SigLIP, equal to the last block's output for CLIP).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.configuration_utils import SubConfigSpec
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .heads import build_token_head

TOKEN_RULES = ("patch", "all")
MODEL_TYPE = "mllm_swap_aligned_tower"


def prefix_tokens_of(config: PretrainedConfig) -> int:
    """CLS + register tokens an HF vision backbone puts before its patch tokens (SigLIP: 0)."""
    model_type = getattr(config, "model_type", "")
    if model_type == MODEL_TYPE:
        return int(config.num_prefix_tokens)
    if model_type.startswith("siglip"):
        return 0
    if model_type == "dinov2_with_registers":
        return 1 + int(config.num_register_tokens)
    if model_type.startswith(("clip", "dinov2", "idefics_vision")):
        return 1
    raise ValueError(
        f"vision config model_type '{model_type}': unknown token layout; expected clip, siglip, dinov2, "
        f"dinov2_with_registers or {MODEL_TYPE}"
    )


def output_patch_size(image_size: int, grid: int) -> int:
    """The patch size ``p`` with ``image_size // p == grid`` (how Llava's processor counts a grid's tokens)."""
    for p in range(max(1, image_size // (grid + 1)), image_size // grid + 1):
        if image_size // p == grid:
            return p
    raise ValueError(f"no integer patch size turns image size {image_size} into a {grid}x{grid} token grid")


class AlignedTowerConfig(PretrainedConfig):
    """Config of an aligned tower: the backbone's own HF config, the head's config and the token rule."""

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "vision_backbone": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    vision_backbone: dict | PretrainedConfig | None = None
    head_config: dict | None = None
    token_rule: str = "patch"
    num_prefix_tokens: int = 1
    hidden_size: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_hidden_layers: int = 0
    source: str = ""

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.token_rule not in TOKEN_RULES:
            raise ValueError(f"token_rule '{self.token_rule}': expected one of {list(TOKEN_RULES)}")
        backbone = self.vision_backbone
        self.num_prefix_tokens = prefix_tokens_of(backbone)
        self.image_size = int(backbone.image_size)
        self.patch_size = int(backbone.patch_size)
        grid = (self.head_config or {}).get("out_grid")
        if grid:  # a head that resamples the patch grid: the tower's patch size is its output grid's
            self.patch_size = output_patch_size(self.image_size, int(grid))
        self.num_hidden_layers = int(backbone.num_hidden_layers)
        head_out = (self.head_config or {}).get("out_dim")
        self.hidden_size = int(head_out or backbone.hidden_size)

    @property
    def num_output_prefix_tokens(self) -> int:
        """Prefix tokens left in the tower's output after the token rule (0 with a head or rule 'patch')."""
        return 0 if self.head_config or self.token_rule == "patch" else self.num_prefix_tokens

    @property
    def num_output_tokens(self) -> int:
        """Tokens per image the tower hands the MLLM."""
        return (self.image_size // self.patch_size) ** 2 + self.num_output_prefix_tokens


class AlignedTower(PreTrainedModel):
    """Backbone + optional per-token head + token rule, returning HF ``BaseModelOutputWithPooling``.

    ``output_hidden_states`` may be a bool or a layer index (or list of indices) as transformers 5.x
    ``get_image_features`` passes it; only the requested layers are transformed, the others are ``None``.
    """

    config: AlignedTowerConfig
    config_class = AlignedTowerConfig
    base_model_prefix = "aligned_tower"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True

    def __init__(self, config: AlignedTowerConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.vision_backbone)
        self.head = build_token_head(config.head_config) if config.head_config else None
        self.post_init()

    @property
    def patch_size(self) -> int:
        return self.config.patch_size

    def _init_weights(self, module: nn.Module) -> None:
        """Backbone modules keep their own model's init; the head initialises itself."""
        if isinstance(module, PreTrainedModel) and module is not self:
            module._init_weights(module)

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Apply the head (per token, on the full sequence) and the token rule to one layer's tokens."""
        prefix = self.config.num_prefix_tokens
        if self.head is not None:
            return self.head(tokens, num_prefix_tokens=prefix)
        return tokens[:, prefix:] if self.config.token_rule == "patch" else tokens

    def backbone_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's HF hidden states with the last entry replaced by its final token output."""
        out = self.backbone(pixel_values=pixel_values, output_hidden_states=True, return_dict=True)
        states = list(out.hidden_states)
        states[-1] = out.last_hidden_state
        return states

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | int | list[int] | None = None,
        return_dict: bool | None = True,
        **kwargs: Any,
    ) -> BaseModelOutputWithPooling:
        """Tokens of the final layer in ``last_hidden_state``; selected layers in ``hidden_states``."""
        dtype = next(self.backbone.parameters()).dtype
        states = self.backbone_states(pixel_values.to(dtype))
        n = len(states)
        if isinstance(output_hidden_states, bool) or output_hidden_states is None:
            wanted = set(range(n)) if output_hidden_states else set()
        else:
            indices = (
                [output_hidden_states] if isinstance(output_hidden_states, int) else output_hidden_states
            )
            for i in indices:
                if not -n <= int(i) < n:
                    raise ValueError(f"layer {i} out of range for a tower with {n - 1} layers")
            wanted = {int(i) % n for i in indices}
        cache: dict[int, torch.Tensor] = {}

        def get(i: int) -> torch.Tensor:
            if i not in cache:
                cache[i] = self.transform(states[i])
            return cache[i]

        last = get(n - 1)
        hidden = tuple(get(i) if i in wanted else None for i in range(n)) if wanted else None
        pooled = last.mean(dim=1)
        return BaseModelOutputWithPooling(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden)


class AlignedLlavaConfig(LlavaConfig):
    """``LlavaConfig`` whose ``vision_config`` is an :class:`AlignedTowerConfig` (remote-code entry point)."""

    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "vision_config": SubConfigSpec(config_class=AlignedTowerConfig),
    }


class AlignedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` over an :class:`AlignedTower` (remote-code entry point)."""

    config_class = AlignedLlavaConfig


# LlavaModel builds its tower with AutoModel.from_config(config.vision_config)
AutoModel.register(AlignedTowerConfig, AlignedTower, exist_ok=True)
# transformers reads (and writes) Llava checkpoints through the "llava" key renaming, but skips it for
# classes defined outside transformers unless they are registered by name.
register_checkpoint_conversion_mapping(
    AlignedLlavaForConditionalGeneration.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
)
