"""Cached tower tokens for a frozen tower (connector pretraining): read them from an embedding cache instead of
running the tower every step.

The cache is an image token cache (``mllm-swap encode --pool tokens --layer L --prefix drop|keep``, written
by :func:`align.data.cache.write_cache`) of the images the conversations use, made with the encoder the MLLM's
tower was swapped from. Before training, :func:`check_cache` refuses a cache that is not what the model
consumes, naming what differs: the layer (the model's ``vision_feature_layer``), the token count and width
(after the model's select strategy) and the model's fingerprint (its tokens of a fixed probe input,
:func:`align.data.cache.fingerprint`). During training :class:`CachedTokens` stands in for the tower: the batch's
``pixel_values`` carry the cached tokens and it hands them to Llava's own feature selection at the consumed
layer, so the connector and everything after it run exactly as with the live tower (the same losses up to
the cache's storage precision). The real tower is put back before evaluation and saving (:func:`restore`).
Under ``accelerate launch`` each process reads its own batches' rows; under DeepSpeed ZeRO-3 the tower is kept
whole outside the engine (:func:`install`). A run's ``metrics.jsonl`` counts ``cached_images`` per step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from align.data.cache import fingerprint, probe_pixels
from align.data.cache_read import EmbeddingCache
from align.distributed import whole_model
from align.errors import UserError

# how far a fingerprint may drift (relative to the tokens' scale) between two runs of the same weights
FINGERPRINT_RTOL = 1e-3
# how far stored tokens may be from the live tower's (relative to their scale), by storage dtype
CACHE_RTOL = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}


class CachedTokens(nn.Module):
    """A stand-in vision tower: ``pixel_values`` are consumed tokens ``[B, N, D]``, returned as hidden state
    ``layer`` (a zero token in front when the select strategy ``"default"`` drops index 0)."""

    def __init__(self, tower: nn.Module, layer: int, strategy: str, num_states: int) -> None:
        """``tower`` is kept aside for :func:`restore`; ``num_states`` is how many hidden states it returns."""
        super().__init__()
        self.layer, self.strategy, self.num_states = layer, strategy, num_states
        self.real_tower = [tower]  # in a list: not a submodule (nothing of it trained, moved or saved)

    def forward(self, pixel_values: torch.Tensor, **kwargs: Any) -> BaseModelOutputWithPooling:
        tokens = pixel_values
        if self.strategy == "default":
            tokens = torch.cat([tokens.new_zeros(tokens.shape[0], 1, tokens.shape[2]), tokens], dim=1)
        states = [None] * self.num_states
        states[self.layer] = tokens
        return BaseModelOutputWithPooling(last_hidden_state=tokens, hidden_states=tuple(states))


def _layer_index(layer: int, num_states: int) -> int:
    return layer % num_states


def consumed(model: nn.Module, tower: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tokens ``[B, N, D]`` the Llava ``model`` feeds its connector from ``tower`` for ``pixels``, hidden states)."""
    param = next(tower.parameters())
    states = tower(
        pixels.to(param.device, param.dtype), output_hidden_states=True, return_dict=True
    ).hidden_states
    tokens = states[model.config.vision_feature_layer]
    return (tokens[:, 1:] if model.config.vision_feature_select_strategy == "default" else tokens), len(
        states
    )


@torch.no_grad()
def check_cache(cache: EmbeddingCache, model: nn.Module, tower: nn.Module, where: str) -> int:
    """Refuse ``cache`` unless it holds what ``model`` (an HF Llava) consumes from ``tower``: the same layer,
    token count, width and model fingerprint. ``where`` names the cache in messages. Returns the number of
    hidden states the tower gives."""
    m, cfg = cache.manifest, model.config
    layer, strategy = cfg.vision_feature_layer, cfg.vision_feature_select_strategy
    if m.get("modality") != "image" or m.get("pool") != "tokens" or "fingerprint" not in m:
        raise UserError(
            f"{where}: not an image token cache of this version (modality {m.get('modality')}, pool {m.get('pool')}); "
            "write one with `mllm-swap encode --pool tokens --layer L --prefix drop|keep`"
        )
    if not isinstance(layer, int):
        raise UserError(f"{where}: the model concatenates layers {layer}; a tower cache holds one layer")
    live, n = consumed(model, tower, probe_pixels(int(cfg.vision_config.image_size)))
    problems = []
    if _layer_index(m["layer"], n) != _layer_index(layer, n):
        problems.append(f"layer {m['layer']} in the cache, the model consumes layer {layer}")
    width = len(m["fingerprint"]["mean"])
    tokens = cache.get([0])[0].shape[1] if len(cache) else None
    if tokens != live.shape[1] or width != live.shape[2]:
        problems.append(
            f"{tokens} tokens of width {width} per image in the cache, the model consumes {live.shape[1]} of width "
            f"{live.shape[2]} (prefix rule {m.get('prefix')!r} vs strategy {strategy!r})"
        )
    if not problems:
        got = fingerprint(live)
        diff = max(
            (torch.tensor(got[k]) - torch.tensor(m["fingerprint"][k])).abs().max().item()
            for k in ("mean", "first")
        )
        scale = torch.tensor(got["first"]).abs().max().item()
        if diff > FINGERPRINT_RTOL * max(scale, 1.0):
            problems.append(
                f"model fingerprint differs (tokens of the probe input differ by up to {diff:.3g}; scale {scale:.3g}): "
                f"written by {m['encoder'].get('source')}, not by this model's tower"
            )
    if problems:
        raise UserError(f"tower_cache {where}: does not match the model: {'; '.join(problems)}")
    return n


