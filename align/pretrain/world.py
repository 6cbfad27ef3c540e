"""What every pretraining in :mod:`align.pretrain` shares: the images it learns from and how it publishes.

:func:`train_rows` gives the train split of a given shapes world (checked) or of a fresh one generated from
a seed; :func:`publish` moves a finished model directory into ``out`` entry by entry (each an atomic rename).
"""

from __future__ import annotations

import os
from pathlib import Path

from align.errors import UserError

__all__ = ["check_world", "publish", "train_rows"]


def check_world(shapes_dir: str | os.PathLike) -> Path:
    """``shapes_dir`` as a path, checked to be a shapes world (a directory with ``pairs.jsonl``)."""
    world = Path(shapes_dir)
    if not (world / "pairs.jsonl").is_file():
        found = (
            "does not exist"
            if not world.exists()
            else "is not a directory"
            if not world.is_dir()
            else "has no pairs.jsonl"
        )
        raise UserError(
            f"{world}: not a shapes world ({found}; expected {world / 'pairs.jsonl'}); write one with "
            "`mllm-swap data shapes --out DIR --n N --seed S`"
        )
    return world


def train_rows(shapes_dir: str | os.PathLike | None, tmp: Path, n: int, seed: int) -> tuple[Path, list[dict]]:
    """``(world dir, its train rows)``: ``shapes_dir``'s, or those of a world of ``n`` images from ``seed``
    generated under ``tmp``. Raises ``UserError`` naming the directory when it is not a shapes world
    or has no train images."""
    from align.data.shapes import generate_shapes, load_shapes

    if shapes_dir is None:
        world = tmp / "shapes"
        generate_shapes(world, n=n, seed=seed, progress=False)
    else:
        world = check_world(shapes_dir)
    rows = load_shapes(world, split="train")
    if not rows:
        raise UserError(f"{world}: no image in the 'train' split of pairs.jsonl; pretraining learns from it")
    missing = [r["image"] for r in rows if not Path(r["image"]).is_file()]
    if missing:
        raise UserError(f"{world}: {len(missing)} train image(s) missing (first: {missing[0]})")
    return world, rows


def publish(built: Path, out: str | os.PathLike) -> Path:
    """Move every entry of the finished directory ``built`` into ``out`` (created); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in built.iterdir():
        item.replace(out / item.name)
    return out
