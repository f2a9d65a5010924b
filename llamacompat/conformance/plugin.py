"""pytest plugin (registered through the ``pytest11`` entry point): options and the ``conformance_kit`` fixture.

``--llamacompat-backend NAME`` (repeatable) picks the backends; without it, every
built-in backend that is installed. ``--llamacompat-param key=value`` (repeatable,
values parsed as JSON when they can be) adds init params, e.g. ``model=/path.gguf``.
"""

from __future__ import annotations

from typing import Any

import pytest

from ..params import parse_params
from ..registry import installed_builtin_backends
from .kit import Kit


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("llamacompat", "llamacompat conformance suite")
    group.addoption("--llamacompat-backend", action="append", default=[], metavar="NAME",
                    help="backend to check (repeatable; default: every installed built-in backend)")
    group.addoption("--llamacompat-param", action="append", default=[], metavar="KEY=VALUE",
                    help="init_llama param for the checked contexts (repeatable; VALUE is JSON or a string)")


def _params(config: pytest.Config) -> dict[str, Any]:
    try:
        return parse_params(config.getoption("llamacompat_param"))
    except ValueError as err:
        raise pytest.UsageError(f"--llamacompat-param: {err}") from None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "conformance_backend" in metafunc.fixturenames:
        backends = metafunc.config.getoption("llamacompat_backend") or installed_builtin_backends()
        metafunc.parametrize("conformance_backend", backends, scope="session")


@pytest.fixture(scope="session")
def conformance_kit(request: pytest.FixtureRequest, conformance_backend: str):
    kit = Kit(conformance_backend, _params(request.config))
    yield kit
    kit.close()
