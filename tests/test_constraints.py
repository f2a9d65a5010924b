"""The test install is reproducible: every dependency of the README's test command is pinned in test-constraints.txt.

A dependency added to pyproject.toml without a pin (or a pin that falls outside its range) fails here, so a fresh
machine always installs what CI tested. `.ci/update-constraints` moves the pins forward on purpose.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from .test_readme import _readme_commands

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - pytest itself depends on tomli before 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "test-constraints.txt"
# The installer's own packages: pip freeze leaves them out, and every environment brings its own.
INSTALLER = {"pip", "setuptools", "wheel"}


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"test-constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[canonicalize_name(name)] = version.strip()
    return pins


def _test_extras() -> list[str]:
    """The extras the README's test command installs."""
    match = re.search(r"-e '\.\[([^]]*)\]'", _readme_commands()[1])
    assert match, "the README's test command installs no extras"
    return match.group(1).split(",")


def _applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**default_environment(), "extra": extra}) for extra in extras | {""})


def _direct_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in _test_extras():
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in wanted if _applies(r, set())]


def test_the_readme_and_ci_install_with_the_constraints():
    command = _readme_commands()[1]
    assert command.startswith("pip install -c test-constraints.txt -e "), command
    assert CONSTRAINTS.is_file()


def test_every_direct_dependency_is_pinned_inside_its_range():
    pins = _pins()
    for requirement in _direct_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, (f"{requirement.name} (pyproject.toml) has no pin in test-constraints.txt: "
                              "run .ci/update-constraints")
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"test-constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")


def test_everything_they_pull_in_is_pinned():
    """The installed closure of the test install (this environment was installed with the constraints)."""
    pins = _pins()
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(r, set(r.extras)) for r in _direct_requirements()]
    while todo:
        requirement, extras = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in INSTALLER:
            continue
        assert name in pins, f"{requirement.name} (needed by the test install) has no pin in test-constraints.txt"
        if (name, tuple(sorted(extras))) in seen:
            continue
        seen.add((name, tuple(sorted(extras))))
        assert metadata.version(name) == pins[name], (
            f"{name} {metadata.version(name)} is installed but test-constraints.txt pins {pins[name]}: "
            "install with the README's test command")
        for text in metadata.requires(name) or []:
            inner = Requirement(text)
            if _applies(inner, extras):
                todo.append((inner, set(inner.extras)))
    assert len(seen) > 50  # the walk really followed the dependency tree
