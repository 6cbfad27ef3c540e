"""Evaluation after training, shared by the methods: the recipe's ``eval`` section, the held-out data it
names, and the zero-shot scores of an ``AlignedEncoder`` (SAIL, freeze_align; KUEA reports through
:mod:`align.methods.kuea.report`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

__all__ = ["EvalConfig", "eval_data", "zero_shot_scores"]


@dataclasses.dataclass
class EvalConfig:
    """Zero-shot evaluation after training: classification of ``data`` (a shapes world or an image
    folder; default: ``data.train`` when it is a shapes world) on ``split``: a shapes world by each of
    ``labels`` (its class sets), an image folder by its sub-directories (reported as ``class``)."""

    data: str | None = None
    split: str | None = "test"
    labels: list[str] = dataclasses.field(default_factory=lambda: ["color", "shape"])
    limit: int | None = None
    drift_images: int = 256


def eval_data(eval_cfg: EvalConfig, data: Any) -> str | None:
    """The zero-shot data path: ``eval.data``, else ``data.train`` when it is a shapes world."""
    if eval_cfg.data:
        return eval_cfg.data
    if data.train and (Path(data.train) / "classes.json").is_file():
        return data.train
    return None


@torch.no_grad()
def zero_shot_scores(encoder: Any, eval_cfg: EvalConfig, data: Any) -> dict[str, Any]:
    """Zero-shot classification per label and per-patch drift of an ``AlignedEncoder`` (empty without data)."""
    from align.artifact import patch_drift
    from align.data.images import open_image
    from align.data.readers import open_data
    from align.encoders.dual import DualEncoder
    from align.evals.zeroshot import run_classify

    path = eval_data(eval_cfg, data)
    if path is None:
        return {}
    dual = DualEncoder(encoder.eval(), name="trained")
    scores: dict[str, Any] = {"zeroshot": {}, "eval_data": str(path), "eval_split": eval_cfg.split}
    shapes = (Path(path) / "classes.json").is_file()
    for label in eval_cfg.labels if shapes else ["class"]:  # an image folder has one class set
        result = run_classify(dual, path, label=label, split=eval_cfg.split, limit=eval_cfg.limit)
        keep = ("acc1", "acc5", "mean_per_class_recall", "chance", "majority", "n")
        scores["zeroshot"][label] = {k: result[k] for k in keep if k in result}
    tabular = Path(path).is_file() or (Path(path) / "pairs.jsonl").is_file()
    samples = open_data(path, split=eval_cfg.split if tabular else None).samples[: eval_cfg.drift_images]
    pixels = encoder.preprocess([open_image(s.image) for s in samples])
    param = next(encoder.parameters())
    scores["patch_drift"] = patch_drift(encoder, pixels.to(param.device, param.dtype))
    return scores
