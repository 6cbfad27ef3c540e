"""OpenFlamingo checkpoints: a state dict whose ``vision_encoder.*`` is an open_clip ``VisionTransformer``.

The swap itself does not import ``open-flamingo`` (its metadata pins torch 2.0.1; it works with current
torch, open_clip and transformers when installed with ``pip install --no-deps open-flamingo==2.0.1
einops-exts==0.0.4``, and the test suite runs its ``create_model_and_transforms``, forward and generate on
a swapped checkpoint). What is handled and verified here: the ``vision_encoder.*`` keys are replaced by the new open_clip
visual's (same key set and shapes required), the width is checked against the perceiver
(``perceiver.latents`` is ``[n_latents, vis_dim]``) and the gated cross-attention (``to_kv`` reads
``vis_dim``), the new encoder is also written as an open_clip ``local-dir`` model (``vision_encoder/``) for
``create_model_and_transforms(clip_vision_encoder_path="local-dir:...")``, and the written
``vision_encoder.*`` weights load back into open_clip and give the new encoder's tokens. Released
OpenFlamingo checkpoints store only trainable weights (no ``vision_encoder.*``); then the vision weights
are added to the state dict (``load_state_dict(strict=False)`` applies them) and only the width is checked.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from align.io import read_tensors
from mllm_swap.families.base import Family, Loaded, SwapPlan, TowerView
from mllm_swap.towers import NewTower

PREFIX = "vision_encoder."
STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
STATE_FILES = ("checkpoint.safetensors", "checkpoint.pt", "checkpoint.bin", "checkpoint.pth")
META = "openflamingo.json"


def state_file(path: Path) -> Path:
    """The state-dict file of an OpenFlamingo checkpoint (a file, or a directory holding ``checkpoint.*``)."""
    if path.is_file():
        return path
    for name in STATE_FILES:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: OpenFlamingo checkpoint is missing {' or '.join(STATE_FILES)}")


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """Load a state dict safely (safetensors, or ``torch.load(weights_only=True)``)."""
    return read_tensors(file)


def _visual_of(tower: NewTower) -> torch.nn.Module:
    enc = tower.encoder
    return enc.visual if hasattr(enc, "visual") else enc.backbone.visual


def vision_dim(state: dict[str, torch.Tensor], where: Path) -> int:
    """The width the perceiver and cross-attention were trained for."""
    if "perceiver.latents" in state:
        return int(state["perceiver.latents"].shape[-1])
    if PREFIX + "conv1.weight" in state:
        return int(state[PREFIX + "conv1.weight"].shape[0])
    raise ValueError(
        f"{where}: not an OpenFlamingo state dict (no perceiver.latents or {PREFIX}conv1.weight)"
    )


class OpenFlamingo(Family):
    """Drop-in of an open_clip visual with the same width (and, when stored, the same keys and shapes)."""

    name = "openflamingo"
    formats = f"OpenFlamingo state dicts (a {'|'.join(STATE_SUFFIXES)} file, or a directory with {META} or checkpoint.*)"
    modes = ("dropin",)
    hf_tower = False
    generates = False  # a state dict: open_flamingo builds the model (not imported here)

    @classmethod
    def recognizes(cls, path: Path, config: dict[str, Any] | None) -> bool:
        if path.is_file():
            return path.suffix in STATE_SUFFIXES
        return config is None and (
            (path / META).is_file() or any((path / name).is_file() for name in STATE_FILES)
        )

    def load(self, path: Path, dtype: torch.dtype | None = None, quantization_config: Any = None) -> Loaded:
        if dtype is not None or quantization_config is not None:
            raise ValueError(f"{path}: an OpenFlamingo state dict is read as stored (no dtype or quantization)")
        file = state_file(path)
        state = read_state(file)
        meta_file = (path if path.is_dir() else path.parent) / META
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        extra = {"file": file, "meta": meta, "dim": vision_dim(state, file)}
        return Loaded(path=path, model=state, extra=extra, family=self)

    def old_view(self, loaded: Loaded) -> TowerView:
        state, dim = loaded.model, loaded.extra["dim"]
        conv = state.get(PREFIX + "conv1.weight")
        pos = state.get(PREFIX + "positional_embedding")
        patch = int(conv.shape[-1]) if conv is not None else 0
        patches = int(pos.shape[0]) - 1 if pos is not None else 0
        blocks = {k.split(".")[3] for k in state if k.startswith(PREFIX + "transformer.resblocks.")}
        arch = (
            {"model_type": "open_clip_visual", "layers": len(blocks), "patch_size": patch}
            if conv is not None
            else {}
        )
        return TowerView(
            source=loaded.extra["meta"].get(
                "clip_vision_encoder_path", f"{loaded.extra['file']} ({PREFIX}*)"
            ),
            arch=arch,
            width=dim,
            num_tokens=patches,
            image_size=int(math.isqrt(patches) * patch),
            patch_size=patch,
            prefix_rule="drops CLS (visual(x)[1], after ln_post)",
            select_layer="final (ln_post)",
        )

    def plan(self, loaded: Loaded, tower: NewTower, mode: str, select_layer: int | None) -> SwapPlan:
        if tower.kind != "openclip":
            raise ValueError(
                f"{tower.source}: OpenFlamingo's vision_encoder is an open_clip visual; found a {tower.kind} "
                "tower (export an HF CLIP to open_clip with align.clip_convert first)"
            )
        if mode == "rebuild" or select_layer is not None:
            raise ValueError(
                "OpenFlamingo supports drop-in only: the perceiver consumes the final-layer tokens"
            )
        old, dim = self.old_view(loaded), loaded.extra["dim"]
        if tower.width != dim:
            raise ValueError(
                f"refusing to swap {tower.source} into {loaded.extra['file']}: width {tower.width} but the perceiver "
                f"and gated cross-attention were trained for vision width {dim}"
            )
        stored = {k[len(PREFIX) :]: tuple(v.shape) for k, v in loaded.model.items() if k.startswith(PREFIX)}
        new_shapes = {k: tuple(v.shape) for k, v in tower.state_dict.items()}
        if stored and stored != new_shapes:
            differ = sorted(set(stored) ^ set(new_shapes)) or [
                k for k in stored if stored[k] != new_shapes[k]
            ]
            raise ValueError(
                f"refusing to swap {tower.source} into {loaded.extra['file']}: the open_clip visual differs from the "
                f"stored {PREFIX}* ({len(differ)} keys differ, e.g. {differ[:3]})"
            )
        loaded.extra["template"] = copy.deepcopy(_visual_of(tower)).eval()
        loaded.extra["preprocess"] = tower.encoder.preprocess
        new = TowerView(
            source=tower.source,
            arch=old.arch,
            width=tower.width,
            num_tokens=tower.num_patches,
            image_size=tower.image_size,
            patch_size=tower.patch_size,
            prefix_rule=old.prefix_rule,
            select_layer=old.select_layer,
        )
        notes = [
            "keys, shapes and the vision features are verified here; OpenFlamingo's forward is not run by swap "
            "(build it with open_flamingo.create_model_and_transforms from clip_vision_encoder_path)"
        ]
        if openclip_source(tower) is None:
            notes.append(
                f"{tower.source} is not an open_clip directory: vision_encoder/ holds visual.safetensors only; "
                "clip_vision_encoder_path is left as it was"
            )
        if not stored:
            notes.append(
                f"the checkpoint stored no {PREFIX}* weights; they were added (load with strict=False)"
            )
        reason = "requested" if mode == "dropin" else "auto: same open_clip visual and width"
        return SwapPlan("dropin", reason, old, new, notes=notes)

    def apply(self, loaded: Loaded, tower: NewTower, plan: SwapPlan) -> None:
        state = {k: v for k, v in loaded.model.items() if not k.startswith(PREFIX)}
        state.update({PREFIX + k: v for k, v in tower.state_dict.items()})
        loaded.model = state

    def save(self, loaded: Loaded, out: Path, final: Path, plan: SwapPlan, tower: NewTower) -> None:
        file = loaded.extra["file"]
        tensors = {k: v.contiguous() for k, v in loaded.model.items()}
        if file.suffix == ".safetensors":
            save_file(tensors, str(out / file.name), {"format": "pt"})
        else:
            torch.save(tensors, out / file.name)
        encoder_dir = write_openclip_dir(tower, out / "vision_encoder")
        meta = dict(loaded.extra["meta"])
        meta.update(
            vis_dim=tower.width, swapped_from=meta.get("clip_vision_encoder_path"), encoder=tower.source
        )
        if encoder_dir:
            meta.update(
                clip_vision_encoder_path=f"local-dir:{final / 'vision_encoder'}",
                clip_vision_encoder_pretrained=None,
            )
        (out / META).write_text(json.dumps(meta, indent=2) + "\n")

    @torch.no_grad()
    def consumed_tokens(self, loaded: Loaded, images: list[Image.Image]) -> torch.Tensor:
        visual = copy.deepcopy(loaded.extra["template"])
        stored = {k[len(PREFIX) :]: v for k, v in loaded.model.items() if k.startswith(PREFIX)}
        if not stored:
            raise ValueError(f"{loaded.extra['file']}: no {PREFIX}* weights stored; old features unavailable")
        visual.load_state_dict(stored, strict=True)
        visual.output_tokens = True
        return visual(loaded.extra["preprocess"](images))[1]


def openclip_source(tower: NewTower) -> Path | None:
    """The open_clip ``local-dir`` directory the new encoder was loaded from, if any."""
    from align.encoders.registry import resolve

    enc = tower.encoder
    backbone = enc if hasattr(enc, "visual") else enc.backbone
    try:
        source = resolve(backbone.source)
    except (KeyError, ValueError):
        return None
    return source if isinstance(source, Path) and (source / "open_clip_config.json").is_file() else None


def write_openclip_dir(tower: NewTower, out: Path) -> bool:
    """Write the new encoder as an open_clip ``local-dir`` model (its config, weights with the new visual)."""
    source = openclip_source(tower)
    if source is None:
        out.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tower.state_dict.items()}, str(out / "visual.safetensors"))
        return False
    out.mkdir(parents=True)
    shutil.copy2(source / "open_clip_config.json", out / "open_clip_config.json")
    weights = next(source.glob("open_clip_model.safetensors"), None) or next(source.glob("*.safetensors"))
    full = load_file(str(weights))
    full.update({f"visual.{k}": v for k, v in tower.state_dict.items()})
    save_file({k: v.contiguous() for k, v in full.items()}, str(out / "open_clip_model.safetensors"))
    for extra in source.iterdir():
        if (
            extra.is_file()
            and extra.suffix in (".txt", ".json")
            and extra.name != "tiny_build.json"
            and not (out / extra.name).exists()
        ):
            shutil.copy2(extra, out / extra.name)
    return True
