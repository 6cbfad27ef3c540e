"""Samples from Hugging Face ``datasets``: ``load_from_disk`` directories and local data files.

Image columns may hold PIL images (an ``Image`` feature; read lazily through
:class:`~align.data.images.HFImage`, never decoded while listing), ``{"bytes", "path"}`` dicts, or
path strings (relative ones resolve from the data's directory). ``ClassLabel`` labels become names.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from align.data.images import DataErrors, HFImage
from align.data.records import Sample, as_texts, keep_sample, lookup, resolve, resolve_columns

HF_BUILDERS = ("json", "csv", "parquet", "arrow", "imagefolder", "text")


def is_hf_disk(path: Path) -> bool:
    """True for a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _pick_split(data: Any, split: str | None, where: str) -> Any:
    import datasets

    if not isinstance(data, (datasets.DatasetDict, dict)):
        if split is not None:
            raise ValueError(f"{where}: split {split!r} requested but the dataset has no splits")
        return data
    names = list(data)
    if split is None:
        if "train" in names or len(names) == 1:
            split = "train" if "train" in names else names[0]
        else:
            raise ValueError(f"{where}: several splits ({', '.join(names)}); choose one with split=")
    if split not in data:
        raise ValueError(f"{where}: no split {split!r}; splits found: {', '.join(names)}")
    return data[split]


def hf_samples(
    data: Any,
    where: str,
    base: Path | None,
    image_col: str | None = None,
    text_col: str | Sequence[str] | None = None,
    id_col: str | None = None,
    label_col: str | None = None,
    split: str | None = None,
    errors: DataErrors | None = None,
    verify: bool = False,
) -> tuple[list[Sample], list[str]]:
    """Samples and column names of a ``Dataset`` (or one split of a ``DatasetDict``)."""
    import datasets

    errors = errors or DataErrors()
    ds = _pick_split(data, split, where)
    fields = list(ds.column_names)
    cols = resolve_columns(
        where, fields, lambda c: c.split(".")[0] in fields, image_col, text_col, id_col, label_col
    )
    image_feature = ds.features.get(cols.image) if cols.image else None
    if isinstance(image_feature, datasets.Image):
        ds = ds.cast_column(cols.image, datasets.Image(decode=False))
    label_feature = ds.features.get(cols.label) if cols.label else None
    wanted = {c.split(".")[0] for c in (cols.id, cols.label, *cols.texts) if c}
    if cols.image and getattr(ds.features[cols.image], "dtype", None) == "string":
        wanted.add(cols.image)  # plain paths: cheap to read while listing
    rows = iter(ds.select_columns(sorted(wanted))) if wanted else ({} for _ in range(len(ds)))
    samples = []
    for i, row in enumerate(tqdm(rows, total=len(ds), desc="listing", unit="row", disable=not verify)):
        try:
            texts = [t for c in cols.texts for t in as_texts(lookup(row, c))]
            sid = str(lookup(row, cols.id)) if cols.id else str(i)
            label = lookup(row, cols.label) if cols.label else None
        except KeyError as err:
            raise ValueError(f"{where}: row {i} has no field {err.args[0]!r}") from None
        if isinstance(label_feature, datasets.ClassLabel) and isinstance(label, int):
            label = label_feature.int2str(label)
        image: Any = None
        if cols.image:
            image = (
                resolve(row[cols.image], base or Path.cwd())
                if cols.image in row
                else HFImage(ds, i, cols.image, base)
            )
            if image is None:
                errors.report(FileNotFoundError(f"{where}: row {i} (id {sid}) has an empty {cols.image!r}"))
                continue
        sample = Sample(sid, image, texts, None if label is None else str(label))
        if keep_sample(sample, errors, verify):
            samples.append(sample)
    return samples, fields


def read_hf_disk(path: str | os.PathLike, **opts: Any) -> tuple[list[Sample], list[str]]:
    """Samples of a ``save_to_disk`` directory (``split`` picks one of a ``DatasetDict``)."""
    import datasets

    path = Path(path)
    if not is_hf_disk(path):
        raise ValueError(
            f"{path}: not a datasets save_to_disk directory (no dataset_dict.json or state.json)"
        )
    return hf_samples(datasets.load_from_disk(str(path)), str(path), path, **opts)


def read_hf_files(
    builder: str, data_files: str, cache_dir: str | None = None, **opts: Any
) -> tuple[list[Sample], list[str]]:
    """Samples of local files through ``datasets.load_dataset(builder, ...)`` (offline).

    ``data_files`` is a file, a glob, or (for ``imagefolder``) a directory.
    """
    import datasets

    if builder not in HF_BUILDERS:
        raise ValueError(f"hf:{builder}: unknown datasets builder; expected one of {', '.join(HF_BUILDERS)}")
    where = f"hf:{builder}:{data_files}"
    target = Path(data_files).expanduser()
    kwargs: dict[str, Any] = {"cache_dir": cache_dir}
    if target.is_dir():
        kwargs["data_dir"] = str(target)
        base = target
    else:
        matches = sorted(target.parent.glob(target.name))
        if not matches:
            raise FileNotFoundError(f"{where}: no file matches {data_files}")
        kwargs["data_files"] = [str(m) for m in matches]
        base = matches[0].parent
    data = datasets.load_dataset(builder, **kwargs)
    return hf_samples(data, where, base, **opts)
