"""The one training loop every method uses (SAIL, freeze-align, KUEA, MLLM instruction tuning).

``train(method, cfg, out_dir)`` runs on accelerate, so the same code runs on a CPU, on one GPU and
under ``accelerate launch`` (DDP or DeepSpeed, configured by the launcher or ``accelerator_kwargs``).

Outputs in ``out_dir``: ``config.yaml`` (the resolved recipe), ``metrics.jsonl`` (one row per log
step), ``tensorboard/`` (accelerate's tracker), ``checkpoints/step-<N>/`` (``accelerator.save_state``
written to a temporary directory, then renamed), ``loss.png``, ``result.json`` (written last: the
run is finished) and whatever ``method.save`` writes.

Resume rule: ``resume="auto"`` (or ``True``) continues from the newest complete checkpoint in
``out_dir`` and starts afresh when there is none; a path continues from that checkpoint; ``False``
starts over, clearing earlier checkpoints and metrics of an unfinished run. A finished run (one with
``result.json``) is never trained over: every mode refuses it unless ``overwrite=True``. A resumed
run skips the batches already consumed (data order is a function of seed and epoch only) and
restores model, optimizer, schedule and RNG states, so its final weights equal an uninterrupted
run's with the same seed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import (
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    ProjectConfiguration,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from torch import nn
from tqdm.auto import tqdm

from align.distributed import (
    check_world_size,
    fill_deepspeed_autos,
    launch_backend,
    launch_record,
    start_line,
    whole_model,
    whole_models,
)
from align.errors import UserError
from align.io import append_jsonl, read_json, write_json
from align.paths import portable_tree
from align.recipes import TrainConfig, config_to_dict, save_config
from align.rundir import claims_out_dir
from align.train.checkpoints import (
    STATE_FILE,
    BatchStream,
    LogWindow,
    LossGuard,
    list_checkpoints,
    plot_loss,
    remove_partial_checkpoints,
    reset_out_dir,
    resolve_start,
    restore_train_config,
    save_checkpoint,
    tracker_config,
    truncate_metrics,
)
from align.train.schedules import build_optimizer, build_scheduler, check_param_groups, default_param_groups

__all__ = ["Method", "NonFiniteLossError", "TrainResult", "default_param_groups", "train", "unwrap"]

logger = logging.getLogger(__name__)


@runtime_checkable
class Method(Protocol):
    """What a training method gives the loop. Required: ``build_model``, ``loss``, ``save`` and data.

    * ``build_model(cfg) -> nn.Module``: the module to train, called once after seeding with
      ``cfg.seed``. Frozen parts stay inside with ``requires_grad=False``. Read
      ``cfg.gradient_checkpointing`` here.
    * Data, one of:
      ``train_dataset() -> Dataset``: a map-style dataset; the loop batches it (``cfg.batch_size``
      per process, ``drop_last``) in a permutation fixed by ``(cfg.seed, epoch)``, collating with
      the optional ``collate(samples)``; or
      ``dataloader(batch_size, seed) -> Iterable``: called once per epoch with a seed derived from
      ``(cfg.seed, epoch)``; it must give the same batches in the same order for the same arguments
      and draw no global random numbers. Per-sample randomness (augmentation) should come from
      the sample index, not worker RNG, or resumed runs will differ.
    * ``loss(model, batch) -> (loss, metrics)``: a scalar tensor and a dict of floats or 0-d
      tensors (logged, averaged over the log window and processes). ``model`` is the prepared
      model (DDP/DeepSpeed wrapped): call it (its ``forward``) so gradients synchronize; reach
      attributes through ``unwrap(model)``. Contrastive losses gather features across processes
      with ``align.losses.gather_features``.
    * optional ``param_groups(model, cfg) -> list[dict]``: optimizer groups, each with ``params``
      and optional ``lr``/``weight_decay``; every trainable parameter exactly once. Default:
      ``default_param_groups(model, cfg.weight_decay)``.
    * optional ``after_step(model)``: called with the unwrapped model after each optimizer step
      (e.g. clamp a temperature in place).
    * optional ``state_dict() -> dict`` and ``load_state_dict(state)``: JSON-able counters of the
      method (e.g. tokens seen) saved in checkpoints and restored on resume, so they continue.
    * optional ``evaluate(model) -> dict``: called once at the end, on every process, in eval mode
      under ``torch.no_grad()``; the result goes to ``result.json`` and the trackers.
    * ``save(model, out_dir, state_dict)``: write the final artifact; called on the main process
      only, with the unwrapped model and its full state dict (gathered across DeepSpeed ZeRO-3
      shards by ``accelerator.get_state_dict``). ``evaluate`` and ``save`` get the model whole: under
      ZeRO-3 a plain copy with gathered parameters (``align.distributed.whole_model``).
    """

    def build_model(self, cfg: TrainConfig) -> nn.Module: ...

    def loss(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, Mapping[str, Any]]: ...

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, torch.Tensor]) -> None: ...


class NonFiniteLossError(UserError):
    """The loss became NaN/inf or exploded, or the weights did; the run stopped and kept its last good
    checkpoint (the rule: :class:`align.train.checkpoints.LossGuard`)."""


@dataclasses.dataclass
class TrainResult:
    """What a finished run reports (also written to ``out_dir/result.json``)."""

    out_dir: Path
    steps: int
    final_loss: float | None
    eval: dict[str, Any]
    last_checkpoint: Path | None
    resumed_from: Path | None
    elapsed_s: float
    samples_per_s: float
    launch: dict[str, Any] = dataclasses.field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP/DeepSpeed/compile wrappers (the one ``build_model`` returned)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _wandb_tracker(out_dir: Path) -> Any:
    """accelerate's wandb tracker: project ``$WANDB_PROJECT`` (default ``mllm-swap``), run named after
    ``out_dir``, files under ``out_dir/wandb`` (``WANDB_MODE=offline`` keeps them local for `wandb sync`)."""
    if not is_wandb_available():
        raise UserError(
            "train.report_to lists 'wandb' but the wandb package is not installed (pip install wandb)"
        )
    from accelerate.tracking import WandBTracker

    project = os.environ.get("WANDB_PROJECT", "mllm-swap")
    return WandBTracker(project, dir=str(out_dir), name=out_dir.resolve().name)


def _make_accelerator(cfg: TrainConfig, out_dir: Path, extra: Mapping[str, Any] | None) -> Accelerator:
    # Each run gets a fresh accelerate state, so several runs can follow one another in a process.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    use_tb = "tensorboard" in cfg.report_to and is_tensorboard_available()
    trackers: list[Any] = ["tensorboard"] if use_tb else []
    if "wandb" in cfg.report_to:
        trackers.append(_wandb_tracker(out_dir))
    kwargs: dict[str, Any] = {
        "mixed_precision": cfg.mixed_precision,
        "gradient_accumulation_plugin": GradientAccumulationPlugin(
            num_steps=cfg.grad_accum, sync_with_dataloader=False
        ),
        "step_scheduler_with_optimizer": False,
        "log_with": trackers or None,
        "project_config": ProjectConfiguration(
            project_dir=str(out_dir), logging_dir=str(out_dir / "tensorboard")
        ),
    }
    backend = launch_backend()
    if backend:
        kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend=backend)]
    kwargs.update(extra or {})
    return Accelerator(**kwargs)


def _configure_deepspeed(accelerator: Accelerator, cfg: TrainConfig, model: nn.Module) -> None:
    """Fill the DeepSpeed config's ``auto`` clipping and sizes (train config, model width); refuse its
    own optimizer."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    conf = plugin.deepspeed_config
    fill_deepspeed_autos(conf, model)
    for section in ("optimizer", "scheduler"):
        if section in conf:
            raise ValueError(
                f"DeepSpeed config: remove the '{section}' section; the loop builds the optimizer and "
                "lr schedule from the train config (train.optimizer, train.lr, train.schedule)"
            )
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = float(cfg.grad_clip or 0.0)


