"""The embedded default's models: built once into the home directory, and found by name.

Tiny models are not imported by the code that loads them: packages register them as entry points of the
group ``mllm_swap.tiny_models`` (name = the model id, value = a function ``(name) -> Path`` that builds
it once and returns its directory; see ``pyproject.toml``). :func:`tiny_model_dir` finds and builds one,
:func:`tiny_model_names` lists them; :func:`build_once` is how a builder writes its directory.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import torch

from align.paths import models_dir

TINY_GROUP = "mllm_swap.tiny_models"
TINY_VERSION = 1
BUILD_WAIT_S = 3600  # how long other processes of a launch wait for a first-use build


@functools.cache
def _registered() -> dict[str, EntryPoint]:
    """The group's entry points by id, read once per process (nothing is imported or built)."""
    return {ep.name: ep for ep in entry_points(group=TINY_GROUP)}


def tiny_model_names() -> list[str]:
    """The ids of every registered tiny model."""
    return sorted(_registered())


def is_tiny_model(name: str) -> bool:
    """Whether ``name`` is a registered tiny model id."""
    return str(name) in _registered()


def tiny_model_dir(name: str) -> Path:
    """Directory of the registered tiny model ``name``, built on first use."""
    if name not in _registered():
        raise KeyError(f"unknown tiny model '{name}'; expected one of {tiny_model_names()}")
    ensure: Callable[[str], Path] = _registered()[name].load()
    return Path(ensure(name))


def build_once(
    name: str, builder: Callable[[Path], None], version: int = TINY_VERSION, seed: int = 0
) -> Path:
    """Build ``models_dir()/name`` with ``builder`` unless an up-to-date copy exists; returns the directory.

    The build goes to a temporary sibling and is renamed into place, so a killed build never leaves a
    half-written model; a file lock beside it lets one process build while the others (another terminal,
    another test worker) wait and then use its result. Under ``accelerate launch`` only the
    first process of each machine builds, as a plain single process (``align.distributed.
    outside_launch``: a builder that trains does not join the run's processes or DeepSpeed config);
    the others wait for its result.
    """
    from align.distributed import local_rank, outside_launch

    target = models_dir() / name
    stamp = {"id": name, "version": version, "seed": seed}
    marker = target / "tiny_build.json"

    def built() -> bool:
        return marker.is_file() and json.loads(marker.read_text()) == stamp

    if built():
        return target
    if local_rank() != 0:
        deadline = time.monotonic() + BUILD_WAIT_S
        while not built():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{target}: waited {BUILD_WAIT_S} s for local process 0 to build it")
            time.sleep(1.0)
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time per model (two terminals, test workers): the others wait, then find it built.
    with FileLock(target.parent / f".{name}.lock", timeout=BUILD_WAIT_S):
        if built():
            return target
        with outside_launch():
            return _build(target, stamp, builder, seed)


def _build(target: Path, stamp: dict, builder: Callable[[Path], None], seed: int) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            builder(tmp)
        finally:
            torch.random.set_rng_state(state)
        (tmp / "tiny_build.json").write_text(json.dumps(stamp))
        if target.exists():  # an outdated build (the lock keeps other builders out)
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
