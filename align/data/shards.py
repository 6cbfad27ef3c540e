"""Samples from webdataset tar shards, listed by byte offset so images are read on demand.

Members are grouped into samples by key exactly as ``webdataset`` does (its ``base_plus_ext``:
``dir/000123.jpg`` and ``dir/000123.txt`` share the key ``dir/000123``; consecutive members with
one key form one sample). Brace patterns expand with ``webdataset``'s ``expand_urls``. The image is
the first of ``jpg``/``jpeg``/``png``/``webp``; the caption comes from ``.txt`` or a key of
``.json``; the label from ``.cls`` or a key of ``.json``. Only uncompressed ``.tar`` shards can be
read by offset.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from align.data.images import DataErrors, ImageError, TarMember
from align.data.records import Sample, as_texts, keep_sample

SHARD_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_paths(source: str | os.PathLike | Sequence[str]) -> list[Path]:
    """Shard files of a ``.tar`` path, a brace pattern (``a-{000..009}.tar``), or a directory of tars."""
    if isinstance(source, (list, tuple)):
        return [Path(s) for s in source]
    path = Path(str(source)).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise FileNotFoundError(f"{path}: no .tar shards in this directory")
        return shards
    return [Path(url) for url in expand_urls(str(path))]


def _groups(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """``(key, {ext: member})`` for consecutive members sharing a key; ``__meta__`` keys skipped."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        prefix, ext = base_plus_ext(member.name)
        if prefix is None or Path(prefix).name.startswith("__"):
            continue
        if prefix != key:
            if key is not None:
                yield key, group
            key, group = prefix, {}
        group[ext.lower()] = member
    if key is not None:
        yield key, group


def _read_json(tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> dict:
    try:
        value = json.loads(tar.extractfile(member).read())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{where}: not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(value).__name__}")
    return value


def _field(
    tar: tarfile.TarFile,
    group: dict,
    meta: dict,
    name: str | None,
    default_ext: str,
    default_key: str,
    where: str,
) -> Any:
    """Value of ``name`` (an extension in the group, else a key of its .json), or the defaults."""
    ext = name or default_ext
    if ext in group:
        return tar.extractfile(group[ext]).read().decode("utf-8").strip()
    if name and name not in meta:
        found = [f".{e}" for e in sorted(group)] + [f"json.{k}" for k in meta]
        raise ValueError(
            f"{where}: no member .{name} and no key {name!r} in its .json; found: {', '.join(found)}"
        )
    return meta.get(name or default_key)


def _sample(tar: tarfile.TarFile, shard: Path, key: str, group: dict, opts: dict, fields: dict) -> Sample:
    """One sample from a key group; raises ``FileNotFoundError`` when it has no image member."""
    where = f"{shard}:{key}"
    meta = _read_json(tar, group["json"], f"{where}.json") if "json" in group else {}
    fields.update(dict.fromkeys(group))
    fields.update(dict.fromkeys(f"json.{k}" for k in meta))
    ext = next((e for e in SHARD_IMAGE_EXTS if e in group), None)
    if ext is None:
        members = ", ".join(sorted(group))
        raise FileNotFoundError(
            f"{where}: sample has no image member ({'/'.join(SHARD_IMAGE_EXTS)}); members: {members}"
        )
    member = group[ext]
    image = TarMember(shard, member.name, member.offset_data, member.size)
    texts = as_texts(_field(tar, group, meta, opts["text_col"], "txt", "caption", where))
    label = _field(tar, group, meta, opts["label_col"], "cls", "label", where)
    return Sample(key, image, texts, None if label is None else str(label), {"shard": str(shard)})


def _ends_properly(shard: Path, offset: int) -> bool:
    """True if the tar has its end-of-archive marker (two zero blocks) right after ``offset``."""
    with open(shard, "rb") as fh:
        fh.seek(offset)
        block = fh.read(1024)
    return len(block) == 1024 and not any(block)


def _unreadable(shard: Path, err: Exception) -> ImageError:
    with open(shard, "rb") as fh:
        head = fh.read(6)
    compressed = head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))
    hint = "; compressed shards are not supported, decompress them to plain .tar" if compressed else ""
    return ImageError(f"{shard}: cannot read tar shard ({err}){hint}")


def read_shards(
    source: str | os.PathLike | Sequence[str],
    text_col: str | None = None,
    label_col: str | None = None,
    errors: DataErrors | None = None,
    verify: bool = False,
) -> tuple[list[Sample], list[str]]:
    """Samples and the member extensions (plus ``.json`` keys) found in webdataset shards.

    ``text_col``/``label_col`` name an extension (``txt``, ``cls``) or a key of the ``.json``
    member (default: ``txt`` else ``caption``; ``cls`` else ``label``). Reported through
    ``errors``: a missing or unreadable shard, a truncated one (its complete samples are kept, the
    last, possibly partial one dropped), and a sample without an image member.
    """
    errors = errors or DataErrors()
    opts = {"text_col": text_col, "label_col": label_col}
    samples, fields = [], {}
    for shard in shard_paths(source):
        if not shard.is_file():
            errors.report(FileNotFoundError(f"{shard}: shard not found"))
            continue
        found: list[Sample] = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for key, group in _groups(tar):
                    try:
                        sample = _sample(tar, shard, key, group, opts, fields)
                    except FileNotFoundError as err:
                        errors.report(err)
                        continue
                    if keep_sample(sample, errors, verify):
                        found.append(sample)
                end = tar.offset
            if not _ends_properly(shard, end):
                if found and found[-1].id == key:
                    found.pop()
                errors.report(
                    ImageError(f"{shard}: truncated tar shard (no end-of-archive marker after byte {end})")
                )
        except tarfile.TarError as err:
            errors.report(_unreadable(shard, err))
        samples.extend(found)
    return samples, list(fields)
