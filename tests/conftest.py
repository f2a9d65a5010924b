"""Shared fixtures: real llama.cpp contexts on the packaged SmolLM2 model (no mocks)."""

from __future__ import annotations

import threading
import time

import pytest

from llamacompat import init_llama, release_all_llama
from llamacompat.models import default_model_path


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


GREEDY = {"temperature": 0}


def run_in_background(ctx, params):
    """Start ``ctx.completion(params)`` on a thread; return (thread, box) once the first token arrived.

    ``box["result"]`` holds the result and ``box["done"]`` the perf_counter time it returned.
    """
    started, box = threading.Event(), {}

    def run():
        box["result"] = ctx.completion(params, lambda e: started.set())
        box["done"] = time.perf_counter()

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(30), "no token within 30 s"
    return worker, box
