"""The common record type (:class:`Sample`), :class:`DataSource`, the torch Dataset over samples
(:class:`ImageTextDataset`) and column resolution for tables."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from align.data.images import DataErrors, ImageError, ImageRef, check_image, image_location, open_image

DEFAULT_COLS = {"image": "image", "text": "caption", "id": "id", "label": "label"}


@dataclass
class Sample:
    """One record: an id, an image reference (or ``None`` for text-only), captions, a class label."""

    id: str
    image: ImageRef | None
    texts: list[str] = field(default_factory=list)
    label: str | None = None
    meta: dict = field(default_factory=dict)


@dataclass
class DataSource:
    """What :func:`open_data` returns: the listed samples plus where they came from.

    ``kind`` names the reader; ``fields`` the columns/extensions the source offers; ``errors`` the
    missing/corrupt images met while listing (counted in skip mode). Indexable and iterable.
    """

    source: str
    kind: str
    samples: list[Sample]
    fields: list[str]
    errors: DataErrors

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def labels(self) -> list[str]:
        """Sorted distinct labels of the samples (class names of an image folder)."""
        return sorted({s.label for s in self.samples if s.label is not None})

    def dataset(self, transform: Any = None, batch_transform: Any = None) -> ImageTextDataset:
        """A torch ``Dataset`` over these samples loading RGB images (same ``on_error`` mode)."""
        return ImageTextDataset(self.samples, transform, batch_transform, on_error=self.errors.on_error)


def as_texts(value: Any) -> list[str]:
    """Normalise a caption cell: a string, a list of strings, ``None``, or a JSON list in a string."""
    if value is None:
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            try:
                parsed = json.loads(stripped)
            except json.JSONDecodeError:
                return [value]
            if isinstance(parsed, list):
                return [str(v) for v in parsed]
        return [value] if value != "" else []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if v is not None]
    return [str(value)]


def lookup(row: dict, column: str) -> Any:
    """``row[column]``, where ``a.b`` reaches into nested dicts; ``KeyError`` when absent."""
    if column in row:
        return row[column]
    value: Any = row
    for part in column.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(column)
        value = value[part]
    return value


def has_column(rows: Sequence[dict], column: str) -> bool:
    """True if any row has ``column`` (dotted names reach into nested dicts)."""
    return any(_present(row, column) for row in rows)


def _present(row: dict, column: str) -> bool:
    try:
        lookup(row, column)
    except KeyError:
        return False
    return True


@dataclass
class Columns:
    """Resolved column names: ``None`` means the source has no such column (not requested)."""

    image: str | None
    texts: list[str]
    id: str | None
    label: str | None


def resolve_columns(
    where: str,
    fields: Sequence[str],
    has: Any,
    image_col: str | None = None,
    text_col: str | Sequence[str] | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
) -> Columns:
    """Pick the columns to use; a requested column that ``has(col)`` rejects is an error.

    Unrequested columns fall back to ``image``/``caption``/``id``/``label`` when present.
    """

    def pick(kind: str, requested: str | None) -> str | None:
        if requested is None:
            default = DEFAULT_COLS[kind]
            return default if has(default) else None
        if not has(requested):
            raise ValueError(
                f"{where}: no {kind} column {requested!r}; columns found: {', '.join(fields) or '(none)'}"
            )
        return requested

    texts = [text_col] if isinstance(text_col, str) else list(text_col or [])
    text_cols = [c for c in (pick("text", c) for c in (texts or [None])) if c]
    cols = Columns(pick("image", image_col), text_cols, pick("id", id_col), pick("label", label_col))
    if cols.image is None and not cols.texts:
        raise ValueError(
            f"{where}: found neither an image column ({DEFAULT_COLS['image']!r}) nor a text column "
            f"({DEFAULT_COLS['text']!r}); columns found: {', '.join(fields) or '(none)'}. Rename the columns to "
            f"{DEFAULT_COLS['image']!r}/{DEFAULT_COLS['text']!r}, or name them where the command offers it "
            "(align recipes: data.captions; data inspect: --image-col/--text-col; curate: --caption-col)"
        )
    return cols


def keep_sample(sample: Sample, errors: DataErrors, verify: bool) -> bool:
    """True if the sample's image is usable (or it is text-only); otherwise report it."""
    if sample.image is None:
        return True
    err = check_image(sample.image, decode=verify)
    if err is None:
        return True
    errors.report(err)
    return False


