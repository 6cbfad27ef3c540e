"""The one user-error type, and plain-words messages for the OS and library failures users cause.

Library code raises :class:`UserError` (or a subclass such as ``align.recipes.ConfigError``) for bad
input, with a message naming the file, key, flag or shape, what was expected and what was found.
:func:`explain` turns any exception a user can cause into such a one-paragraph message (``None`` for
an exception that is a bug); the ``mllm-swap`` command prints it instead of a traceback.
"""

from __future__ import annotations

import errno
import os
import pickle
import re

OFFLINE_HINT = (
    "To use a local copy, pass its directory instead of the id (e.g. one saved with save_pretrained, or "
    "the snapshot folder from `huggingface-cli download ID --local-dir DIR` run on a machine with network); "
    "to download, unset HF_HUB_OFFLINE and check the network."
)


class UserError(ValueError):
    """Bad input from the user (a file, key, flag, shape or value); shown without a traceback."""


def _where(err: OSError) -> str:
    names = [n for n in (err.filename, err.filename2) if n is not None]
    return " -> ".join(os.fspath(n) for n in names) or "(unnamed path)"


def _os_message(err: OSError) -> str | None:
    """A message for the filesystem failures a user causes (missing, read-only, full disk, ...)."""
    if err.filename is None and err.args and isinstance(err.args[0], str) and len(err.args) == 1:
        return err.args[0]  # our own message, already naming the path
    where = _where(err)
    reasons = {
        errno.ENOENT: "not found",
        errno.EEXIST: "already exists",
        errno.EACCES: "permission denied (expected a writable/readable location)",
        errno.EPERM: "operation not permitted",
        errno.EROFS: "read-only file system (choose an --out on a writable disk)",
        errno.ENOTDIR: "a part of this path is a file, expected a directory (choose another --out)",
        errno.EISDIR: "is a directory, expected a file",
        errno.ENOSPC: "no space left on device (free some space or choose an --out on another disk)",
        errno.EDQUOT: "disk quota exceeded (free some space or choose an --out on another disk)",
        errno.ENAMETOOLONG: "file name too long",
    }
    reason = reasons.get(err.errno)
    if err.errno == errno.EEXIST and err.filename is not None and os.path.isfile(err.filename):
        reason = "is a file, expected a directory (choose another --out)"  # mkdir of a parent that is a file
    if reason is None:
        return None
    return f"{where}: {reason}"


def _hub_message(err: BaseException) -> str | None:
    """Messages for a hub id that cannot be resolved (offline, unknown, malformed)."""
    try:
        from huggingface_hub.errors import (
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of transformers
        return None
    if isinstance(err, HFValidationError):
        return f"not a local path and not a valid Hugging Face hub id ({err}). {OFFLINE_HINT}"
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        return f"not available offline ({err}). {OFFLINE_HINT}"
    if isinstance(err, RepositoryNotFoundError):
        return f"no such Hugging Face hub repository ({str(err).splitlines()[0]}). {OFFLINE_HINT}"
    return None


def explain(err: BaseException) -> str | None:
    """A one-paragraph message for an exception caused by the user's input, or ``None`` for a bug."""
    from safetensors import SafetensorError

    if isinstance(err, (UserError, SafetensorError)):
        message = str(err)
        if isinstance(err, SafetensorError):
            message = f"a .safetensors file is truncated or corrupt ({message})"
    elif isinstance(err, KeyError):  # our lookups raise KeyError with a sentence; a bare key is a bug
        sentence = err.args and isinstance(err.args[0], str) and " " in err.args[0]
        message = err.args[0] if sentence else None
    elif isinstance(err, pickle.UnpicklingError):
        message = refused_pickle_message("a checkpoint file", err)
    elif isinstance(err, OSError):
        message = _hub_message(err) or _os_message(err)
    elif isinstance(err, ValueError):
        message = _hub_message(err) or str(err)
    elif type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        message = (
            f"out of GPU memory ({str(err).splitlines()[0]}); lower the batch size (--batch-size, "
            "train.batch_size) or use a larger GPU"
        )
    else:
        message = _hub_message(err)
    if message is None:
        return None
    return " ".join(message.split())  # one paragraph


def refused_pickle_message(what: str, err: BaseException) -> str:
    """Why a ``torch.load(weights_only=True)`` refusal happened, without torch's unsafe advice."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))  # the object it asks for, not torch's advice
    detail = f" (it asks for {found.group(1)})" if found else ""
    return (
        f"{what}: refused to load: the file holds pickled Python objects, not only tensors, and this "
        f"project never unpickles arbitrary code{detail}. Re-save it as safetensors or as a plain state "
        "dict of tensors from a source you trust."
    )
