"""Helpers of the training loop: data order and batch stream, checkpoints, resume rule, logs, plots."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, IterableDataset

from align.integrity import CorruptFileError, record_checksums, verify_dir
from align.io import atomic_path, read_json, read_jsonl, write_json
from align.recipes import TrainConfig
from align.rundir import OutDirError

__all__ = [
    "RUN_FILES",
    "STATE_FILE",
    "BatchStream",
    "LogWindow",
    "LossGuard",
    "PermutationSampler",
    "epoch_seed",
    "list_checkpoints",
    "plot_loss",
    "prune_checkpoints",
    "remove_partial_checkpoints",
    "reset_out_dir",
    "resolve_start",
    "restore_train_config",
    "save_checkpoint",
    "tracker_config",
    "truncate_metrics",
]

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order: a fixed function of the run seed and the epoch."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class PermutationSampler(torch.utils.data.Sampler[int]):
    """Indices ``0..n-1`` in an order fixed by ``seed`` (a random permutation computed when iterated).

    It holds no per-epoch state, so restarting a run re-creates exactly the same order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = int(n), int(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed)
        yield from torch.randperm(self.n, generator=generator).tolist()


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


def truncate_metrics(path: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """Keep the rows of a metrics file up to ``step`` (a resumed run drops the lost tail); return them.

    A torn last line (a kill while appending) is dropped with a warning; a malformed line elsewhere
    is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # the run was killed while appending it
            logger.warning("%s:%d: dropping a torn last line %.60r", path, len(lines), lines[-1])
            lines.pop()
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines))
    rows = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def tracker_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config dict to scalar values (lists and None as strings) for tracker hparams."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(tracker_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def plot_loss(rows: Sequence[dict[str, Any]], path: str | os.PathLike, title: str = "training loss") -> None:
    """Write a PNG of loss (and learning rate, when logged) against step, atomically."""
    from align.plots import pyplot, save_figure

    plt = pyplot()

    points = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    points = [(s, v) for s, v in points if math.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if points:
        steps, losses = zip(*points, strict=True)
        ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    lrs = [(r["step"], r["lr"]) for r in rows if isinstance(r.get("lr"), (int, float))]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="tab:orange", alpha=0.6, label="lr")
        twin.set_ylabel("learning rate")
    fig.tight_layout()
    save_figure(fig, path)


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


# Train settings a resume may change; every other one is restored from the checkpoint.
RESUME_MAY_CHANGE = ("save_every", "keep_checkpoints", "log_every", "num_workers", "report_to")


def restore_train_config(
    cfg: TrainConfig, start: Path | None, out_dir: Path
) -> tuple[TrainConfig, list[dict]]:
    """The train config a run really uses, and the record of its resumes for ``config.yaml``.

    Resuming restores the run's settings from the checkpoint (exact resume: same schedule, batch,
    precision and seed), except the bookkeeping ones in ``RESUME_MAY_CHANGE``. A requested change of a
    restored setting is ignored with a warning and recorded (``requested`` and ``used``) in a new entry
    of the ``resumed`` list, after the entries of earlier resumes.
    """
    import yaml

    from align.recipes import RESUMED_KEY, config_to_dict, load_config

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
    for name in ("checkpoints", "tensorboard"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", "result.json"):
        (out_dir / name).unlink(missing_ok=True)


class BatchStream:
    """Micro-batches as one stream across epochs; epoch ``e``'s order depends on (seed, e) only."""

    def __init__(self, method: Any, cfg: TrainConfig, accelerator: Accelerator) -> None:
        if not (hasattr(method, "dataloader") or hasattr(method, "train_dataset")):
            raise TypeError(f"{type(method).__name__}: a Method needs train_dataset() or dataloader()")
        self.method, self.cfg, self.accelerator = method, cfg, accelerator
        self.dataset = None if hasattr(method, "dataloader") else method.train_dataset()
        sized = self.dataset is not None and not isinstance(self.dataset, IterableDataset)
        if sized and len(self.dataset) < cfg.batch_size:
            raise ValueError(
                f"train dataset has {len(self.dataset)} samples, fewer than batch_size {cfg.batch_size}"
            )
        self.epoch, self.pos, self._iter = 0, 0, None

    def loader(self, epoch: int) -> Iterable:
        """The unprepared loader of one epoch."""
        seed = epoch_seed(self.cfg.seed, epoch)
        if self.dataset is None:
            return self.method.dataloader(self.cfg.batch_size, seed)
        sampler = None
        if not isinstance(self.dataset, IterableDataset):
            sampler = PermutationSampler(len(self.dataset), seed)
        return DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            collate_fn=getattr(self.method, "collate", None),
            generator=torch.Generator().manual_seed(seed),
        )

    def start(self, prepared: Any, epoch: int, skip: int) -> None:
        """Begin at batch ``skip`` of epoch ``epoch`` from its already prepared loader."""
        self.epoch, self.pos = epoch, skip
        self._open(self.accelerator.skip_first_batches(prepared, skip) if skip else prepared)

    def _open(self, loader: Any) -> None:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        self._iter = iter(loader)

    def next(self) -> Any:
        while True:
            try:
                batch = next(self._iter)
            except StopIteration:
                if self.pos == 0:
                    raise ValueError(f"the training data gave no batch in epoch {self.epoch}") from None
                self.epoch, self.pos = self.epoch + 1, 0
                self._open(self.accelerator.prepare_data_loader(self.loader(self.epoch)))
                continue
            self.pos += 1
            return batch


