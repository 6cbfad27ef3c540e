"""Readers that turn image-text data on disk into :class:`Sample` records, and :func:`open_data`.

Sources: pairs JSONL/CSV/TSV (configurable columns, relative image paths resolved from the file's
directory), image-list ``.txt`` files, shapes-world directories, ImageNet-style image folders,
HF ``datasets`` (``load_from_disk`` directories, ``.parquet``/``.arrow`` files, or
``hf:<builder>:<data_files>`` such as ``hf:json:data.jsonl`` / ``hf:imagefolder:DIR``) and
webdataset tar shards (``.tar`` files, brace patterns like ``shards-{000..009}.tar``, or a directory
of ``.tar`` files). Samples only *point* at images (see :mod:`align.data.images`); missing images
are found while listing, corrupt ones with ``verify=True`` or when :class:`ImageTextDataset` loads.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from align.data.images import IMAGE_EXTENSIONS, DataErrors
from align.data.records import (
    DataSource,
    Sample,
    has_column,
    keep_sample,
    resolve,
    resolve_columns,
    rows_to_samples,
)
from align.errors import UserError
from align.io import read_json, read_jsonl, read_text


def read_table(path: Path, delimiter: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows and field names of a JSONL, JSON-list, CSV or TSV file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        if suffix == ".json":
            rows = read_json(path)
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ValueError(f"{path}: expected a JSON list of objects")
        else:
            rows = read_jsonl(path)
        fields: dict[str, None] = {}
        for row in rows:
            if not isinstance(row, dict):
                raise ValueError(f"{path}: expected one JSON object per line, found {type(row).__name__}")
            fields.update(dict.fromkeys(row))
        return rows, list(fields)
    reader = csv.DictReader(
        io.StringIO(read_text(path), newline=""), delimiter=delimiter or ("\t" if suffix == ".tsv" else ",")
    )
    rows = list(reader)
    return rows, list(reader.fieldnames or [])


def read_pairs(
    path: str | os.PathLike,
    image_col: str | None = None,
    text_col: str | Sequence[str] | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
    split: str | None = None,
    errors: DataErrors | None = None,
    verify: bool = False,
    delimiter: str | None = None,
) -> tuple[list[Sample], list[str]]:
    """Samples and field names of a pairs file (JSONL/JSON/CSV/TSV); images resolve from its dir."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    errors = errors or DataErrors()
    rows, fields = read_table(path, delimiter)
    if not rows:
        found = f"only a header ({', '.join(fields)})" if fields else "an empty file"
        raise UserError(f"{path}: no data rows; expected one row per sample, found {found}")
    cols = resolve_columns(
        str(path), fields, lambda c: has_column(rows, c), image_col, text_col, id_col, label_col
    )
    if split is not None and not has_column(rows, "split"):
        raise ValueError(
            f"{path}: split {split!r} requested but there is no 'split' column; columns found: {', '.join(fields)}"
        )
    return rows_to_samples(rows, str(path), path.parent, cols, errors, verify, split), fields


def read_image_list(
    path: str | os.PathLike, errors: DataErrors | None = None, verify: bool = False
) -> list[Sample]:
    """Samples (no texts) from a text file listing one image path per line (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    errors = errors or DataErrors()
    lines = [line.strip() for line in read_text(path).splitlines()]
    samples = []
    for line in (entry for entry in lines if entry and not entry.startswith("#")):
        image = resolve(line, path.parent)
        sample = Sample(Path(line).stem, image)
        if keep_sample(sample, errors, verify):
            samples.append(sample)
    return samples


def read_image_folder(
    root: str | os.PathLike,
    text_template: str | None = None,
    errors: DataErrors | None = None,
    verify: bool = False,
) -> tuple[list[Sample], list[str]]:
    """Samples of an ImageNet-layout folder ``root/<class>/<image>``: label = the class directory.

    Images directly under ``root`` get no label. With ``text_template`` (e.g. ``"a photo of a {}."``)
    each sample gets that text with the class name (underscores as spaces). Returns samples and the
    sorted class names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: directory not found")
    errors = errors or DataErrors()
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise ValueError(f"{root}: no images ({', '.join(IMAGE_EXTENSIONS)}) found in this folder")
    samples, classes = [], set()
    for file in tqdm(files, desc="checking images", unit="img", disable=not verify):
        rel = file.relative_to(root)
        label = rel.parts[0] if len(rel.parts) > 1 else None
        texts = [text_template.format(label.replace("_", " "))] if text_template and label else []
        sample = Sample(str(rel.with_suffix("")), file, texts, label)
        if keep_sample(sample, errors, verify):
            samples.append(sample)
            if label is not None:
                classes.add(label)
    return samples, sorted(classes)


