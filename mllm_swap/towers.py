"""Aligned vision towers in MLLM checkpoints: Auto-class registration and the remote code written with them.

The tower itself (``AlignedTowerConfig``, ``AlignedTower``, its token rule) lives in
:mod:`align.modeling_aligned_tower`, a self-contained module that is also the checkpoints' remote code.
Importing this module (``import mllm_swap`` does it) registers the tower with ``AutoConfig`` /
``AutoModel``, so checkpoints with an aligned tower reload with plain ``from_pretrained`` and no
``trust_remote_code``. :func:`add_remote_code` makes a written checkpoint load without this package.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from transformers import AutoConfig

from align import modeling_aligned_tower
from align.io import read_json, write_json
from align.modeling_aligned_tower import (  # noqa: F401  (the tower's public names, re-exported)
    MODEL_TYPE,
    TOKEN_RULES,
    AlignedLlavaConfig,
    AlignedLlavaForConditionalGeneration,
    AlignedTower,
    AlignedTowerConfig,
    prefix_tokens_of,
)

# auto_map of a checkpoint with an aligned tower, by the model_type of its config.json
AUTO_MAP = {
    "llava": {
        "AutoConfig": AlignedLlavaConfig,
        "AutoModelForImageTextToText": AlignedLlavaForConditionalGeneration,
    },
    MODEL_TYPE: {"AutoConfig": AlignedTowerConfig, "AutoModel": AlignedTower},
}


def register_towers() -> None:
    """Register the tower config with ``AutoConfig`` (idempotent; the module registers the model itself)."""
    AutoConfig.register(MODEL_TYPE, AlignedTowerConfig, exist_ok=True)


def remote_code_files() -> list[Path]:
    """The remote-code files: the tower module and the sibling modules it imports, recursively."""
    from transformers.dynamic_module_utils import get_relative_import_files

    module = Path(modeling_aligned_tower.__file__)
    return [module, *(Path(f) for f in get_relative_import_files(str(module)))]


def add_remote_code(directory: str | Path) -> list[str]:
    """Make the checkpoint in ``directory`` load without this package (Hugging Face's remote-code convention).

    When its ``config.json`` is an aligned tower's or has one as ``vision_config``, the tower's source files
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
    aligned = MODEL_TYPE in (model_type, (config.get("vision_config") or {}).get("model_type"))
    if aligned and model_type not in AUTO_MAP:
        raise ValueError(
            f"{path}: an aligned tower inside a '{model_type}' model has no remote code; "
            f"expected model_type one of {sorted(AUTO_MAP)}"
        )
    files = remote_code_files() if aligned else []
    module = Path(modeling_aligned_tower.__file__).stem
    old = config.get("auto_map") or {}
    new = {k: v for k, v in old.items() if not str(v).startswith(f"{module}.")}
    if aligned:
        new.update({auto: f"{module}.{cls.__name__}" for auto, cls in AUTO_MAP[model_type].items()})
    for file in files:
        shutil.copyfile(file, path.parent / file.name)
    if new != old:
        config.pop("auto_map", None)
        write_json(path, {**config, **({"auto_map": new} if new else {})})
    return [file.name for file in files]


register_towers()
