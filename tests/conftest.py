"""Test-session setup: offline, and tiny models built once into a per-session home directory."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist each worker (and every process it starts) gets its share of the cores: torch's default of
# one intra-op thread per core, in each of two workers, spin-waits on 2 cores and made the suite 1.7x slower.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: none
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))
# MLLM_SWAP_TEST_HOME reuses built tiny models across local runs; by default each session builds its own,
# which the pytest-xdist workers share (they inherit the variable; the builds hold a lock: align.embedded).
if os.environ.get("MLLM_SWAP_TEST_HOME"):
    os.environ["MLLM_SWAP_HOME"] = os.environ["MLLM_SWAP_TEST_HOME"]
else:
    _home = tempfile.mkdtemp(prefix="mllm-swap-test-home-")
    os.environ["MLLM_SWAP_HOME"] = os.environ["MLLM_SWAP_TEST_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)


@pytest.fixture
def one_thread():
    """Small matmuls on a shared 2-core machine: a second intra-op thread only adds spin-waits."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world shared by the whole session (read-only for tests)."""
    from align.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(out, n=96, seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """One ``mllm-swap demo --quick`` run shared by the demo's test modules and the session's xdist workers:
    the first to ask runs it under a lock, the others wait and read it. Read-only: a test that changes a
    run works on a copy."""
    from filelock import FileLock

    from mllm_swap.cli import main

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent  # the workers' common folder of this session
    root, done = shared / "quick-demo" / "run", shared / "quick-demo" / "complete"
    done.parent.mkdir(exist_ok=True)
    with FileLock(shared / "quick-demo" / "lock"):
        if not done.exists():
            assert main(["demo", "--out", str(root), "--quick"]) == 0
            done.touch()
    return root


# Python source to put first in a subprocess's code: importing this project there fails, as in an environment
# without it (the editable install would otherwise serve it, e.g. through lmms-eval's entry-point scan).
WITHOUT_PROJECT = """
import sys
class _WithoutProject:
    blocked = []
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("align", "mllm_swap"):
            self.blocked.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _WithoutProject())
"""


@pytest.fixture(scope="session")
def without_project() -> str:
    """:data:`WITHOUT_PROJECT`: source that makes ``align`` / ``mllm_swap`` unimportable in a subprocess."""
    return WITHOUT_PROJECT
