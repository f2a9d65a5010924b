"""``AsyncLlamaContext``: the awaitable twin of ``LlamaContext``, for asyncio programs.

Every method is a coroutine with the sync method's arguments and result; none blocks the
event loop. Calls that hold the model (completion, embedding, bench, sessions, LoRA, ...)
are claimed at once, so busy and released raise when called, as in the sync context, and
run on the context's own worker thread; the calls that run beside a completion
(``tokenize``, ``detokenize``, ``get_formatted_chat``, ``get_loaded_lora_adapters``: network
round trips on the bridge and openai backends) run on the loop's default executor. A cancelled
await stops the completion it waited for. Callbacks (``on_progress``, a completion's
``callback``) run on the event loop and may be coroutines.

``ctx.parallel`` is ``AsyncParallel``: llama.rn's parallel namespace as coroutines. While parallel
mode is on, a plain ``completion`` / ``embedding`` / ``rerank`` is queued through it (as in the sync
context) and waited for on the default executor, so several of them can wait at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Any, Callable, Mapping

from ..errors import InvalidParamsError, ParallelModeError
from ..parallel.pool import ParallelRequest, Subscription
from ..types import (
    CompletionParams,
    CompletionResult,
    EmbeddingParams,
    EmbeddingResult,
    LoraAdapter,
    RerankParams,
    RerankResult,
    SessionLoadResult,
    TokenData,
    TokenizeParams,
    TokenizeResult,
)
from .core import CALLS
from .streams import AsyncCompletionStream
from .sync import LlamaContext

__all__ = ["AsyncLlamaContext", "AsyncParallel", "AsyncParallelRequest"]

_SHOWN = ("id", "model", "capabilities", "backend", "gpu", "reason_no_gpu", "devices", "system_info", "android_lib",
          "released", "busy", "is_jinja_supported", "is_llama_chat_supported")


def _event_sink(loop: asyncio.AbstractEventLoop, callback: Callable[[TokenData], Any] | None):
    """A worker-thread callback that runs ``callback`` (sync or async) on the event loop."""
    if callback is None:
        return None

    def invoke(event: TokenData) -> None:
        outcome = callback(event)
        if inspect.isawaitable(outcome):
            asyncio.ensure_future(outcome)

    return lambda event: loop.call_soon_threadsafe(invoke, event)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any]) -> Callable[..., None]:
    """A pool-thread callback that runs ``callback(*args)`` (sync or async) on the event loop instead."""

    def invoke(*args: Any) -> None:
        outcome = callback(*args)
        if inspect.isawaitable(outcome):
            asyncio.ensure_future(outcome)

    def post(*args: Any) -> None:
        try:
            loop.call_soon_threadsafe(invoke, *args)
        except RuntimeError:  # the loop is closed: nobody is left to call
            pass

    return post


def _awaitable(loop: asyncio.AbstractEventLoop, source: "concurrent.futures.Future[Any]",
               stop: Callable[[], None]) -> "asyncio.Future[Any]":
    """An asyncio future that settles with ``source`` (the pool's promise). Cancelling it stops the request and
    leaves ``source`` to the pool, which settles it (``asyncio.wrap_future`` would cancel ``source`` instead)."""
    target: asyncio.Future[Any] = loop.create_future()

    def copy() -> None:
        if target.done():  # cancelled by its awaiter
            return
        error = source.exception()
        if error is not None:
            target.set_exception(error)
        else:
            target.set_result(source.result())

    def settled(_source: "concurrent.futures.Future[Any]") -> None:
        try:
            loop.call_soon_threadsafe(copy)
        except RuntimeError:  # the loop is closed: nobody awaits it any more
            pass

    target.add_done_callback(lambda done: stop() if done.cancelled() else None)
    source.add_done_callback(settled)
    return target


class AsyncParallelRequest:
    """What ``AsyncParallel.completion`` (and embedding, rerank) return: ``request_id``, ``promise`` (an asyncio
    future: ``await req.promise``; cancelling it stops the request) and ``stop()``."""

    __slots__ = ("request_id", "promise", "_request")

    def __init__(self, request: ParallelRequest, promise: "asyncio.Future[Any]") -> None:
        self.request_id, self.promise, self._request = request.request_id, promise, request

    def stop(self) -> None:
        """Stop this request: a queued one never runs, a running one ends with ``interrupted: True``."""
        self._request.stop()

    def __repr__(self) -> str:
        return repr(self._request).replace("<ParallelRequest", "<AsyncParallelRequest", 1)


class AsyncParallel:
    """llama.rn's ``context.parallel`` for an ``AsyncLlamaContext``: the sync ``Parallel`` as coroutines.

    ``enable`` / ``disable`` / ``configure`` run on the loop's default executor (``disable`` waits until every
    promise has settled); ``on_token`` and status callbacks run on the event loop and may be coroutines.
    """

    def __init__(self, ctx: LlamaContext) -> None:
        self._ctx = ctx

    @property
    def enabled(self) -> bool:
        return self._ctx.parallel.enabled

    async def _off_loop(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, call, *args)

    async def enable(self, config: Mapping[str, Any] | None = None) -> bool:
        """``Parallel.enable``: ``n_parallel`` slots (default 2), ``n_batch`` tokens a step (512)."""
        return await self._off_loop(self._ctx.parallel.enable, config)

    async def disable(self) -> bool:
        """``Parallel.disable``: running requests end interrupted, queued ones are cancelled; returns once every
        promise has settled."""
        return await self._off_loop(self._ctx.parallel.disable)

    async def configure(self, config: Mapping[str, Any] | None = None) -> bool:
        """``Parallel.configure``: ``enable`` with a new config."""
        return await self._off_loop(self._ctx.parallel.configure, config)

    async def get_status(self) -> dict[str, Any]:
        """llama.rn's ParallelStatus: ``n_parallel``, ``active_slots``, ``queued_requests``, ``requests``."""
        return self._ctx.parallel.get_status()

    async def subscribe_to_status(self, callback: Callable[[dict[str, Any]], Any]) -> Subscription:
        """Call ``callback(status)`` (sync or async, on the event loop) now and on every change; ``remove()``
        on the returned object stops it."""
        if not callable(callback):
            raise InvalidParamsError("parallel.subscribe_to_status: callback must be callable")
        return self._ctx.parallel.subscribe_to_status(_on_loop(asyncio.get_running_loop(), callback))

    def _handle(self, request: ParallelRequest) -> AsyncParallelRequest:
        return AsyncParallelRequest(request, _awaitable(asyncio.get_running_loop(), request.promise, request.stop))

    async def completion(self, params: CompletionParams | dict[str, Any] | None = None,
                         on_token: Callable[[int, TokenData], Any] | None = None) -> AsyncParallelRequest:
        """Queue a completion; returns at once, without waiting for a slot. ``await req.promise`` gives the same
        result as ``completion``; ``on_token(request_id, data)`` (sync or async) runs on the event loop."""
        if on_token is not None and not callable(on_token):
            raise InvalidParamsError("parallel.completion: on_token must be callable")
        sink = None if on_token is None else _on_loop(asyncio.get_running_loop(), on_token)
        return self._handle(self._ctx.parallel.completion(params, sink))

    async def embedding(self, text: str, params: EmbeddingParams | dict[str, Any] | None = None) -> AsyncParallelRequest:
        """Queue an embedding; ``await req.promise`` gives ``{"embedding": [...]}``."""
        return self._handle(self._ctx.parallel.embedding(text, params))

    async def rerank(self, query: str, documents: list[str],
                     params: RerankParams | dict[str, Any] | None = None) -> AsyncParallelRequest:
        """Queue a rerank; ``await req.promise`` gives ``[{score, index, document}]``, best first."""
        return self._handle(self._ctx.parallel.rerank(query, documents, params))


