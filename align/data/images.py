"""Image references, decoding with clear errors, and the skip-or-raise error log.

A :class:`~align.data.records.Sample` points at its image without holding its pixels: a file
``Path``, a :class:`TarMember` (byte range inside a tar shard), an :class:`HFImage` (a cell of a
``datasets`` table) or an in-memory ``PIL.Image``. :func:`open_image` turns any of them into an RGB
``PIL.Image`` and names the image's location when it is missing or cannot be decoded.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ON_ERROR = ("raise", "skip")


class ImageError(ValueError):
    """An image that exists but cannot be decoded; the message names where it is."""


@dataclass(frozen=True)
class TarMember:
    """A file stored inside a tar shard, read by byte offset (no extraction, no bytes held)."""

    tar: Path
    name: str
    offset: int
    size: int

    def read(self) -> bytes:
        """The member's bytes; a short read (truncated shard) is an error."""
        with open(self.tar, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise ImageError(f"{self}: shard is truncated ({len(data)} of {self.size} bytes)")
        return data

    def __str__(self) -> str:
        return f"{self.tar}:{self.name}"


@dataclass(frozen=True)
class HFImage:
    """The image cell ``column`` of row ``index`` of a ``datasets.Dataset`` (decoded on demand).

    The dataset should have the column cast to ``Image(decode=False)`` so a read yields
    ``{"bytes", "path"}`` rather than decoding eagerly; a relative ``path`` resolves from ``base``.
    """

    dataset: Any
    index: int
    column: str
    base: Path | None = None

    def __str__(self) -> str:
        return f"{self.base or 'dataset'}[{self.index}].{self.column}"

    def __hash__(self) -> int:
        return hash((id(self.dataset), self.index, self.column))


ImageRef = Path | TarMember | HFImage | Image.Image


def image_location(ref: ImageRef | None) -> str:
    """A human-readable location of an image reference, for messages."""
    if isinstance(ref, Image.Image):
        return f"<in-memory {ref.mode} image {ref.width}x{ref.height}>"
    return str(ref)


def _decode(data: bytes | Path, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"{where}: cannot decode image ({err})") from err


def open_image(ref: ImageRef | None) -> Image.Image:
    """Load any image reference as an RGB ``PIL.Image``.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageError` for undecodable bytes,
    both naming the image's location.
    """
    if ref is None:
        raise FileNotFoundError("sample has no image")
    if isinstance(ref, Image.Image):
        return ref.convert("RGB")
    if isinstance(ref, Path):
        if not ref.is_file():
            raise FileNotFoundError(f"{ref}: image file not found")
        return _decode(ref, str(ref))
    if isinstance(ref, TarMember):
        if not ref.tar.is_file():
            raise FileNotFoundError(f"{ref.tar}: shard not found")
        return _decode(ref.read(), str(ref))
    if isinstance(ref, HFImage):
        value = ref.dataset[ref.index][ref.column]
        if isinstance(value, Image.Image):
            return value.convert("RGB")
        if isinstance(value, dict) and value.get("bytes"):
            return _decode(value["bytes"], str(ref))
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise FileNotFoundError(f"{ref}: image cell is empty")
        path = Path(path)
        if not path.is_absolute() and ref.base is not None:
            path = ref.base / path
        return open_image(path)
    raise TypeError(f"unsupported image reference {type(ref).__name__}")


def check_image(ref: ImageRef | None, decode: bool) -> FileNotFoundError | ImageError | None:
    """The error that makes ``ref`` unusable, or ``None``; ``decode=False`` only checks existence."""
    try:
        if decode:
            open_image(ref)
        elif ref is None:
            return FileNotFoundError("sample has no image")
        elif isinstance(ref, Path) and not ref.is_file():
            return FileNotFoundError(f"{ref}: image file not found")
        elif isinstance(ref, TarMember) and not ref.tar.is_file():
            return FileNotFoundError(f"{ref.tar}: shard not found")
    except (FileNotFoundError, ImageError) as err:
        return err
    return None


class DataErrors:
    """Collects missing/corrupt images: ``on_error="raise"`` fails at once, ``"skip"`` counts them.

    ``count`` is the number skipped; ``messages`` keeps the first ``keep`` error messages.
    """

    def __init__(self, on_error: str = "raise", keep: int = 20) -> None:
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error = on_error
        self.keep = keep
        self.count = 0
        self.messages: list[str] = []
        self._warned = False

    def report(self, err: FileNotFoundError | ImageError) -> None:
        """Record one bad item (its message names the location); re-raises it in raise mode."""
        if self.on_error == "raise":
            raise err
        self.count += 1
        if len(self.messages) < self.keep:
            self.messages.append(str(err))

    def summary(self) -> str:
        """One line: how many were skipped and the first few with their reasons."""
        if not self.count:
            return "no missing or corrupt images"
        shown = "; ".join(self.messages[:3])
        more = f" and {self.count - 3} more" if self.count > 3 else ""
        return f"skipped {self.count} missing or corrupt image(s): {shown}{more}"

    def warn_once(self) -> None:
        """Emit the summary as a single ``UserWarning`` (only once, only if something was skipped)."""
        if self.count and not self._warned:
            self._warned = True
            warnings.warn(self.summary(), UserWarning, stacklevel=3)
