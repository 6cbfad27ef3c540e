"""MLLM families the swap understands, and detection of a checkpoint's family from its files."""

from __future__ import annotations

import json
from pathlib import Path

from mllm_swap.families.base import Family, Loaded, SwapPlan, TowerView

STATE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
FAMILIES = ("llava_hf", "llava_original", "idefics", "openflamingo")


def family_by_name(name: str) -> Family:
    """The family object for ``name`` (one of :data:`FAMILIES`)."""
    if name == "llava_hf":
        from mllm_swap.families.llava_hf import LlavaHF

        return LlavaHF()
    if name == "llava_original":
        from mllm_swap.families.llava_original import LlavaOriginal

        return LlavaOriginal()
    if name == "idefics":
        from mllm_swap.families.idefics import Idefics

        return Idefics()
    if name == "openflamingo":
        from mllm_swap.families.openflamingo import OpenFlamingo

        return OpenFlamingo()
    raise ValueError(f"unknown MLLM family '{name}'; expected one of {list(FAMILIES)}")


def detect_family(path: str | Path) -> Family:
    """Which family a checkpoint (directory, or an OpenFlamingo state-dict file) belongs to."""
    path = Path(path)
    if path.is_file():
        if path.suffix in STATE_SUFFIXES:
            return family_by_name("openflamingo")
        raise ValueError(
            f"{path}: unknown MLLM checkpoint file; expected a directory or {list(STATE_SUFFIXES)}"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: MLLM checkpoint not found")
    config_file = path / "config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_file}: not valid JSON ({err})") from err
        model_type = config.get("model_type", "")
        if model_type in ("llava", "llava_next"):
            return family_by_name("llava_hf")
        if model_type == "llava_llama" or "mm_vision_tower" in config:
            return family_by_name("llava_original")
        if model_type == "idefics":
            return family_by_name("idefics")
        raise ValueError(
            f"{config_file}: unknown MLLM family (model_type '{model_type}'); supported: HF llava / llava_next, "
            "original LLaVA-1.5 (llava_llama with mm_vision_tower), idefics, OpenFlamingo state dicts"
        )
    if (path / "openflamingo.json").is_file() or any(
        (path / f"checkpoint{s}").is_file() for s in STATE_SUFFIXES
    ):
        return family_by_name("openflamingo")
    found = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(
        f"{path}: unknown MLLM family: no config.json (HF / original LLaVA / IDEFICS) and no "
        f"checkpoint.pt|.bin|.safetensors (OpenFlamingo); found {found}"
    )


__all__ = ["FAMILIES", "Family", "Loaded", "SwapPlan", "TowerView", "detect_family", "family_by_name"]
