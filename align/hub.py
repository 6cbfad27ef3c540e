"""Hugging Face hub ids that cannot be fetched fail fast, with a message saying how to use a local copy.

When ``HF_HUB_OFFLINE`` is set, or the hub's host cannot be reached, a hub id is looked up only in the
local cache: no download attempts and no retries (the rest of the process runs in offline mode).
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from align.errors import OFFLINE_HINT, UserError


def looks_like_hub_id(text: str) -> bool:
    """``org/name`` that is not an existing path (an absolute or ``./`` path never is an id)."""
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_hub_id(spec: str, what: str) -> None:
    """Return if ``spec`` can be loaded (online, or in the local cache); else raise ``UserError`` at once.

    ``what`` names the thing in the message (e.g. ``"vision encoder"``, ``"MLLM"``).
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE and hub_reachable():
        return
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else f"{constants.ENDPOINT} is unreachable"
    constants.HF_HUB_OFFLINE = True  # no download attempts (nor their retries) for the rest of the run
    os.environ["HF_HUB_OFFLINE"] = "1"  # for libraries and subprocesses that read the variable
    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return
    raise UserError(
        f"{what} '{spec}': no such local path, and as a Hugging Face hub id it is not in the local cache "
        f"({constants.HF_HUB_CACHE}) while {why}. {OFFLINE_HINT}"
    )
