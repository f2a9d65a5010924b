"""``llamacompat serve --parallel N``: the server's model in parallel mode, shared by its clients.

The server opens the core's slots (``LocalCore.open_slots``) under one ``parallel.Pool``: every client's
``completion``, ``embedding`` and ``rerank`` (and the Llambo ``INFER`` / ``INFER_STREAM``) is a pool request,
so up to N of them decode at once and the rest wait in FIFO order. Each request keeps what is its client's
own: the ``strict`` flag of its line and where its warnings go (``Pool.submit``'s ``strict`` and ``warn``).

Calls that need the whole model cannot run beside the slots, so the server refuses them while parallel mode
is on (``refusal``): session load and save with llama.rn's ``ParallelModeError``, bench, LoRA changes and
clear_cache with ``ContextBusyError``, each saying why. LOAD and FREE replace the pool with the model.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import ContextBusyError, LlamaError, ParallelModeError
from ..local import LocalCore
from ..parallel.pool import Pool

__all__ = ["POOLED", "DEFAULT_BATCH", "open_pool", "refusal", "idle_status"]

#: The JSON methods that run as pool requests in parallel mode
POOLED = frozenset({"completion", "embedding", "rerank"})
#: Tokens a step when the server's init params name no ``n_batch`` (llama.rn's parallel default)
DEFAULT_BATCH = 512
_WHOLE_MODEL = frozenset({"bench", "apply_lora_adapters", "remove_lora_adapters", "clear_cache", "init_multimodal",
                          "release_multimodal"})


def open_pool(core: LocalCore, n_parallel: int, n_batch: int, ids: Callable[[], int]) -> Pool:
    """Parallel mode on ``core``: ``n_parallel`` slots of ``n_batch`` tokens a step; request ids from ``ids``
    (one counter for the server's life, so STATUS never shows two requests with one id)."""
    slots = core.open_slots(n_parallel, n_batch)
    try:
        # strict and the warning sink are each client's own: the server passes them with every submit
        return Pool(slots, False, ids)
    except BaseException:
        slots.close()
        raise


def refusal(method: str, n_parallel: int) -> LlamaError | None:
    """Why ``method`` cannot run while the server's slots hold the model, or None if it can.

    Sessions: llama.rn's own refusal (``ParallelModeError``: a session is one sequence's state, and N
    sequences share the cache). Bench, LoRA changes and clear_cache would act on every slot's requests at
    once: ``ContextBusyError``, as a context in parallel mode answers them.
    """
    if method in ("load_session", "save_session"):
        action = method.split("_")[0]
        return ParallelModeError(f"Session {action} is not supported while parallel mode is enabled "
                                 f"(the bridge server runs with --parallel {n_parallel})")
    if method in _WHOLE_MODEL:
        return ContextBusyError(f"Context is busy: the bridge server runs in parallel mode (--parallel {n_parallel}), "
                                f"whose slots hold the model, so {method} cannot run; start the server without "
                                "--parallel for it")
    return None


def idle_status(n_parallel: int) -> dict[str, Any]:
    """The parallel status of a server in parallel mode with no model loaded (after FREE)."""
    return {"n_parallel": n_parallel, "active_slots": 0, "queued_requests": 0, "requests": []}
