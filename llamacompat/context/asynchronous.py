"""``AsyncLlamaContext``: the awaitable twin of ``LlamaContext``, for asyncio programs.

Every method is a coroutine with the sync method's arguments and result; none blocks the
event loop. Calls that hold the model (completion, embedding, bench, sessions, LoRA, ...)
are claimed at once, so busy and released raise when called, as in the sync context, and
run on the context's own worker thread; the calls that run beside a completion
(``tokenize``, ``detokenize``, ``get_formatted_chat``, ``get_loaded_lora_adapters``: network
round trips on the bridge and openai backends) run on the loop's default executor. A cancelled
await stops the completion it waited for. Callbacks (``on_progress``, a completion's
``callback``) run on the event loop and may be coroutines.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
from typing import Any, Callable

from ..errors import InvalidParamsError
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

__all__ = ["AsyncLlamaContext"]

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


class AsyncLlamaContext:
    """Awaitable twin of ``LlamaContext`` (``init_llama_async`` makes one)."""

    def __init__(self, ctx: LlamaContext, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._ctx = ctx
        self._executor = executor  # one worker: the calls that hold the model

    def __getattr__(self, name: str) -> Any:  # id, model, capabilities, backend, gpu, ...
        if name in _SHOWN:
            return getattr(self._ctx, name)
        raise AttributeError(name)

    async def _call(self, name: str, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        if CALLS[name].runs == "beside":
            return await loop.run_in_executor(None, self._ctx.beside, name, *args)
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
