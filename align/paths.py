"""Where mllm-swap keeps what it builds (tiny models, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Root of the project's cache: ``$MLLM_SWAP_HOME`` or ``~/.cache/mllm-swap``."""
    root = os.environ.get("MLLM_SWAP_HOME")
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mllm-swap"


def models_dir() -> Path:
    """Directory holding the built tiny models, one sub-directory per id."""
    return home() / "models"
