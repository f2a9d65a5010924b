"""What a core offers in parallel mode (``Slots``), and the one status record every request keeps.

A core opens ``Slots`` when ``ctx.parallel.enable`` runs: up to ``concurrency`` calls of
``completion`` / ``embedding`` / ``rerank`` may then run at once, each on its own worker
thread of the pool (``parallel.pool``). How they share the model is the core's business:

- llama_cpp: one llama.cpp context with ``n_seq_max`` sequences, one batch per step
  (``adapters.llama_cpp_batch``): ``native``.
- openai and bridge: concurrent requests; the server batches them: ``native`` where it does.
- mlx and rkllm: the runtime runs one sequence, so requests take turns (``concurrency`` 1):
  ``emulated``.

Each call gets the request's ``Progress`` (its live status) and the request's own stop flag.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator, Literal, Mapping, Protocol

from ..types import CompletionResult, EmbeddingResult, RerankResult, TokenData

__all__ = ["Slots", "Progress", "CoreSlots", "RequestKind", "RequestState"]

RequestKind = Literal["completion", "embedding", "rerank"]
RequestState = Literal["queued", "processing_prompt", "generating", "done"]


@dataclass
class Progress:
    """One request's live status (llama.rn's ParallelRequestStatus), kept by the pool and its slot.

    The pool marks the start and the end and counts events; a slot that knows more (the prompt's token
    count, when the prompt is evaluated, each token) says so through ``prompt`` and ``token``.
    """

    request_id: int
    type: RequestKind
    state: RequestState = "queued"
    prompt_length: int = 0
    tokens_generated: int = 0
    started: float = 0.0  # perf_counter when a slot took it
    generating_since: float = 0.0  # perf_counter when its prompt was evaluated
    finished: float = 0.0
    exact: bool = False  # the slot counts tokens itself (the pool's event count is only an estimate)
    on_change: Callable[[], None] = field(default=lambda: None, repr=False)

    def start(self) -> None:
        self.state, self.started = "processing_prompt", time.perf_counter()
        self.on_change()

    def prompt(self, n_tokens: int) -> None:
        """The prompt has ``n_tokens`` tokens (known once it is tokenized)."""
        self.prompt_length = n_tokens
        self.on_change()

    def generating(self) -> None:
        """The prompt is evaluated: generation starts."""
        if self.state != "generating":
            self.state, self.generating_since = "generating", time.perf_counter()
            self.on_change()

    def token(self) -> None:
        """A slot generated one token."""
        self.exact = True
        self.tokens_generated += 1
        if self.state != "generating":
            self.generating()

    def event(self) -> None:
        """The pool saw one TokenData event (a token count where the slot keeps none)."""
        if not self.exact:
            self.tokens_generated += 1
        self.generating()

    def done(self, result: Mapping[str, Any] | None = None) -> None:
        self.state, self.finished = "done", time.perf_counter()
        if result is not None and "tokens_predicted" in result:
            self.tokens_generated = int(result["tokens_predicted"])
        self.on_change()

    def as_dict(self) -> dict[str, Any]:
        now = time.perf_counter()
        end = self.finished or now
        prompt_ms = ((self.generating_since or end) - self.started) * 1000.0 if self.started else 0.0
        generation_ms = (end - self.generating_since) * 1000.0 if self.generating_since else 0.0
        return {"request_id": self.request_id, "type": self.type, "state": self.state,
                "prompt_length": self.prompt_length, "tokens_generated": self.tokens_generated,
                "prompt_ms": prompt_ms, "generation_ms": generation_ms,
                "tokens_per_second": self.tokens_generated / generation_ms * 1000.0 if generation_ms > 0 else 0.0}


class Slots(Protocol):
    """A core's parallel mode. ``concurrency`` calls may run at once, on different threads."""

    n_parallel: int  # the slots asked for (what get_status reports)
    concurrency: int  # how many calls run at once: n_parallel, or 1 where requests take turns
    support: Literal["native", "emulated"]

    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event, strict: bool,
                   progress: Progress) -> Generator[TokenData, None, CompletionResult]: ...
    def embedding(self, text: str, params: Mapping[str, Any] | None, progress: Progress) -> EmbeddingResult: ...
    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None,
               progress: Progress) -> list[RerankResult]: ...
    def close(self) -> None:
        """Called once no call runs any more."""


class CoreSlots:
    """Parallel mode over a core's own calls: ``concurrency`` of them at once.

    For a core whose calls are safe to run side by side because a server batches them (openai,
    bridge), or with ``concurrency`` 1 for a runtime that runs one sequence (mlx, rkllm).
    """

    def __init__(self, core: Any, n_parallel: int, concurrency: int, support: Literal["native", "emulated"]) -> None:
        self._core = core
        self.n_parallel, self.concurrency, self.support = n_parallel, concurrency, support

    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event, strict: bool,
                   progress: Progress) -> Generator[TokenData, None, CompletionResult]:
        return self._core.completion(params, stop, strict)

    def embedding(self, text: str, params: Mapping[str, Any] | None, progress: Progress) -> EmbeddingResult:
        return self._core.embedding(text, params)

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None,
               progress: Progress) -> list[RerankResult]:
        return self._core.rerank(query, documents, params)

    def close(self) -> None:
        pass
