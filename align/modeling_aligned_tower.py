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

``FusedTowerConfig`` / ``FusedTower`` (``swap --mode fuse``) hold two or more such towers side by side: their
patch tokens per layer, resampled to one grid and concatenated along channels; ``FusedLlavaConfig`` /
``FusedLlavaForConditionalGeneration`` are their remote entry points.

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

from .heads import build_token_head, resample_grid

TOKEN_RULES = ("patch", "all")
MODEL_TYPE = "mllm_swap_aligned_tower"
FUSED_MODEL_TYPE = "mllm_swap_fused_tower"


def prefix_tokens_of(config: PretrainedConfig) -> int:
    """CLS + register tokens an HF vision backbone puts before its patch tokens (SigLIP: 0)."""
    model_type = getattr(config, "model_type", "")
    if model_type in (MODEL_TYPE, FUSED_MODEL_TYPE):
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
        states = self.backbone_states(pixel_values.to(self.dtype))
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


class FusedTowerConfig(PretrainedConfig):
    """Config of a fused tower: two or more aligned towers (token rule ``"patch"``) whose patch tokens are
    concatenated along channels on one ``grid x grid`` token grid.

    ``parts``: the towers' :class:`AlignedTowerConfig` dicts; ``pixels``: per tower its ``image_size``,
    ``image_mean`` and ``image_std``. The tower takes ``[0, 1]`` pixels at ``image_size`` (the largest tower's
    resolution, one resize/crop for all) and derives each tower's input: resized (bicubic, antialiased)
    to its resolution when smaller, normalised with its mean/std. ``head_config``: a per-token head on the fused
    tokens (a bridge onto an old tower's tokens), which sets the output width and grid.
    """

    model_type = FUSED_MODEL_TYPE

    parts: list | None = None
    pixels: list | None = None
    grid: int = 0
    token_rule: str = "patch"
    head_config: dict | None = None
    num_prefix_tokens: int = 0
    hidden_size: int = 0
    image_size: int = 0
    patch_size: int = 0
    num_hidden_layers: int = 0
    source: str = ""

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.parts is None:  # transformers' default instance (compared against when saving)
            return
        if not self.parts or len(self.parts) != len(self.pixels or []):
            raise ValueError(f"a fused tower needs parts and one pixels entry per part, found {self.parts}")
        configs = self.part_configs()
        head = self.head_config or {}
        self.image_size = max(int(p["image_size"]) for p in self.pixels)
        self.patch_size = output_patch_size(self.image_size, int(head.get("out_grid") or self.grid))
        self.hidden_size = int(head.get("out_dim") or sum(c.hidden_size for c in configs))
        self.num_hidden_layers = min(c.num_hidden_layers for c in configs)

    def part_configs(self) -> list[AlignedTowerConfig]:
        """The towers' configs (each a token rule ``"patch"`` :class:`AlignedTowerConfig`)."""
        skip = ("model_type", "transformers_version")
        return [AlignedTowerConfig(**{k: v for k, v in p.items() if k not in skip}) for p in self.parts]

    num_output_prefix_tokens = 0

    @property
    def num_output_tokens(self) -> int:
        """Tokens per image the tower hands the MLLM (the fused grid, or the head's output grid)."""
        return int((self.head_config or {}).get("out_grid") or self.grid) ** 2


class FusedTower(AlignedTower):
    """Towers run side by side on one image; per layer, their patch tokens resampled to the fused grid and
    concatenated along channels. Layers are aligned at the end: fused hidden state ``-k`` holds every tower's
    hidden state ``-k`` (``-1``: their final token outputs), so there are as many as the shallowest tower has.
    """

    config: FusedTowerConfig
    config_class = FusedTowerConfig
    base_model_prefix = "fused_tower"

    def __init__(self, config: FusedTowerConfig):
        PreTrainedModel.__init__(self, config)
        self.parts = nn.ModuleList(AlignedTower(c) for c in config.part_configs())
        self.head = build_token_head(config.head_config) if config.head_config else None
        self.post_init()

    def part_pixels(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Each tower's input from ``[0, 1]`` pixels at the fused resolution (its size, its normalisation)."""
        out = []
        for spec in self.config.pixels:
            x, size = pixel_values, int(spec["image_size"])
            if x.shape[-1] != size or x.shape[-2] != size:
                x = nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True)
                x = x.clamp(0, 1).to(pixel_values.dtype)
            mean = torch.tensor(spec["image_mean"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            std = torch.tensor(spec["image_std"], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            out.append((x - mean) / std)
        return out

    def backbone_states(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """Fused tokens per layer, end-aligned: ``cat_t resample(tower_t's patch tokens of that layer)``."""
        grid = int(self.config.grid)
        per_part = []
        for part, pixels in zip(self.parts, self.part_pixels(pixel_values), strict=True):
            states = part.backbone_states(pixels)
            per_part.append([resample_grid(part.transform(h), grid) for h in states])
        n = min(len(states) for states in per_part)
        return [torch.cat([states[len(states) - n + i] for states in per_part], dim=-1) for i in range(n)]

    def transform(self, tokens: torch.Tensor) -> torch.Tensor:
        """Fused states are already patch tokens on the fused grid; the head (if any) maps them."""
        return tokens if self.head is None else self.head(tokens, num_prefix_tokens=0)


class FusedLlavaConfig(LlavaConfig):
    """``LlavaConfig`` whose ``vision_config`` is a :class:`FusedTowerConfig` (remote-code entry point)."""

    sub_configs_defaults = {
        **LlavaConfig.sub_configs_defaults,
        "vision_config": SubConfigSpec(config_class=FusedTowerConfig),
    }


class FusedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """``LlavaForConditionalGeneration`` over a :class:`FusedTower` (remote-code entry point)."""

    config_class = FusedLlavaConfig


# LlavaModel builds its tower with AutoModel.from_config(config.vision_config)
AutoModel.register(AlignedTowerConfig, AlignedTower, exist_ok=True)
AutoModel.register(FusedTowerConfig, FusedTower, exist_ok=True)
# transformers reads (and writes) Llava checkpoints through the "llava" key renaming, but skips it for
# classes defined outside transformers unless they are registered by name.
for _llava in (AlignedLlavaForConditionalGeneration, FusedLlavaForConditionalGeneration):
    register_checkpoint_conversion_mapping(
        _llava.__name__, get_checkpoint_conversion_mapping("llava"), overwrite=True
    )
