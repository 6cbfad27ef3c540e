"""Output directories: ours or refused, one writer at a time.

Every command that writes an ``--out`` directory (``data shapes``, ``encode``, ``align``, ``tune``,
``swap``, ``merge``) opens it with :class:`OutDir`:

* ``run.json`` (the marker: ``{"format", "command", "version", "finished", "owns"}``) says the directory
  is an output of ``command``. A non-empty directory without it is foreign and refused, whatever the
  flags; one made by another command is refused too. Only the entries listed in ``owns`` (or that the
  command itself knows it writes) are ever removed, so a file a user put there survives every command.
* ``.lock`` holds the writer's host, pid and command; a second writer is refused while that process
  lives. A lock whose process is gone (a killed run on this host) is stale and taken over with a warning.
* Hidden temporary entries of killed runs (``.tmp-*``) are removed when the directory is opened.
* ``--overwrite`` means the same everywhere: replace a finished output of the same command. Without
  it a finished output is refused (training, swap, merge) or reused when made with the same settings
  (``data shapes``, ``encode``); an unfinished one is resumed (training, ``encode``) or redone.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from align.errors import UserError
from align.io import read_json, write_json

__all__ = ["LOCK_FILE", "MARKER", "OutDir", "OutDirError", "claims_out_dir"]

logger = logging.getLogger(__name__)

MARKER = "run.json"
LOCK_FILE = ".lock"
FORMAT = "mllm-swap-run"
TMP_PREFIX = ".tmp-"
F = TypeVar("F", bound=Callable[..., Any])


class OutDirError(UserError, FileExistsError):
    """--out can't be written: foreign content, another command's or a finished output, a live writer."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mllm-swap")
    except PackageNotFoundError:
        return "unknown"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class OutDir:
    """An output directory claimed by one run of ``command`` (a context manager holding its lock).

    ``collective``: a job all processes of an ``accelerate launch`` run together (training, encoding):
    only the main process (``RANK`` 0) locks and writes the marker. ``wait``: seconds to wait for a live
    writer (an idempotent build, e.g. the shapes world several processes ask for) instead of refusing.
    ``reuse``: a finished output may be reused (the command decides, e.g. same settings); otherwise it
    is refused unless ``overwrite``. ``adopt(path)`` recognises an output of ``command`` written before markers existed and returns the
    entries it owns (else None). ``with OutDir(path, "swap", overwrite) as out:`` checks ownership, takes the lock, removes stale
    temporaries and writes the marker; ``out.finished`` tells whether a finished output is there
    (refused already unless ``overwrite`` or ``reuse``), ``out.clear()`` removes what the
    previous run owned, ``out.publish(tmp)`` moves a finished build into place and ``out.finish()``
    records it as finished. Raises :class:`OutDirError` (a ``FileExistsError``) naming the directory and what is in the way.
    """

    _held: dict[str, OutDir] = {}  # claims of this process by resolved path (nested claims join them)

    def __init__(
        self,
        path: str | os.PathLike,
        command: str,
        overwrite: bool = False,
        adopt: Callable[[Path], list[str] | None] | None = None,
        *,
        collective: bool = False,
        wait: float = 0.0,
        reuse: bool = False,
    ) -> None:
        self.path, self.command, self.overwrite, self.adopt = Path(path), command, overwrite, adopt
        self.collective, self.wait, self.reuse = collective, wait, reuse
        self.marker: dict[str, Any] = {}
        self._locked = False
        self._key = str(self.path.expanduser().resolve())
        self._outer: OutDir | None = None
        self._created = False
        self._temps: list[Path] = []

    # -- opening -----------------------------------------------------------------------------------
    def __enter__(self) -> OutDir:
        self._outer = OutDir._held.get(self._key)
        if self._outer is not None:  # e.g. the training loop inside `align sail`: one claim
            self.command, self.marker = self._outer.command, self._outer.marker
            return self
        self.check()
        if self.collective and int(os.environ.get("RANK", "0")) != 0:
            OutDir._held[self._key] = self  # nested claims of this process join this one
            return self  # a job of all processes of a launch: its main process holds the claim
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            self.check()  # again, under the lock
            for entry in self.path.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    logger.warning("%s: removing the temporary %s of a killed run", self.path, entry.name)
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
            if not self.marker:
                self.marker = {"format": FORMAT, "command": self.command, "owns": []}
            self.marker.update(finished=False, version=_version())  # until this run finishes
            write_json(self.path / MARKER, self.marker)
        except BaseException:
            self._unlock()
            raise
        OutDir._held[self._key] = self
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._outer is None and OutDir._held.get(self._key) is self:
            del OutDir._held[self._key]
        self._unlock()
        if exc_type is not None:
            for tmp in self._temps:
                shutil.rmtree(tmp, ignore_errors=True)
        # a run that failed before writing anything leaves no directory behind
        nothing_written = not self.marker.get("owns") and {e.name for e in self.path.iterdir()} <= {MARKER}
        if exc_type is not None and self._created and nothing_written:
            shutil.rmtree(self.path, ignore_errors=True)

    def check(self) -> None:
        """Refuse a path that is a file, a foreign directory or another command's output."""
        path = self.path
        if path.exists() and not path.is_dir():
            raise OutDirError(f"{path}: --out is a file, not a directory")
        if not path.is_dir():
            return
        others = sorted(
            e.name
            for e in path.iterdir()
            if e.name not in (MARKER, LOCK_FILE)
            and not e.name.startswith(f".{MARKER}.")  # marker being written
        )
        if not (path / MARKER).is_file():
            owned = self.adopt(path) if self.adopt is not None and others else None
            if owned is not None:  # an output of this command written before markers existed
                self.marker = {"format": FORMAT, "command": self.command, "finished": True, "owns": owned}
                return
            if others:
                shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
                raise OutDirError(
                    f"{path}: not an output directory of mllm-swap (no {MARKER}) and not empty (holds "
                    f"{shown}); refusing to write into it, with or without --overwrite. Choose a new or "
                    "empty --out."
                )
            return
        try:
            marker = read_json(path / MARKER)
        except ValueError as err:
            raise OutDirError(
                f"{path / MARKER}: unreadable run marker ({err}); choose another --out"
            ) from None
        if not isinstance(marker, dict) or marker.get("format") != FORMAT:
            raise OutDirError(f"{path / MARKER}: not a run marker of mllm-swap; choose another --out")
        if marker.get("command") != self.command:
            raise OutDirError(
                f"{path}: holds the output of `mllm-swap {marker.get('command')}`, not of "
                f"`mllm-swap {self.command}`; choose another --out"
            )
        self.marker = marker
        if marker.get("finished") and not (self.overwrite or self.reuse):
            raise OutDirError(
                f"{path}: holds a finished run of `mllm-swap {self.command}`; refusing to replace it: choose "
                "a new --out, or pass --overwrite to replace it"
            )

    @property
    def finished(self) -> bool:
        return bool(self.marker.get("finished"))

    # -- the lock ----------------------------------------------------------------------------------
    @classmethod
    def current(cls, path: str | os.PathLike) -> OutDir:
        """The claim this process holds on ``path`` (e.g. inside a :func:`claims_out_dir` function)."""
        return cls._held[str(Path(path).expanduser().resolve())]

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        me = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command}
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    owner = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    owner = {}
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                    logger.warning("%s: taking over the stale lock of pid %s (no longer running)", lock, pid)
                    lock.unlink(missing_ok=True)
                    continue
                if time.monotonic() < deadline:  # an idempotent build: wait for the other writer
                    time.sleep(0.1)
                    continue
                raise OutDirError(
                    f"{self.path}: another run is writing here (`mllm-swap {owner.get('command')}`, pid "
                    f"{pid} on {host}); one writer at a time. Wait for it, or delete {lock} if no such "
                    "run is alive."
                ) from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self._locked = True
            return

    def _unlock(self) -> None:
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False

    # -- writing -----------------------------------------------------------------------------------
    def temp_dir(self) -> Path:
        """A fresh hidden temporary directory inside the output (removed when a killed run is reopened)."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{self.command.replace(' ', '-')}-", dir=self.path))
        self._temps.append(tmp)
        return tmp

    def clear(self, names: tuple[str, ...] | list[str] = ()) -> None:
        """Remove what the previous run owned (its recorded entries plus ``names``); nothing else."""
        for name in {*self.marker.get("owns", []), *names}:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        self.marker.update(finished=False, owns=[])
        write_json(self.path / MARKER, self.marker)

    def publish(self, tmp: Path) -> None:
        """Move every entry of the finished build ``tmp`` into the output, then mark it finished."""
        names = sorted(e.name for e in tmp.iterdir())
        self.marker.update(finished=False, owns=sorted({*self.marker.get("owns", []), *names}))
        write_json(self.path / MARKER, self.marker)
        for name in names:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
        shutil.rmtree(tmp, ignore_errors=True)
        self.finish()

    def finish(self, owns: list[str] | tuple[str, ...] = ()) -> None:
        """Record the output as finished (``owns``: further entries this run wrote)."""
        if self._outer is not None:  # a nested claim finishes the one it joined
            self._outer.finish(owns)
            return
        if not self._locked:  # a process other than the main one
            return
        self.marker.update(finished=True, owns=sorted({*self.marker.get("owns", []), *owns}))
        write_json(self.path / MARKER, self.marker)


def claims_out_dir(
    command: str,
    out_arg: str = "out_dir",
    adopt: Callable[[Path], list[str] | None] | None = None,
    **options: Any,
) -> Callable[[F], F]:
    """Decorate a function writing ``out_arg`` (honouring its ``overwrite`` argument) to hold an
    :class:`OutDir` of ``command`` (``options``: ``collective``, ``wait``) while it runs and mark the
    output finished when it returns."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            overwrite = bool(bound.arguments.get("overwrite", False))
            with OutDir(bound.arguments[out_arg], command, overwrite, adopt, **options) as out:
                result = fn(*args, **kwargs)
                out.finish()
                return result

        return wrapper  # type: ignore[return-value]

    return decorate