def _all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)


def _final_problem(
    method: Method, model: nn.Module, batch: Any, guard: LossGuard, accelerator: Accelerator
) -> str | None:
    """Judge the final weights before they are saved: finite, and a good loss on the last batch."""
    if not _all_finite(unwrap(model)):
        return "non-finite weights"
    if batch is None:  # no step ran in this session
        return None
    counters = method.state_dict() if hasattr(method, "state_dict") else None
    model.eval()
    with torch.no_grad():
        loss, _ = method.loss(model, batch)
    model.train()
    if counters is not None:  # the check is not training: counters stay as they were
        method.load_state_dict(counters)
    return guard.problem(accelerator.gather(loss.detach().float().reshape(1)))


def _stop(
    problem: str, out_dir: Path, bad: Path | None, good: Path | None, is_main: bool
) -> NonFiniteLossError:
    """The error ending a run that went bad; a checkpoint whose weights gave the bad loss is set aside."""
    if bad is not None and is_main and bad.is_dir():
        aside = bad.with_name(f"rejected-{bad.name}")
        shutil.rmtree(aside, ignore_errors=True)
        bad.rename(aside)
        logger.warning("%s: its weights gave a bad loss; set aside as %s", bad, aside.name)
    if good is None:
        remaining = list_checkpoints(out_dir / "checkpoints")
        good = remaining[-1][1] if remaining else None
    return NonFiniteLossError(
        f"{problem}; stopped without saving the final weights. Last good checkpoint: {good or 'none'}"
        " (resume from it with a lower train.lr, or see the loss guard in align.train.checkpoints.LossGuard)"
    )


