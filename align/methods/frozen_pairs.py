"""What SAIL and freeze_align share: frozen encoders, encoded once into paired embedding caches, and
trainable heads on top; the recipe's ``data`` section, the caches, and the :class:`FrozenPairsMethod` base
(data, evaluation and the artifact), so that ``sail.py`` and ``freeze_align.py`` hold only their
config, heads and loss.

Data flow: ``prepare_caches`` encodes the training pairs once with the frozen encoders into
``OUT/cache/`` (``align.data.cache.write_cache``; resumable, skipped when caches are given), and
:class:`PairedCaches` serves row-aligned batches ``{"image": ..., "texts": [...]}`` from the
memory-mapped caches (token caches give ``(tokens, mask)`` pairs). The result is an ``AlignedEncoder``:
the trained heads on the re-loaded frozen encoders, saved in ``OUT/artifact`` with zero-shot scores.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from torch import Tensor, nn
from torch.utils.data import Dataset

from align.data.cache import write_cache
from align.data.cache_read import EmbeddingCache
from align.errors import UserError
from align.methods import training_record
from align.methods.evaluation import zero_shot_scores

__all__ = ["DataConfig", "FrozenPairsMethod", "PairedCaches", "prepare_caches"]


@dataclasses.dataclass
class DataConfig:
    """Training pairs. ``train``: any source ``open_data`` reads (shapes dir, pairs file, ...).

    ``captions``: caption columns; the first is the positive text, further ones are extra positives
    (SAIL multi-positive; freeze_align uses only the first). ``image_cache`` / ``text_caches``: caches
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
                from align.load import load_text_encoder

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
    from align.load import load_vision_encoder

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


class FrozenPairsMethod:
    """An ``align.train.loop.Method`` training heads over paired caches of two frozen encoders.

    A subclass names its ``method`` (recorded in the artifact), the cache poolings ``image_pool`` and
    ``text_pool``, how many caption columns it reads (``positives``; ``None``: all), and defines
    ``check_backbone``, ``head_settings``, ``build_model``, ``loss``, ``after_step`` and ``logit_params``.
    Its model holds the heads as ``image_head`` and ``text_head``.
    """

    method: ClassVar[str]
    image_pool: ClassVar[str]
    text_pool: ClassVar[str]
    positives: ClassVar[int | None] = None

    def __init__(self, recipe: Any, out_dir: str | os.PathLike) -> None:
        self.recipe, self.out_dir = recipe, Path(out_dir)
        data = recipe.data
        if self.positives is not None:
            data = dataclasses.replace(data, captions=data.captions[: self.positives])
            data.text_caches = data.text_caches[: self.positives]
        image, texts = prepare_caches(
            recipe.vision, recipe.text, data, out_dir, self.image_pool, self.text_pool
        )
        spec = image.manifest["encoder"]
        self.check_backbone(image, spec)
        self.backbone_spec, self.text_spec = spec, texts[0].manifest["encoder"]
        self.dataset = PairedCaches(image, texts)
        self.scores: dict[str, Any] = {}

    def check_backbone(self, image: EmbeddingCache, spec: dict[str, Any]) -> None:
        """Refuse an image cache whose encoder (``spec``) the method cannot train on."""

    def head_settings(self) -> dict[str, Any]:
        """What both head configs share (``kind``, ``out_dim``, ...), from the recipe's ``head`` section."""
        raise NotImplementedError

    def logit_params(self, model: nn.Module) -> dict[str, float]:
        """The trained logit scale (and bias) as ``AlignedEncoder`` keyword arguments."""
        raise NotImplementedError

    def head_configs(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Image and text head configs: the shared settings plus each encoder's width (and prefix tokens)."""
        common = self.head_settings()
        image = {
            **common,
            "in_dim": self.backbone_spec["embed_dim"],
            "num_prefix_tokens": self.backbone_spec["num_prefix_tokens"],
        }
        return image, {**common, "in_dim": self.text_spec["embed_dim"]}

    def train_dataset(self) -> PairedCaches:
        return self.dataset

    def collate(self, indices: list[int]) -> dict[str, Any]:
        return self.dataset.collate(indices)

    def aligned(self, model: nn.Module) -> Any:
        """The trained heads on the (re-loaded) frozen encoders, as an ``AlignedEncoder``."""
        from align.artifact import AlignedEncoder
        from align.load import load_text_encoder, load_vision_encoder

        return AlignedEncoder(
            load_vision_encoder(self.recipe.vision),
            load_text_encoder(self.recipe.text),
            copy.deepcopy(model.image_head).cpu().eval(),
            copy.deepcopy(model.text_head).cpu().eval(),
            method=self.method,
            **self.logit_params(model),
        )

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        self.scores = zero_shot_scores(self.aligned(model), self.recipe.eval, self.recipe.data)
        return self.scores

    def save(self, model: nn.Module, out_dir: Path, state_dict: dict[str, Tensor]) -> None:
        from align.artifact import save_aligned

        data = self.recipe.data
        record = training_record(out_dir, data.train or data.image_cache, {"pairs": len(self.dataset)})
        save_aligned(out_dir / "artifact", self.aligned(model), training=record, metrics=self.scores)
