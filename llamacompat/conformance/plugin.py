"""pytest plugin (registered through the ``pytest11`` entry point): options and the ``conformance_kit`` fixture.

``--llamacompat-backend NAME`` (repeatable) picks the backends; without it, every
built-in backend that is installed. ``--llamacompat-param key=value`` (repeatable,
values parsed as JSON when they can be) adds init params, e.g. ``model=/path.gguf``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llamacompat", "llamacompat conformance suite")
    group.addoption("--llamacompat-backend", action="append", default=[], metavar="NAME",
                    help="backend to check (repeatable; default: every installed built-in backend)")
    group.addoption("--llamacompat-param", action="append", default=[], metavar="KEY=VALUE",
                    help="init_llama param for the checked contexts (repeatable; VALUE is JSON or a string)")


def parse_params(items: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise pytest.UsageError(f"--llamacompat-param wants KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    return params


def installed_builtin_backends() -> list[str]:
    from ..errors import BackendUnavailableError
    from ..registry import BUILTIN, get_adapter

    names = []
    for name in BUILTIN:
        try:
            get_adapter(name)
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_backend" in metafunc.fixturenames:
        backends = metafunc.config.getoption("llamacompat_backend") or installed_builtin_backends()
        metafunc.parametrize("conformance_backend", backends, scope="session")


@pytest.fixture(scope="session")
def conformance_kit(request: pytest.FixtureRequest, conformance_backend: str):
    from .kit import Kit

    kit = Kit(conformance_backend, parse_params(request.config.getoption("llamacompat_param")))
    yield kit
    kit.close()