def _kind_of(source: str) -> str:
    """Which reader handles ``source`` (see :func:`open_data`)."""
    from align.data.hfdata import is_hf_disk

    if source.startswith("hf:"):
        return "hf-files"
    if "{" in source and "}" in source and source.endswith(".tar"):
        return "webdataset"
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    if path.is_file():
        suffix = path.suffix.lower()
        kinds = {".jsonl": "pairs", ".json": "pairs", ".csv": "pairs", ".tsv": "pairs", ".txt": "list"}
        kinds |= {".tar": "webdataset", ".parquet": "hf-files", ".arrow": "hf-files"}
        if suffix not in kinds:
            raise ValueError(
                f"{source}: unsupported file type {suffix or '(none)'}; expected .jsonl/.json/.csv/.tsv "
                "pairs, a .txt image list, .tar shards or .parquet/.arrow"
            )
        return kinds[suffix]
    if (path / "pairs.jsonl").is_file():
        return "shapes"
    if is_hf_disk(path):
        return "hf-disk"
    if any(path.glob("*.tar")) and not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in path.iterdir()):
        return "webdataset"
    return "imagefolder"


def open_data(
    source: str | os.PathLike,
    image_col: str | None = None,
    text_col: str | Sequence[str] | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
    split: str | None = None,
    on_error: str = "raise",
    verify: bool = False,
    text_template: str | None = None,
    delimiter: str | None = None,
    cache_dir: str | None = None,
) -> DataSource:
    """Open any supported source and list its samples (see the module docstring for the forms).

    Columns default to ``image``/``caption``/``id``/``label`` when present; a column you name must
    exist (the error lists those that do). ``split`` filters a ``split`` column (shapes: ``train``/
    ``test``) or picks a ``DatasetDict`` split. Missing images (and, with ``verify=True``, undecodable
    ones) raise with their path when ``on_error="raise"``; with ``"skip"`` they are dropped,
    counted in ``.errors`` and summarised in one warning. ``text_template`` gives image-folder
    samples a caption from their class; ``cache_dir`` is where ``datasets`` caches ``hf:`` files.
    """
    source = str(source)
    errors = DataErrors(on_error)
    kind = _kind_of(source)
    cols = {"image_col": image_col, "text_col": text_col, "id_col": id_col, "label_col": label_col}
    common = {"errors": errors, "verify": verify}
    if kind in ("pairs", "shapes"):
        table = Path(source).expanduser()
        if kind == "shapes":
            table = table / "pairs.jsonl"
            meta = Path(source).expanduser() / "meta.json"
            kind = (
                "shapes" if meta.is_file() and "shapes" in read_json(meta).get("generator", "") else "pairs"
            )
        samples, fields = read_pairs(table, **cols, split=split, delimiter=delimiter, **common)
    elif kind == "list":
        samples, fields = read_image_list(source, **common), ["image"]
    elif kind == "imagefolder":
        samples, fields = read_image_folder(source, text_template=text_template, **common)
        fields = ["image", "label"]
    elif kind == "webdataset":
        from align.data.shards import read_shards

        samples, fields = read_shards(source, text_col=_one(text_col), label_col=label_col, **common)
    elif kind == "hf-disk":
        from align.data.hfdata import read_hf_disk

        samples, fields = read_hf_disk(source, **cols, split=split, **common)
    else:
        from align.data.hfdata import read_hf_files

        if source.startswith("hf:"):
            builder, _, files = source[3:].partition(":")
        else:
            builder, files = Path(source).suffix.lower().lstrip("."), source
        samples, fields = read_hf_files(builder, files, cache_dir=cache_dir, **cols, split=split, **common)
    errors.warn_once()
    return DataSource(source, kind, samples, fields, errors)


def _one(text_col: str | Sequence[str] | None) -> str | None:
    if text_col is None or isinstance(text_col, str):
        return text_col
    if len(text_col) != 1:
        raise ValueError(f"webdataset shards take one text column, got {list(text_col)}")
    return text_col[0]


__all__ = [
    "DataSource",
    "Sample",
    "open_data",
    "read_image_folder",
    "read_image_list",
    "read_pairs",
]
