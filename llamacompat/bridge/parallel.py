"""``llamacompat serve --parallel N``: the server's model in parallel mode, shared by its clients.

The server opens the core's slots (``LocalCore.open_slots``) under one ``parallel.Pool``: every client's
``completion``, ``embedding`` and ``rerank`` (and the Llambo ``INFER`` / ``INFER_STREAM``) is a pool request,
so up to N of them decode at once and the rest wait in FIFO order. Each request keeps what is its client's
own: the ``strict`` flag of its line and where its warnings go (``Ask``, unpacked by ``ServedSlots``).

Calls that need the whole model cannot run beside the slots, so the server refuses them while parallel mode
is on (``refusal``): session load and save with llama.rn's ``ParallelModeError``, bench, LoRA changes and
clear_cache with ``ContextBusyError``, each saying why. LOAD and FREE replace the pool with the model.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Literal, Mapping, Union

from ..errors import ContextBusyError, LlamaError, ParallelModeError, warnings_to
from ..local import LocalCore
from ..parallel.pool import Pool
from ..parallel.slots import Progress, Slots
from ..types import CompletionResult, EmbeddingResult, RerankResult, TokenData

__all__ = ["POOLED", "DEFAULT_BATCH", "Ask", "ServedSlots", "open_pool", "refusal", "idle_status"]

#: The JSON methods that run as pool requests in parallel mode
POOLED = frozenset({"completion", "embedding", "rerank"})
#: Tokens a step when the server's init params name no ``n_batch`` (llama.rn's parallel default)
DEFAULT_BATCH = 512
_WHOLE_MODEL = frozenset({"bench", "apply_lora_adapters", "remove_lora_adapters", "clear_cache", "init_multimodal",
                          "release_multimodal"})


@dataclass(frozen=True)
class Ask:
    """A client's request as the server submits it to the pool, in place of the call's params."""

    params: Any
    strict: bool
    warn: Callable[[str], None]


# What the pool hands ServedSlots as a call's params: always an Ask (typed wider to fit the Slots protocol).
_Params = Union[Ask, Mapping[str, Any], None]


def _ask(params: _Params) -> Ask:
    assert isinstance(params, Ask), "the bridge server submits every pool request with an Ask"
    return params


class ServedSlots:
    """The core's slots, each request run with its own ``strict`` flag and warning sink (from its ``Ask``)."""

    def __init__(self, slots: Slots) -> None:
        self._slots = slots
        self.n_parallel, self.concurrency = slots.n_parallel, slots.concurrency
        self.support: Literal["native", "emulated"] = slots.support

    def completion(self, params: _Params, stop: threading.Event, strict: bool,
                   progress: Progress) -> Generator[TokenData, None, CompletionResult]:
        ask = _ask(params)
        # The generator runs on one pool worker from start to end, so the sink (a context variable) holds.
        with warnings_to(ask.warn):
            return (yield from self._slots.completion(ask.params, stop, ask.strict, progress))

    def embedding(self, text: str, params: _Params, progress: Progress) -> EmbeddingResult:
        ask = _ask(params)
        with warnings_to(ask.warn):
            return self._slots.embedding(text, ask.params, progress)

    def rerank(self, query: str, documents: list[str], params: _Params, progress: Progress) -> list[RerankResult]:
        ask = _ask(params)
        with warnings_to(ask.warn):
            return self._slots.rerank(query, documents, ask.params, progress)

    def close(self) -> None:
        self._slots.close()


def open_pool(core: LocalCore, n_parallel: int, n_batch: int, ids: Callable[[], int]) -> Pool:
    """Parallel mode on ``core``: ``n_parallel`` slots of ``n_batch`` tokens a step; request ids from ``ids``
    (one counter for the server's life, so STATUS never shows two requests with one id)."""
    slots = core.open_slots(n_parallel, n_batch)
    try:
        # strict is per request (Ask); the pool's own flag is unused
        return Pool(ServedSlots(slots), False, ids)
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
