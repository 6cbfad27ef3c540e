"""The contract between a training method and the loop: what a ``Method`` gives (``Method``) and
what a finished run gives back (``TrainResult``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from align.train.config import TrainConfig

__all__ = ["Method", "TrainResult"]


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
      attributes through ``align.train.accelerator.unwrap(model)``. Contrastive losses gather
      features across processes with ``align.losses.gather_features``.
    * optional ``param_groups(model, cfg) -> list[dict]``: optimizer groups, each with ``params``
      and optional ``lr``/``weight_decay``; every trainable parameter exactly once. Default:
      ``align.train.optim.default_param_groups(model, cfg.weight_decay)``.
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
