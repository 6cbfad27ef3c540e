"""The committed lock (constraints.txt) agrees with pyproject.toml and is what this environment runs."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SETUP_EXTRAS = ("dev", "minilm")  # what .ci/setup installs


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"constraints.txt: {line!r} is not an exact 'name==version' pin"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in SETUP_EXTRAS:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not locked in constraints.txt: run .ci/lock"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req.specifier}: run .ci/lock"
        )


def test_environment_matches_the_lock() -> None:
    """Every locked package that is installed here has the locked version (.ci/setup installed it)."""
    pins = _pins()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in metadata.distributions()}
    wrong = {n: (str(v), str(installed[n])) for n, v in pins.items() if n in installed and installed[n] != v}
    assert not wrong, f"installed versions differ from constraints.txt (locked, installed): {wrong}"
    missing = [r.name for r in _requirements() if canonicalize_name(r.name) not in installed]
    assert not missing, f"dependencies not installed: {missing}"