EXPLODE_FACTOR = 100.0  # see LossGuard
EXPLODE_WINDOW = 20


class LossGuard:
    """Judges each step's loss, and through it the weights that produced it.

    A loss is bad when it is NaN/inf, or when it explodes: ``|loss| > EXPLODE_FACTOR * max(|m|, 1)``
    where ``m`` is the median of the last ``EXPLODE_WINDOW`` good micro-batch losses (the window travels in
    checkpoints, so a resumed run judges as an uninterrupted one would). A checkpoint is good only when
    its weights are finite and the first loss computed with them (the next step's, or the final check's)
    is good.
    """

    def __init__(self, window: Sequence[float] | None = None) -> None:
        self.window = [float(v) for v in (window or [])][-EXPLODE_WINDOW:]

    def problem(self, losses: torch.Tensor) -> str | None:
        """What is wrong with the (gathered) losses of one micro-batch, or None."""
        values = losses.detach().float().flatten()
        if not torch.isfinite(values).all():
            return f"non-finite loss {values.tolist()}"
        if self.window:
            limit = EXPLODE_FACTOR * max(abs(float(np.median(self.window))), 1.0)
            worst = float(values.abs().max())
            if worst > limit:
                return (
                    f"exploding loss {worst:.4g} (more than {EXPLODE_FACTOR:g} x the recent median "
                    f"{float(np.median(self.window)):.4g})"
                )
        return None

    def add(self, loss: float) -> None:
        self.window = [*self.window, float(loss)][-EXPLODE_WINDOW:]


class LogWindow:
    """Sums of loss and method metrics since the last log row (saved in checkpoints)."""

    def __init__(self, state: Mapping[str, Any] | None = None) -> None:
        state = state or {}
        self.loss, self.n = float(state.get("loss", 0.0)), int(state.get("n", 0))
        self.metrics: dict[str, float] = dict(state.get("metrics", {}))

    def add(self, loss: float, metrics: Mapping[str, Any]) -> None:
        self.loss += loss
        self.n += 1
        for key, value in metrics.items():
            self.metrics[key] = self.metrics.get(key, 0.0) + float(value)

    def state(self) -> dict[str, Any]:
        return {"loss": self.loss, "n": self.n, "metrics": self.metrics}

    def row(self, accelerator: Accelerator) -> dict[str, float]:
        keys = sorted(self.metrics)
        local = torch.tensor([self.metrics[k] / max(1, self.n) for k in keys], dtype=torch.float64)
        if keys and accelerator.num_processes > 1:
            local = accelerator.reduce(local.to(accelerator.device), reduction="mean").cpu()
        row = {"loss": self.loss / max(1, self.n)}
        row.update({k: float(v) for k, v in zip(keys, local.tolist(), strict=True)})
        self.loss, self.n, self.metrics = 0.0, 0, {}
        return row


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
