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
# MLLM_SWAP_TEST_HOME reuses built tiny models across local runs; by default each session builds its own.
if os.environ.get("MLLM_SWAP_TEST_HOME"):
    os.environ["MLLM_SWAP_HOME"] = os.environ["MLLM_SWAP_TEST_HOME"]
else:
    _home = tempfile.mkdtemp(prefix="mllm-swap-test-home-")
    os.environ["MLLM_SWAP_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small shapes world shared by the whole session (read-only for tests)."""
    from align.data.shapes import generate_shapes

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    generate_shapes(out, n=96, seed=0, progress=False)
    return out
