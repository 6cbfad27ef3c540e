"""Pieces SAIL and freeze-align share: recipe sections for data and evaluation, paired embedding caches,
zero-shot scoring of the result, and running a recipe through the shared loop.

Data flow: ``prepare_caches`` encodes the training pairs once with the frozen encoders into
``OUT/cache/`` (``align.data.cache.write_cache``; resumable, skipped when caches are given), and
:class:`PairedCaches` serves row-aligned batches ``{"image": ..., "texts": [...]}`` from the
memory-mapped caches (token caches give ``(tokens, mask)`` pairs).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from align.data.cache import write_cache
from align.data.cache_read import EmbeddingCache
from align.errors import UserError

__all__ = [
    "DataConfig",
    "EvalConfig",
    "PairedCaches",
    "prepare_caches",
    "run_recipe",
    "training_record",
    "zero_shot_scores",
]


@dataclasses.dataclass
class DataConfig:
    """Training pairs. ``train``: any source ``open_data`` reads (shapes dir, pairs file, ...).

    ``captions``: caption columns; the first is the positive text, further ones are extra positives
    (SAIL multi-positive; freeze-align uses only the first). ``image_cache`` / ``text_caches``: caches
    built beforehand (``mllm-swap encode``), one text cache per caption column; otherwise they are
    built into ``OUT/cache``.
    """

    train: str = ""
    split: str | None = "train"
    captions: list[str] = dataclasses.field(default_factory=lambda: ["caption"])
    image_cache: str | None = None
    text_caches: list[str] = dataclasses.field(default_factory=list)
    cache_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    encode_batch_size: int = 64
    max_tokens: int = 77
    on_error: Literal["raise", "skip"] = "raise"


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


def prepare_caches(
    vision: str, text: str, data: DataConfig, out_dir: str | os.PathLike, image_pool: str, text_pool: str
) -> tuple[EmbeddingCache, list[EmbeddingCache]]:
    """Open (or first build) the image cache and one text cache per caption column."""
    from align.data.readers import open_data

    n_text = len(data.captions)
    if not n_text:
        raise ValueError("data.captions: need at least one caption column")
    given = data.image_cache is not None or bool(data.text_caches)
    if given and (data.image_cache is None or len(data.text_caches) != n_text):
        raise ValueError(
            f"data.image_cache and data.text_caches go together: one image cache and {n_text} text cache(s) "
            f"(one per data.captions entry), found {data.image_cache!r} and {data.text_caches}"
        )
    if given:
        image, texts = EmbeddingCache(data.image_cache), [EmbeddingCache(p) for p in data.text_caches]
    else:
        if not data.train:
            raise ValueError(
                "data.train: no training data given (set data.train=PATH or give prebuilt caches)"
            )
        source = open_data(data.train, split=data.split, text_col=list(data.captions), on_error=data.on_error)
        root = Path(out_dir) / "cache"
        common = {"dtype": data.cache_dtype, "batch_size": data.encode_batch_size, "on_error": data.on_error}
        image_path = root / f"image-{image_pool}"
        # Load the encoder here, not inside write_cache's no-grad scope (a tiny-* id may be built on first use).
        vision_encoder = vision if (image_path / "manifest.json").is_file() else _load_vision(vision)
        image = EmbeddingCache(write_cache(vision_encoder, source, image_path, "image", image_pool, **common))
        text_encoder = None
        texts = []
        for k in range(n_text):
            path = root / f"text-{text_pool}-{k}"
            if not (path / "manifest.json").is_file() and text_encoder is None:
                from align.encoders.registry import load_text_encoder

                text_encoder = load_text_encoder(text)
            encoder = text_encoder if text_encoder is not None else text
            cache = write_cache(
                encoder,
                source,
                path,
                "text",
                text_pool,
                caption_index=k,
                max_tokens=data.max_tokens,
                **common,
            )
            texts.append(EmbeddingCache(cache))
    want = {"image": (image, image_pool, vision)} | {
        f"text {k}": (c, text_pool, text) for k, c in enumerate(texts)
    }
    for name, (cache, pool, encoder) in want.items():
        if cache.manifest["pool"] != pool:
            raise ValueError(
                f"{cache.path}: {name} cache has pool {cache.manifest['pool']!r}; this method needs {pool!r}"
            )
        _check_width(cache, name, pool)
        made_by = cache.manifest["encoder"].get("source")
        if given and made_by != encoder:
            warnings.warn(
                f"{cache.path}: {name} cache was made with '{made_by}' but the recipe names '{encoder}'; the "
                "artifact will pair the trained heads with the recipe's encoder",
                UserWarning,
                stacklevel=2,
            )
    return image, texts


# Cache width per image pooling, in multiples of the encoder's embed_dim ([CLS ; mean] for concat).
POOL_WIDTH = {"concat": 2, "cls": 1, "mean": 1, "tokens": 1}


def _check_width(cache: EmbeddingCache, name: str, pool: str) -> None:
    """An image cache's shards must be as wide as its manifest's encoder says (heads are sized from it)."""
    embed_dim = cache.manifest["encoder"].get("embed_dim")
    if not name.startswith("image") or pool not in POOL_WIDTH or not isinstance(embed_dim, int):
        return
    if cache.dim != POOL_WIDTH[pool] * embed_dim:
        raise UserError(
            f"{cache.path / 'manifest.json'}: encoder.embed_dim {embed_dim} means {pool!r} rows of width "
            f"{POOL_WIDTH[pool] * embed_dim}, but the shards hold width {cache.dim}; the manifest disagrees "
            "with its shards (rerun the encode command)"
        )


def _load_vision(spec: str):
    from align.encoders.registry import load_vision_encoder

    return load_vision_encoder(spec)


class PairedCaches(Dataset):
    """Row-aligned pairs across an image cache and text caches (matched by sample id).

    Items are indices; :meth:`collate` turns a list of them into ``{"image": x, "texts": [t0, t1, ...]}``
    with one batched read per cache (``x``/``t`` are tensors, or ``(tokens, mask)`` for token caches).
    """

    def __init__(self, image: EmbeddingCache, texts: list[EmbeddingCache]) -> None:
        self.image, self.texts = image, texts
        columns = [self._index(image)] + [self._index(t) for t in texts]
        shared = [i for i in image.ids if all(i in col for col in columns[1:])]
        if not shared:
            raise ValueError(
                f"{image.path}: no sample id is shared with the text caches {[str(t.path) for t in texts]}"
            )
        self.rows = np.array([[col[i] for col in columns] for i in shared], dtype=np.int64)
        self.ids = shared

    @staticmethod
    def _index(cache: EmbeddingCache) -> dict[str, int]:
        index = {sid: row for row, sid in enumerate(cache.ids)}
        if len(index) != len(cache.ids):
            raise ValueError(f"{cache.path}: sample ids are not unique; cannot pair rows across caches")
        return index

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> int:
        return index

    def collate(self, indices: list[int]) -> dict[str, Any]:
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        return {
            "image": self.image.get(rows[:, 0]),
            "texts": [t.get(rows[:, k + 1]) for k, t in enumerate(self.texts)],
        }


def eval_data(eval_cfg: EvalConfig, data: DataConfig) -> str | None:
    """The zero-shot data path: ``eval.data``, else ``data.train`` when it is a shapes world."""
    if eval_cfg.data:
        return eval_cfg.data
    if data.train and (Path(data.train) / "classes.json").is_file():
        return data.train
    return None


@torch.no_grad()
def zero_shot_scores(encoder: Any, eval_cfg: EvalConfig, data: DataConfig) -> dict[str, Any]:
    """Zero-shot classification per label and per-patch drift of an ``AlignedEncoder`` (empty without data)."""
    from align.artifact import patch_drift
    from align.data.images import open_image
    from align.data.readers import open_data
    from align.encoders.dual import DualEncoder
    from align.zeroshot_tasks import run_classify

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


def training_record(recipe: Any, dataset: PairedCaches, out_dir: Path) -> dict[str, Any]:
    """What the model card says about training: data, steps, samples, batch and the final loss."""
    from align.io import read_jsonl

    rows = read_jsonl(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    steps = int(last.get("step", 0))
    world = max(1, torch.distributed.get_world_size()) if torch.distributed.is_initialized() else 1
    used = recipe_as_run(out_dir)
    batch = used["train"]["batch_size"] * used["train"]["grad_accum"] * world
    return {
        "data": recipe.data.train or recipe.data.image_cache,
        "pairs": len(dataset),
        "steps": steps,
        "batch_size": batch,
        "samples_seen": steps * batch,
        "final_loss": last.get("loss"),
        "recipe": used,
    }


def recipe_as_run(out_dir: Path) -> dict[str, Any]:
    """The recipe a run really used: its ``config.yaml`` (restored settings, ``resumed`` record)."""
    import yaml

    return yaml.safe_load((Path(out_dir) / "config.yaml").read_text())


def run_recipe(
    method: Any, recipe: Any, out_dir: str | os.PathLike, resume: bool | str = "auto", **kwargs: Any
):
    """Train ``method`` with ``recipe.train`` into ``out_dir`` (the full recipe saved as ``config.yaml``)."""
    from align.train.loop import train

    return train(method, recipe.train, out_dir, resume, config_to_save=recipe, **kwargs)