class AsyncLlamaContext:
    """Awaitable twin of ``LlamaContext`` (``init_llama_async`` makes one)."""

    def __init__(self, ctx: LlamaContext, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._ctx = ctx
        self._executor = executor  # one worker: the calls that hold the model
        self.parallel = AsyncParallel(ctx)

    def __getattr__(self, name: str) -> Any:  # id, model, capabilities, backend, gpu, ...
        if name in _SHOWN:
            return getattr(self._ctx, name)
        raise AttributeError(name)

    async def _call(self, name: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if CALLS[name].runs == "beside":
            return await loop.run_in_executor(None, self._ctx.beside, name, *args)
        if self._ctx.parallel.enabled:  # the sync call queues it through the slots, or refuses as llama.rn does
            return await self._await(loop.run_in_executor(None, getattr(self._ctx, name), *args))
        self._ctx.claim()  # busy/released raise here, at once
        try:
            future = loop.run_in_executor(self._executor, self._ctx.run_claimed, name, *args)
        except BaseException:
            self._ctx.unclaim()
            raise
        return await self._await(future)

    async def _await(self, future: "asyncio.Future[Any]") -> Any:
        try:
            return await future
        except asyncio.CancelledError:
            self._stop()  # a cancelled await must not leave the model generating
            raise

    def _stop(self) -> None:
        if not self._ctx.released:
            self._ctx.stop_completion()

    async def completion(self, params: CompletionParams | dict[str, Any] | None = None,
                         callback: Callable[[TokenData], Any] | None = None) -> CompletionResult:
        """``LlamaContext.completion``; ``callback`` (sync or async) runs on the event loop."""
        if callback is not None and not callable(callback):
            raise InvalidParamsError("completion: callback must be callable")
        loop = asyncio.get_running_loop()
        if self._ctx.parallel.enabled:  # queued as a parallel request; waited for beside the others
            return await self._await(loop.run_in_executor(None, self._ctx.completion, params,
                                                          _event_sink(loop, callback)))
        self._ctx.claim()
        try:
            future = loop.run_in_executor(self._executor, self._ctx.completion_claimed, params,
                                          _event_sink(loop, callback))
        except BaseException:
            self._ctx.unclaim()
            raise
        return await self._await(future)

    def stream(self, params: CompletionParams | dict[str, Any] | None = None) -> AsyncCompletionStream:
        """``async for event in ctx.stream(params)``; ``stream.result`` once exhausted."""
        ctx = self._ctx
        if ctx.parallel.enabled:
            raise ParallelModeError("stream() is not available while parallel mode is enabled; use "
                                    "ctx.parallel.completion(params, on_token) or completion(params, callback)")
        ctx.claim()
        try:
            return AsyncCompletionStream(self._executor, lambda sink: ctx.completion_claimed(params, sink), self._stop)
        except BaseException:
            self._ctx.unclaim()
            raise

    def stop_completion(self) -> None:
        """``LlamaContext.stop_completion`` (not a coroutine: it only sets a flag)."""
        self._ctx.stop_completion()

    async def tokenize(self, text: str, params: TokenizeParams | dict[str, Any] | None = None) -> TokenizeResult:
        return await self._call("tokenize", text, params)

    async def detokenize(self, tokens: list[int]) -> str:
        return await self._call("detokenize", tokens)

    async def embedding(self, text: str, params: EmbeddingParams | dict[str, Any] | None = None) -> EmbeddingResult:
        return await self._call("embedding", text, params)

    async def get_formatted_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                                 params: CompletionParams | dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._call("get_formatted_chat", messages, template, params)

    async def rerank(self, query: str, documents: list[str],
                     params: RerankParams | dict[str, Any] | None = None) -> list[RerankResult]:
        return await self._call("rerank", query, documents, params)

    async def apply_lora_adapters(self, lora_list: list[LoraAdapter]) -> None:
        await self._call("apply_lora_adapters", lora_list)

    async def remove_lora_adapters(self) -> None:
        await self._call("remove_lora_adapters")

    async def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        return await self._call("get_loaded_lora_adapters")

    async def clear_cache(self, clear_data: bool = False) -> None:
        await self._call("clear_cache", clear_data)

    async def bench(self, pp: int, tg: int, pl: int = 1, nr: int = 1) -> dict[str, Any]:
        return await self._call("bench", pp, tg, pl, nr)

    async def load_session(self, path: str) -> SessionLoadResult:
        return await self._call("load_session", path)

    async def save_session(self, path: str, token_size: int = -1) -> int:
        return await self._call("save_session", path, token_size)

    async def init_multimodal(self, params: dict[str, Any]) -> bool:
        return await self._call("init_multimodal", params)

    async def is_multimodal_enabled(self) -> bool:
        return await self._call("is_multimodal_enabled")

    async def get_multimodal_support(self) -> dict[str, bool]:
        return await self._call("get_multimodal_support")

    async def release_multimodal(self) -> None:
        await self._call("release_multimodal")

    async def release(self) -> None:
        """``LlamaContext.release``: stops a running completion, waits for it, frees the model."""
        await asyncio.get_running_loop().run_in_executor(None, self._ctx.release)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncLlamaContext":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        return repr(self._ctx).replace("<LlamaContext", "<AsyncLlamaContext", 1)
