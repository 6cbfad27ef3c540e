"""The layout's rules hold: import contracts (import-linter), module size, and the tiny-model hook.

The allowed arrows are drawn in docs/architecture.md and declared in pyproject.toml; import-linter's
graph includes imports inside functions, so a lazy import is an arrow too.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from align.embedded import TINY_GROUP, tiny_model_names

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("align", "mllm_swap")
MAX_LINES = 400


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lint_imports(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the real ``lint-imports`` CLI (import-linter) of this environment in ``cwd``."""
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_import_contracts_kept():
    contracts = _pyproject()["tool"]["importlinter"]["contracts"]
    result = lint_imports()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    for contract in contracts:
        assert f"{contract['name']} KEPT" in result.stdout, result.stdout[-3000:]


def test_import_contracts_catch_a_lazy_import(tmp_path):
    """A function-level import of mllm_swap inside align breaks a contract (the check is not vacuous)."""
    for name in (*PACKAGES, "pyproject.toml"):
        source = ROOT / name
        target = tmp_path / name
        if source.is_dir():
            subprocess.run(["cp", "-r", str(source), str(target)], check=True)
        else:
            target.write_text(source.read_text())
    losses = tmp_path / "align" / "losses.py"
    losses.write_text(losses.read_text() + "\n\ndef _sneaky():\n    import mllm_swap.swap  # noqa: F401\n")
    result = lint_imports(cwd=tmp_path)
    assert result.returncode != 0
    assert "align never imports mllm_swap BROKEN" in result.stdout
    assert "align.losses -> mllm_swap.swap" in result.stdout


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_small(package):
    big = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by idea): {big}"


def test_tiny_models_registered_by_hook():
    """Every tiny id declared in pyproject is installed as an entry point and loads to a callable."""
    declared = _pyproject()["project"]["entry-points"][TINY_GROUP]
    assert tiny_model_names() == sorted(declared), "reinstall (pip install -e .): the entry points are stale"
    for ep in entry_points(group=TINY_GROUP):
        assert callable(ep.load()), f"{ep.name}: {ep.value} is not callable"
