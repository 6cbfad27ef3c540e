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


def portable(path: str | os.PathLike, base: str | os.PathLike) -> str:
    """How a file written into directory ``base`` refers to ``path`` without a machine's absolute path.

    Ids stay as they are (``tiny-clip``, hub ids, ``openclip:NAME/TAG``); a tiny model built under
    :func:`models_dir` becomes its id; any other local path becomes relative to ``base`` and starts with
    ``./`` or ``../`` (so it never reads as a hub id ``org/name``). :func:`locate` reverses it.
    """
    text = str(path)
    local = Path(text).expanduser()
    if not (local.is_absolute() or text.startswith(".") or local.exists()):
        return text
    local = local.resolve()
    if local.parent == models_dir().resolve():
        return local.name
    rel = Path(os.path.relpath(local, Path(base).resolve())).as_posix()
    return rel if rel in (".", "..") or rel.startswith("../") else f"./{rel}"


def portable_tree(tree: object, base: str | os.PathLike) -> object:
    """A JSON-able record with every absolute path in it made :func:`portable` relative to ``base``."""
    if isinstance(tree, dict):
        return {k: portable_tree(v, base) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [portable_tree(v, base) for v in tree]
    if isinstance(tree, str) and Path(tree).is_absolute():
        return portable(tree, base)
    return tree


def locate(ref: str, base: str | os.PathLike) -> str | Path:
    """The source a file in ``base`` recorded with :func:`portable`: ``./``/``../`` paths joined to ``base``,
    ids unchanged."""
    return Path(base) / ref if ref in (".", "..") or ref.startswith(("./", "../")) else ref
