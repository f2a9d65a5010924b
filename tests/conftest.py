"""Shared fixtures: real llama.cpp contexts on the packaged SmolLM2 model (no mocks)."""

from __future__ import annotations

import pytest

from llamacompat import init_llama, release_all_llama
from llamacompat.conformance.kit import GREEDY, run_in_background  # noqa: F401  (shared with the suite)
from llamacompat.models import default_model_path

from .bridge_helpers import Raw


@pytest.fixture(scope="session")
def model_path() -> str:
    return default_model_path()


_shared: dict[str, object] = {}


@pytest.fixture
def ctx():
    """One shared context, made again if a test released it (release_all_llama does)."""
    context = _shared.get("ctx")
    if context is None or context.released:
        context = _shared["ctx"] = init_llama({"model": "smollm2", "n_ctx": 1024, "n_threads": 2})
    return context


@pytest.fixture(scope="session", autouse=True)
def _release_everything_at_exit():
    yield
    release_all_llama()


@pytest.fixture
def fresh_ctx():
    """A private context for tests that release it or stress its state (loads in ~0.2 s)."""
    context = init_llama({"n_ctx": 1024, "n_threads": 2})
    yield context
    context.release()


@pytest.fixture
def raw(served):
    """One raw protocol connection to the test module's ``served`` bridge server (each bridge test module defines its own)."""
    conn = Raw(served.socket)
    yield conn
    conn.close()
