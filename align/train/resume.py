"""Where a run starts: the resume rule over its output directory, and the settings a resume keeps.

``resume="auto"`` (or ``True``) continues from the newest intact checkpoint and starts afresh when
there is none; a path continues from that checkpoint; ``False`` starts over. A finished run (one with
``result.json``) is refused in every mode unless ``overwrite``. A resumed run keeps the settings it was
started with, except the bookkeeping ones in ``RESUME_MAY_CHANGE``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import yaml

from align.integrity import CorruptFileError, verify_dir
from align.io import read_json
from align.recipes import RESUMED_KEY, config_to_dict, load_config
from align.rundir import OutDirError
from align.train.checkpoints import STATE_FILE, list_checkpoints
from align.train.config import TrainConfig

__all__ = ["RESUME_MAY_CHANGE", "RUN_FILES", "reset_out_dir", "resolve_start", "restore_train_config"]

logger = logging.getLogger(__name__)

# What the loop itself writes in an output directory (the method's outputs sit beside them).
RUN_FILES = (
    "checkpoints",
    "tensorboard",
    "metrics.jsonl",
    "loss.png",
    "result.json",
    "config.yaml",
    "run.json",
)
# Train settings a resume may change; every other one is restored from the checkpoint.
RESUME_MAY_CHANGE = ("save_every", "keep_checkpoints", "log_every", "num_workers", "report_to")


def resolve_start(out_dir: Path, resume: bool | str, overwrite: bool) -> Path | None:
    """The checkpoint to continue from (or None), applying the module's resume rule.

    Every checkpoint is verified against its ``checksums.json`` before use. With ``"auto"`` a corrupt
    newest checkpoint falls back to the newest intact one with a warning; when every checkpoint is
    corrupt (or an explicitly given one is) it raises :class:`~align.integrity.CorruptFileError`.
    """
    finished = out_dir / "result.json"
    if finished.is_file() and not overwrite:
        raise OutDirError(
            f"{out_dir}: holds a finished run ({finished.name}); refusing to train over it. "
            "Use a new output directory, or --overwrite to train again from scratch."
        )
    if overwrite or resume is False:
        return None
    if resume is True or resume == "auto":
        bad = []
        for _, path in reversed(list_checkpoints(out_dir / "checkpoints")):
            try:
                verify_dir(path, "checkpoint")
            except CorruptFileError as err:
                bad.append(str(err))
                logger.warning("skipping corrupt checkpoint: %s", err)
                continue
            if bad:
                logger.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        if bad:
            raise CorruptFileError(
                f"{out_dir / 'checkpoints'}: no intact checkpoint to resume from: "
                + "; ".join(bad)
                + ". Use --no-resume to start over."
            )
        return None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (expected {STATE_FILE} inside)")
    verify_dir(path, "checkpoint")
    return path


def restore_train_config(
    cfg: TrainConfig, start: Path | None, out_dir: Path
) -> tuple[TrainConfig, list[dict]]:
    """The train config a run really uses, and the record of its resumes for ``config.yaml``.

    Resuming restores the run's settings from the checkpoint (exact resume: same schedule, batch,
    precision and seed), except the bookkeeping ones in ``RESUME_MAY_CHANGE``. A requested change of a
    restored setting is ignored with a warning and recorded (``requested`` and ``used``) in a new entry
    of the ``resumed`` list, after the entries of earlier resumes.
    """
    if start is None:
        return cfg, []
    config_file = out_dir / "config.yaml"
    earlier = yaml.safe_load(config_file.read_text()) if config_file.is_file() else None
    history = list((earlier or {}).get(RESUMED_KEY) or []) if isinstance(earlier, dict) else []
    requested, saved = config_to_dict(cfg), read_json(start / STATE_FILE).get("train_config") or {}
    used = {k: v if k in RESUME_MAY_CHANGE or k not in saved else saved[k] for k, v in requested.items()}
    ignored = {k: {"requested": requested[k], "used": used[k]} for k in requested if used[k] != requested[k]}
    if ignored:
        logger.warning(
            "resuming from %s: its settings are kept; ignoring the requested changes %s (start a new run, "
            "or --overwrite, to train with them)",
            start,
            {k: f"{v['used']} -> {v['requested']} ignored" for k, v in ignored.items()},
        )
    where = start.relative_to(out_dir).as_posix() if start.is_relative_to(out_dir) else start.name
    entry = {"from": where, "step": int(read_json(start / STATE_FILE)["step"]), "ignored": ignored}
    return load_config(TrainConfig, base=used), [*history, entry]


def reset_out_dir(out_dir: Path) -> None:
    """Clear what an unfinished earlier run left (checkpoints, logs, plot) before starting over."""
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "result.json"):
        (out_dir / name).unlink(missing_ok=True)