class TowerCache:
    """The cached tokens of a conversation record's image: rows looked up by the image's path relative to the
    image folder without its suffix (an image folder's sample ids), else the record's ``id`` (a shapes world's)."""

    def __init__(self, path: str | Path, model: nn.Module, tower: nn.Module) -> None:
        self.path = Path(path)
        self.cache = EmbeddingCache(self.path)
        self.num_states = check_cache(self.cache, model, tower, str(self.path))
        self.tower = tower  # the real one, for check_images
        self.rows = {sample_id: row for row, sample_id in enumerate(self.cache.ids)}

    @torch.no_grad()
    def check_images(self, dataset: Any, model: nn.Module) -> None:
        """Refuse the cache when its tokens of the first image differ from the tower's on that image as the
        stage prepares it (``dataset.load_image``: padded to square; the processor): other preprocessing."""
        record = next((r for r in dataset.records if "image" in r), None)
        if record is None:
            return
        pixels = dataset.processor.image_processor(images=[dataset.load_image(record)], return_tensors="pt")
        live = consumed(model, self.tower, pixels["pixel_values"])[0].float().cpu()
        cached = self.tokens(record)
        diff = (live - cached).abs().max().item()
        scale = live.abs().max().item()
        if diff > CACHE_RTOL[self.cache.manifest["dtype"]] * max(scale, 1.0):
            raise UserError(
                f"tower_cache {self.path}: does not match the model: its tokens of image {record['image']!r} differ "
                f"from the tower's by up to {diff:.3g} (scale {scale:.3g}) on the image as this stage prepares it "
                f"(image_aspect_ratio {dataset.image_aspect_ratio!r}, the model's processor): written with other "
                "preprocessing or other images"
            )

    def tokens(self, record: dict) -> torch.Tensor:
        """``[1, N, D]`` float32 tokens of the record's image."""
        keys = (str(Path(record["image"]).with_suffix("")), str(record.get("id")))
        row = next((self.rows[k] for k in keys if k in self.rows), None)
        if row is None:
            raise UserError(
                f"tower_cache {self.path}: no row for image {record['image']!r} (record {record.get('id')!r}); "
                "encode the images the conversations use"
            )
        return self.cache.get([row])[0]


def install(model: nn.Module, tower_path: str, cache_dir: str | Path) -> TowerCache:
    """Check ``cache_dir`` against ``model``'s tower at ``tower_path`` and put :class:`CachedTokens` in its place.

    Under DeepSpeed ZeRO-3 the loaded tower is partitioned; it leaves the model before DeepSpeed wraps it, so it
    is kept whole (a plain copy, gathered by every process: :func:`align.distributed.whole_model`) to be checked
    against the cache now and put back whole for evaluation and saving.
    """
    tower = whole_model(model.get_submodule(tower_path))
    cache = TowerCache(cache_dir, model, tower)
    cfg = model.config
    stand_in = CachedTokens(
        tower, cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cache.num_states
    )
    parent, name = tower_path.rpartition(".")[::2]
    setattr(model.get_submodule(parent), name, stand_in)
    return cache


def restore(model: nn.Module, tower_path: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Put the real tower back in place of :class:`CachedTokens` (idempotent); add its weights to ``state_dict``."""
    current = model.get_submodule(tower_path)
    if isinstance(current, CachedTokens):
        parent, name = tower_path.rpartition(".")[::2]
        setattr(model.get_submodule(parent), name, current.real_tower[0])
    if state_dict is not None:
        tower = model.get_submodule(tower_path)
        state_dict.update({f"{tower_path}.{k}": v for k, v in tower.state_dict().items()})
