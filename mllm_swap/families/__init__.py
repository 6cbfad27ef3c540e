"""MLLM families the swap understands (the :data:`FAMILIES` table), and detection of a checkpoint's family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mllm_swap.families.base import Family, Loaded, SwapPlan, TowerView
from mllm_swap.families.idefics import Idefics
from mllm_swap.families.llava_hf import LlavaHF
from mllm_swap.families.llava_original import LlavaOriginal
from mllm_swap.families.openflamingo import OpenFlamingo

# name -> family, in detection order (the first whose ``recognizes`` accepts a checkpoint is its family)
FAMILIES: dict[str, type[Family]] = {
    "llava_hf": LlavaHF,
    "llava_original": LlavaOriginal,
    "idefics": Idefics,
    "openflamingo": OpenFlamingo,
}


def family_by_name(name: str) -> Family:
    """The family object for ``name`` (a key of :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown MLLM family '{name}'; expected one of {list(FAMILIES)}")
    return FAMILIES[name]()


def read_config(path: Path) -> dict[str, Any] | None:
    """A checkpoint directory's ``config.json`` (None for a file or a directory without one)."""
    config_file = path / "config.json"
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err


def detect_family(path: str | Path) -> Family:
    """Which family a checkpoint (directory, or an OpenFlamingo state-dict file) belongs to."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: MLLM checkpoint not found")
    config = None if path.is_file() else read_config(path)
    for family in FAMILIES.values():
        if family.recognizes(path, config):
            return family()
    supported = "; ".join(f.formats for f in FAMILIES.values())
    if path.is_file():
        raise ValueError(f"{path}: unknown MLLM checkpoint file; expected a directory or one of: {supported}")
    if config is not None:
        raise ValueError(
            f"{path / 'config.json'}: unknown MLLM family (model_type '{config.get('model_type', '')}'); "
            f"supported: {supported}"
        )
    found = sorted(p.name for p in path.iterdir())[:12]
    raise ValueError(f"{path}: unknown MLLM family: no config.json and not one of: {supported}; found {found}")


__all__ = ["FAMILIES", "Family", "Loaded", "SwapPlan", "TowerView", "detect_family", "family_by_name"]
