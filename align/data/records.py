"""The common record type (:class:`Sample`), :class:`DataSource`, and column resolution for tables."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from align.data.images import DataErrors, ImageRef, ImageTextDataset, check_image

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
