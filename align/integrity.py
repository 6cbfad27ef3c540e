"""Checksums of what the project writes, verified before anything reads it back.

A directory the project writes (checkpoint, artifact, adapter, swapped or merged checkpoint) gets a
``checksums.json`` (``{"format", "version", "files": {relative path: {"bytes", "sha256"}}}``), written
atomically as the last file of the directory. :func:`verify_dir` checks every listed file's size and
sha256 before use; cache shards carry the same record in their manifest and are checked with
:func:`verify_file`.

Verification is cheap on repeated use: a file that passed is remembered in a small memo under
``$MLLM_SWAP_HOME/verified/`` (one JSON per file, keyed by its resolved path) with its size, inode,
mtime and ctime; while those are unchanged the file is not hashed again. Rewriting a file changes its
ctime (which no user tool can set back), so a file changed after its check is always hashed again.
Delete the ``verified`` folder to force a full check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from align.errors import UserError
from align.io import read_json, sha256_file, write_json

__all__ = ["CHECKSUMS_FILE", "CorruptFileError", "record_checksums", "verify_dir", "verify_file"]

CHECKSUMS_FILE = "checksums.json"
FORMAT = "mllm-swap-checksums"


class CorruptFileError(UserError):
    """A file differs from its recorded size or sha256 (or is missing)."""


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns]


def _memo_path(path: Path) -> Path:
    from align.paths import home

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return home() / "verified" / f"{key}.json"


def _memo_ok(path: Path, sha256: str) -> bool:
    try:
        memo = json.loads(_memo_path(path).read_text())
    except (OSError, ValueError):
        return False
    return memo.get("sha256") == sha256 and memo.get("stamp") == _stamp(path)


def _remember(path: Path, sha256: str) -> None:
    with contextlib.suppress(OSError):  # a read-only home only costs a re-check next time
        write_json(_memo_path(path), {"path": str(path.resolve()), "sha256": sha256, "stamp": _stamp(path)})


def verify_file(path: str | os.PathLike, size: int, sha256: str, what: str = "file") -> None:
    """Raise :class:`CorruptFileError` unless ``path`` has ``size`` bytes and hex digest ``sha256``."""
    path = Path(path)
    if not path.is_file():
        raise CorruptFileError(f"{path}: {what} is missing (expected {size} bytes, sha256 {sha256[:16]}…)")
    found_size = path.stat().st_size
    if found_size != size:
        raise CorruptFileError(
            f"{path}: {what} is truncated or altered: expected {size} bytes, found {found_size}"
        )
    if _memo_ok(path, sha256):
        return
    found = sha256_file(path)
    if found != sha256:
        raise CorruptFileError(
            f"{path}: {what} is corrupt: expected sha256 {sha256}, found {found} (same size {size} bytes)"
        )
    _remember(path, sha256)


def _files(root: Path, exclude: Iterable[str]) -> list[Path]:
    skip = set(exclude) | {CHECKSUMS_FILE}
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in skip or any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        found.append(path)
    return found


def record_checksums(root: str | os.PathLike, exclude: Iterable[str] = ()) -> Path:
    """Write ``root/checksums.json`` for every file under ``root`` (hidden files, ``exclude`` top-level
    names and the record itself left out); return its path. Recorded files count as verified."""
    root = Path(root)
    files = {}
    for path in _files(root, exclude):
        digest = sha256_file(path)
        files[path.relative_to(root).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest}
        _remember(path, digest)
    write_json(root / CHECKSUMS_FILE, {"format": FORMAT, "version": 1, "files": files})
    return root / CHECKSUMS_FILE


def verify_dir(root: str | os.PathLike, what: str = "directory", required: bool = True) -> bool:
    """Check every file listed in ``root/checksums.json``; return True when verified.

    Without a record: raise :class:`CorruptFileError` when ``required``, else return False (a directory
    the project did not write, e.g. a downloaded model, is used as it is).
    """
    root = Path(root)
    record_file = root / CHECKSUMS_FILE
    if not record_file.is_file():
        if required:
            raise CorruptFileError(
                f"{root}: {what} has no {CHECKSUMS_FILE} (expected one written with it); it is incomplete "
                "or was written by an older version"
            )
        return False
    record = read_json(record_file)
    if (
        not isinstance(record, dict)
        or record.get("format") != FORMAT
        or not isinstance(record.get("files"), dict)
    ):
        raise CorruptFileError(f"{record_file}: not a checksum record of format {FORMAT!r}")
    for rel, entry in record["files"].items():
        verify_file(root / rel, int(entry["bytes"]), str(entry["sha256"]), what=f"{what} file")
    return True
