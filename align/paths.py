"""Where mllm-swap keeps what it builds (tiny models, caches)."""

from __future__ import annotations

import os
import sys
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


def shipped(name: str) -> Path:
    """A folder shipped with the project (``recipes``, ``eval_configs``, ``deepspeed_configs``).

    A source checkout (editable install) uses its top-level folder; a wheel install the copy under
    ``<prefix>/share/mllm-swap``.
    """
    for root in (Path(__file__).resolve().parent.parent, Path(sys.prefix) / "share" / "mllm-swap"):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(
        f"shipped folder {name!r} not found next to the source tree nor under {sys.prefix}/share/mllm-swap; "
        "reinstall mllm-swap"
    )
