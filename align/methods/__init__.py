"""The alignment methods: the ``METHODS`` table (name -> recipe module, with the older names as aliases),
the one way to run any of them from a recipe (:func:`run_method`), and what every run records about its
training in the artifact's model card (:func:`training_record`).

A method's recipe module defines ``load_recipe(path, overrides)`` (its recipe dataclass on top of its
paper's training defaults) and its ``align.train.loop.Method`` class, constructed as ``(recipe, out_dir)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

__all__ = ["METHODS", "MethodEntry", "method_name", "run_method", "training_record"]


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """Where a method lives: its recipe ``module`` and ``Method`` class there, a one-line ``summary``, the
    embedded-default recipe in ``recipes/`` and the names earlier versions used (``aliases``)."""

    module: str
    method: str
    summary: str
    tiny_recipe: str
    aliases: tuple[str, ...] = ()


METHODS: dict[str, MethodEntry] = {
    "kuea": MethodEntry(
        "align.methods.kuea.recipe",
        "KueaMethod",
        "KUEA: fine-tune CLIP's image tower toward DINOv2's kernel",
        "tiny_kuea.yaml",
        aliases=("kernel",),
    ),
    "sail": MethodEntry(
        "align.methods.sail",
        "SailMethod",
        "SAIL: GLU heads on frozen DINOv2 + sentence-encoder embeddings, sigmoid loss",
        "tiny_sail.yaml",
    ),
    "freeze_align": MethodEntry(
        "align.methods.freeze_align",
        "FreezeAlignMethod",
        "freeze_align: token projectors on frozen encoders, InfoNCE",
        "tiny_freeze_align.yaml",
        aliases=("projector", "freeze-align"),
    ),
}


def method_name(word: str) -> str:
    """The method's one name for ``word`` (its name or an older alias); ``KeyError`` naming them otherwise."""
    for name, entry in METHODS.items():
        if word == name or word in entry.aliases:
            return name
    raise KeyError(f"unknown alignment method {word!r}; expected one of {sorted(METHODS)}")


def _out_dir_command(name: str, out_dir: str | os.PathLike) -> str:
    """``align NAME``, or the older ``align ALIAS`` an earlier version recorded in ``out_dir`` (so its
    runs still resume and ``--overwrite`` still replaces them)."""
    from align.io import read_json
    from align.rundir import MARKER

    marker = Path(out_dir) / MARKER
    recorded = read_json(marker).get("command") if marker.is_file() else None
    older = {f"align {alias}" for alias in METHODS[name].aliases}
    return recorded if recorded in older else f"align {name}"


def run_method(
    name: str,
    config: str | os.PathLike | None,
    overrides: list[str],
    out_dir: str | os.PathLike,
    resume: bool | str = "auto",
    overwrite: bool = False,
) -> Path:
    """Train method ``name`` (or an alias) from a recipe file and ``--set`` overrides into ``out_dir``
    (the full recipe saved as ``config.yaml``); returns the artifact directory."""
    from align.rundir import OutDir
    from align.train.loop import train

    name = method_name(name)
    entry = METHODS[name]
    module = importlib.import_module(entry.module)
    recipe = module.load_recipe(config, overrides)
    # The directory is claimed before the method writes its caches into it.
    with OutDir(out_dir, _out_dir_command(name, out_dir), overwrite, collective=True):
        method = getattr(module, entry.method)(recipe, out_dir)
        train(method, recipe.train, out_dir, resume, config_to_save=recipe, overwrite=overwrite)
    return Path(out_dir) / "artifact"


def training_record(
    out_dir: Path, data: str | None, counted: dict[str, int], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the model card says about training: ``data``, the ``counted`` training items (e.g.
    ``{"pairs": N}``), steps, global batch, samples seen, the final loss, ``extra`` entries and the recipe
    as really run (its ``config.yaml``: restored settings, ``resumed`` record)."""
    import torch
    import yaml

    from align.io import read_jsonl

    rows = read_jsonl(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    steps = int(last.get("step", 0))
    world = max(1, torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    used = yaml.safe_load((Path(out_dir) / "config.yaml").read_text())
    batch = used["train"]["batch_size"] * used["train"]["grad_accum"] * world
    return {
        "data": data,
        **counted,
        "steps": steps,
        "batch_size": batch,
        "samples_seen": steps * batch,
        "final_loss": last.get("loss"),
        **(extra or {}),
        "recipe": used,
    }
