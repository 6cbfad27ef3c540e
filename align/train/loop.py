"""The one training loop every method uses (SAIL, freeze_align, KUEA, MLLM instruction tuning).

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
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from align.distributed import (
    check_world_size,
    launch_record,
    settle_partitions,
    start_line,
    whole_model,
    whole_models,
)
from align.io import append_jsonl, read_json, write_json
from align.paths import portable_tree
from align.recipes import config_to_dict, save_config
from align.rundir import claims_out_dir
from align.train.accelerator import configure_deepspeed, make_accelerator, unwrap
from align.train.batches import BatchStream
from align.train.checkpoints import STATE_FILE, remove_partial_checkpoints, save_checkpoint
from align.train.config import TrainConfig
from align.train.guard import LossGuard, stop_error, weights_finite
from align.train.logs import LogWindow, plot_loss, tracker_config, truncate_metrics
from align.train.method import Method, TrainResult
from align.train.optim import build_optimizer, build_scheduler, check_param_groups, default_param_groups
from align.train.resume import reset_out_dir, resolve_start, restore_train_config

__all__ = ["train"]


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
    accelerator = make_accelerator(cfg, out_dir, accelerator_kwargs)
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
    configure_deepspeed(accelerator, cfg, model)
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
                    raise stop_error(
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
                if not weights_finite(unwrap(model)):
                    raise stop_error(
                        f"non-finite weights after step {step}", out_dir, None, last_ckpt, is_main
                    )
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
        settle_partitions(model)
        problem = guard.final_problem(method, model, batch, accelerator)
        settle_partitions(model)  # that check's forward ran out of the recorded order
        if problem:
            raise stop_error(f"{problem} after the last step {step}", out_dir, pending, last_ckpt, is_main)
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
