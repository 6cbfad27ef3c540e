"""Checkpoints of a run on disk: ``checkpoints/step-<N>/`` saved atomically, listed, pruned, set aside.

A checkpoint is ``accelerator.save_state`` written into ``.tmp-step-<N>``, then the trainer state file
(written last) and ``checksums.json``, then renamed to ``step-<N>``: a directory named ``step-<N>``
that holds the state file is complete; anything else is the remains of an interrupted save.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from align.integrity import record_checksums
from align.io import write_json

__all__ = [
    "STATE_FILE",
    "list_checkpoints",
    "prune_checkpoints",
    "reject_checkpoint",
    "remove_partial_checkpoints",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` as ``(step, path)``, oldest first.

    A checkpoint is complete when its directory is named ``step-<N>`` and holds the trainer state
    file, which is written last, just before the temporary directory is renamed into place.
    Temporary directories (``.tmp-step-<N>``) of interrupted saves never match.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: str | os.PathLike, keep: int, protect: Path | None = None) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints (never ``protect``, the last one known
    good); return the deleted paths."""
    ckpts = list_checkpoints(root)
    doomed = [path for _, path in ckpts[: max(0, len(ckpts) - keep)] if path != protect]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def remove_partial_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Delete temporary directories of checkpoint saves that never completed."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.startswith(".tmp-step-")]
    stale += [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and not (p / STATE_FILE).is_file()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def reject_checkpoint(path: Path) -> Path:
    """Set a checkpoint whose weights went bad aside as ``rejected-step-<N>`` (never resumed from)."""
    aside = path.with_name(f"rejected-{path.name}")
    shutil.rmtree(aside, ignore_errors=True)
    path.rename(aside)
    logger.warning("%s: its weights gave a bad loss; set aside as %s", path, aside.name)
    return aside


def save_checkpoint(
    accelerator: Accelerator, out_dir: Path, step: int, state: dict, keep: int, protect: Path | None = None
) -> Path:
    """``save_state`` into ``.tmp-step-N``, add the trainer state, rename to ``step-N`` (atomic)."""
    root = out_dir / "checkpoints"
    final, tmp = root / f"step-{step}", root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, state)
        record_checksums(tmp)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        prune_checkpoints(root, keep, protect)
    accelerator.wait_for_everyone()
    return final