@claims_out_dir("train", collective=True)
@torch.enable_grad()
def train(
    method: Method,
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool | str = "auto",
    *,
    overwrite: bool = False,
    accelerator_kwargs: Mapping[str, Any] | None = None,
    config_to_save: Any = None,
) -> TrainResult:
    """Train ``method`` with ``cfg``, writing everything to ``out_dir`` (see the module doc).

    ``accelerator_kwargs`` go to ``accelerate.Accelerator`` (e.g. ``deepspeed_plugin``);
    ``config_to_save`` is the full recipe written to ``config.yaml`` (default: ``cfg``). Gradients are
    enabled inside even when the caller is under ``torch.no_grad()`` (a model built lazily while
    embeddings are being cached, say). Raises
    ``NonFiniteLossError`` when the loss becomes NaN/inf, naming the step and the last good
    checkpoint, and ``FileExistsError`` for a finished run (see the resume rule).
    """
    out_dir = Path(out_dir)
    start = resolve_start(out_dir, resume, overwrite)
    cfg, resumed = restore_train_config(cfg, start, out_dir)
    if resumed and dataclasses.is_dataclass(config_to_save) and hasattr(config_to_save, "train"):
        config_to_save = dataclasses.replace(config_to_save, train=cfg)  # the recipe as really run
    accelerator = _make_accelerator(cfg, out_dir, accelerator_kwargs)
    check_world_size(accelerator)
    is_main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if start is None:
            reset_out_dir(out_dir)
        remove_partial_checkpoints(out_dir / "checkpoints")
        save_config(config_to_save if config_to_save is not None else cfg, out_dir / "config.yaml", resumed)
    accelerator.wait_for_everyone()
    state = read_json(start / STATE_FILE) if start else {"step": 0, "epoch": 0, "batch_in_epoch": 0}

    set_seed(cfg.seed)
    model = method.build_model(cfg)
    if hasattr(method, "param_groups"):
        groups = check_param_groups(method.param_groups(model, cfg), model)
    else:
        groups = default_param_groups(model, cfg.weight_decay)
    raw_optimizer = build_optimizer(groups, cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps)
    data = BatchStream(method, cfg, accelerator)
    _configure_deepspeed(accelerator, cfg, model)
    model, optimizer, first = accelerator.prepare(model, raw_optimizer, data.loader(state["epoch"]))
    if accelerator.gradient_accumulation_steps != cfg.grad_accum:
        raise ValueError(
            f"gradient accumulation: train.grad_accum is {cfg.grad_accum} but the accelerate/DeepSpeed "
            f"config uses {accelerator.gradient_accumulation_steps}; set it to 'auto' there"
        )
    per_epoch = len(first) if hasattr(first, "__len__") else None
    if cfg.steps is not None:
        total = cfg.steps
    elif per_epoch is None:
        raise ValueError("train.epochs needs a dataset with a length; set train.steps instead")
    else:
        total = max(1, int(cfg.epochs * per_epoch) // cfg.grad_accum)
    scheduler = accelerator.prepare_scheduler(
        build_scheduler(
            raw_optimizer, total, min(total, cfg.warmup_steps(total)), cfg.schedule, cfg.min_lr_ratio
        )
    )
    if start:
        accelerator.load_state(str(start))
    step = int(state["step"])
    launch = launch_record(accelerator, model, cfg.batch_size, cfg.grad_accum)
    accelerator.print(start_line(launch, step, start))
    data.start(first, int(state["epoch"]), int(state["batch_in_epoch"]))
    window = LogWindow(state.get("window"))
    guard = LossGuard(state.get("loss_window"))
    if state.get("method") is not None and hasattr(method, "load_state_dict"):
        method.load_state_dict(state["method"])  # its counters continue
    batch = None

    history: list[dict] = []
    metrics_path = out_dir / "metrics.jsonl"
    if is_main:
        history = truncate_metrics(metrics_path, step)
    if accelerator.log_with:
        accelerator.init_trackers("train", config=tracker_config(config_to_dict(cfg)))
    samples_per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    last_ckpt = None  # the newest checkpoint known good; `pending` waits for its first loss
    pending = start if start and start.parent == out_dir / "checkpoints" else None
    pbar = tqdm(total=total, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    t_start = t_log = time.perf_counter()
    steps_at_log, steps_done = step, 0
    model.train()
    try:
        while step < total:
            batch = data.next()
            with accelerator.accumulate(model):
                loss, metrics = method.loss(model, batch)
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    raise TypeError(
                        f"{type(method).__name__}.loss must return (scalar tensor, dict), got {loss!r}"
                    )
                losses = accelerator.gather(loss.detach().float().reshape(1))
                problem = guard.problem(losses)
                if problem:
                    raise _stop(
                        f"{problem} at step {step + 1} (of {total})", out_dir, pending, last_ckpt, is_main
                    )
                if pending is not None:  # its weights gave a good loss
                    last_ckpt, pending = pending, None
                guard.add(losses.mean().item())
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.grad_clip:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                lr = raw_optimizer.param_groups[0]["lr"]
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            window.add(losses.mean().item(), metrics)
            if not accelerator.sync_gradients:
                continue
            step += 1
            steps_done += 1
            if hasattr(method, "after_step"):
                method.after_step(unwrap(model))
            pbar.update(1)
            if step % cfg.log_every == 0 or step == total:
                now = time.perf_counter()
                row = {"step": step, "epoch": data.epoch + (data.pos / per_epoch if per_epoch else 0.0)}
                row.update(window.row(accelerator))
                row["lr"] = lr
                if grad_norm is not None:
                    row["grad_norm"] = float(grad_norm)
                row["samples_per_s"] = samples_per_step * (step - steps_at_log) / max(now - t_log, 1e-9)
                t_log, steps_at_log = now, step
                history.append(row)
                if is_main and "jsonl" in cfg.report_to:
                    append_jsonl(metrics_path, row)
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
                pbar.set_postfix(loss=f"{row['loss']:.4g}", samples_s=f"{row['samples_per_s']:.1f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                if not _all_finite(unwrap(model)):
                    raise _stop(f"non-finite weights after step {step}", out_dir, None, last_ckpt, is_main)
                ckpt_state = {
                    "step": step,
                    "epoch": data.epoch,
                    "batch_in_epoch": data.pos,
                    "total_steps": total,
                    "window": window.state(),
                    "loss_window": guard.window,
                    "method": method.state_dict() if hasattr(method, "state_dict") else None,
                    "train_config": config_to_dict(cfg),
                }
                pending = save_checkpoint(
                    accelerator, out_dir, step, ckpt_state, cfg.keep_checkpoints, protect=last_ckpt
                )
        pbar.close()
        problem = _final_problem(method, model, batch, guard, accelerator)
        if problem:
            raise _stop(f"{problem} after the last step {step}", out_dir, pending, last_ckpt, is_main)
        last_ckpt = pending or last_ckpt
        elapsed = time.perf_counter() - t_start
        inner = whole_model(unwrap(model))  # under ZeRO-3 a whole copy, made on every process
        results: dict[str, Any] = {}
        if hasattr(method, "evaluate"):
            inner.eval()
            with torch.no_grad(), whole_models():
                results = dict(method.evaluate(inner))
            accelerator.log(
                {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}, step=step
            )
        state_dict = accelerator.get_state_dict(model)
        result = TrainResult(
            out_dir=out_dir,
            steps=step,
            final_loss=next((r["loss"] for r in reversed(history) if "loss" in r), None),
            eval=results,
            last_checkpoint=last_ckpt,
            resumed_from=start,
            elapsed_s=elapsed,
            samples_per_s=samples_per_step * steps_done / max(elapsed, 1e-9),
            launch=launch,
        )
        if is_main:
            with whole_models():
                method.save(inner, out_dir, state_dict)
            plot_loss(history, out_dir / "loss.png")
            record = config_to_dict(dataclasses.asdict(result))
            write_json(out_dir / "result.json", portable_tree(record, out_dir))  # the run folder travels
        accelerator.wait_for_everyone()
        return result
    finally:
        pbar.close()
        for tracker in accelerator.trackers:  # not end_training(): it would end the process group
            tracker.finish()
