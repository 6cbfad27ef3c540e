"""Headless matplotlib for the project's figures, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from align.io import atomic_path


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | os.PathLike, dpi: int | None = None) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically (parent folders created), then close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
    return path