def resolve(value: Any, base: Path) -> Path | None:
    """An image path cell as a ``Path`` (relative ones from ``base``); ``None`` when empty."""
    if value is None or value == "":
        return None
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else base / path


def rows_to_samples(
    rows: Sequence[dict],
    where: str,
    base: Path,
    cols: Columns,
    errors: DataErrors,
    verify: bool = False,
    split: str | None = None,
) -> list[Sample]:
    """Turn table rows into samples; a row lacking a chosen column is an error naming its number."""
    used = {c for c in (cols.image, cols.id, cols.label, *cols.texts) if c}
    samples = []
    for i, row in enumerate(tqdm(rows, desc="checking images", unit="row", disable=not verify)):
        if split is not None and row.get("split") != split:
            continue
        try:
            image = resolve(lookup(row, cols.image), base) if cols.image else None
            texts = [t for c in cols.texts for t in as_texts(lookup(row, c))]
            sid = str(lookup(row, cols.id)) if cols.id else str(i)
            label = lookup(row, cols.label) if cols.label else None
        except KeyError as err:
            raise ValueError(
                f"{where}: row {i} has no column {err.args[0]!r}; its columns: {', '.join(row)}"
            ) from None
        if cols.image and image is None:
            errors.report(FileNotFoundError(f"{where}: row {i} (id {sid}) has an empty {cols.image!r}"))
            continue
        sample = Sample(sid, image, texts, None if label is None else str(label))
        sample.meta = {k: v for k, v in row.items() if k not in used}
        if keep_sample(sample, errors, verify):
            samples.append(sample)
    return samples


@dataclass(frozen=True)
class Skipped:
    """Placeholder returned by :class:`ImageTextDataset` for an item skipped in skip mode."""

    index: int
    where: str
    reason: str


class ImageTextDataset(torch.utils.data.Dataset):
    """Map-style dataset over samples: loads each image as RGB and applies ``transform``.

    Items are dicts ``{"index", "id", "image", "texts", "label"}`` (``image`` is the transformed
    image, or the PIL image when no transform is given). Use :meth:`collate` as the DataLoader's
    ``collate_fn``: it stacks tensors, or applies ``batch_transform`` (e.g. an encoder's
    ``preprocess(list_of_PIL) -> [B, 3, S, S]``) to the list of PIL images. In skip mode a bad
    image yields a :class:`Skipped` item that ``collate`` drops and lists under ``"skipped"``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], Any] | None = None,
        batch_transform: Callable[[list[Image.Image]], torch.Tensor] | None = None,
        on_error: str = "raise",
    ) -> None:
        if transform is not None and batch_transform is not None:
            raise ValueError("give either transform (per image) or batch_transform (per batch), not both")
        self.samples = samples
        self.transform = transform
        self.batch_transform = batch_transform
        self.errors = DataErrors(on_error)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict | Skipped:
        sample = self.samples[index]
        try:
            if sample.image is None:
                raise FileNotFoundError(f"sample {sample.id}: has no image")
            image = open_image(sample.image)
        except (FileNotFoundError, ImageError) as err:
            self.errors.report(err)
            if self.errors.count == 1:
                warnings.warn(
                    f"skipping unreadable images (see .errors); first: {err}", UserWarning, stacklevel=2
                )
            return Skipped(index, image_location(sample.image), str(err))
        if self.transform is not None:
            image = self.transform(image)
        return {"index": index, "id": sample.id, "image": image, "texts": sample.texts, "label": sample.label}

    def collate(self, items: list[dict | Skipped]) -> dict:
        """Batch items: ``index`` (LongTensor), ``ids``, ``images``, ``texts``, ``labels``, ``skipped``."""
        good = [item for item in items if isinstance(item, dict)]
        images: Any = [item["image"] for item in good]
        if self.batch_transform is not None and images:
            images = self.batch_transform(images)
        elif images and all(isinstance(img, torch.Tensor) for img in images):
            images = torch.stack(images)
        return {
            "index": torch.tensor([item["index"] for item in good], dtype=torch.long),
            "ids": [item["id"] for item in good],
            "images": images,
            "texts": [item["texts"] for item in good],
            "labels": [item["label"] for item in good],
            "skipped": [item for item in items if isinstance(item, Skipped)],
        }

    def loader(
        self, batch_size: int = 32, shuffle: bool = False, num_workers: int = 0
    ) -> torch.utils.data.DataLoader:
        """A ``DataLoader`` over this dataset using :meth:`collate`."""
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=self.collate
        )
