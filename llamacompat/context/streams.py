"""Completions as iterators: ``CompletionStream`` (``LlamaContext.stream``) and ``AsyncCompletionStream``
(``AsyncLlamaContext.stream``)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, AsyncIterator, Callable, Generator, Iterator

from ..types import CompletionResult, TokenCallback, TokenData

__all__ = ["CompletionStream", "AsyncCompletionStream", "first_event"]

_DONE = object()


def first_event(gen: Generator[TokenData, None, CompletionResult]) -> Any:
    """Run ``gen`` to its first event (or result) so that errors surface immediately."""
    try:
        return next(gen)
    except StopIteration as done:
        return (_DONE, done.value)


class CompletionStream(Iterator[TokenData]):
    """Iterator of TokenData from ``LlamaContext.stream``; ``result`` once exhausted."""

    def __init__(self, gen: Generator[TokenData, None, CompletionResult], first: Any, on_done: Callable[[], None]) -> None:
        self._gen, self._first, self._on_done = gen, first, on_done
        self._lock = threading.Lock()
        self._open = True
        self.result: CompletionResult | None = None

    @property
    def running(self) -> bool:
        return self._lock.locked()

    def __next__(self) -> TokenData:
        with self._lock:
            if not self._open:
                raise StopIteration
            first, self._first = self._first, None
            if isinstance(first, tuple) and first and first[0] is _DONE:
                self.result = first[1]
                self._finish()
                raise StopIteration
            if first is not None:
                return first
            try:
                return next(self._gen)
            except StopIteration as done:
                self.result = done.value
                self._finish()
                raise StopIteration from None
            except BaseException:
                self._finish()
                raise

    def _finish(self) -> None:
        if self._open:
            self._open = False
            self._gen.close()
            self._on_done()

    def close(self) -> None:
        """Stop generating and free the context for the next call."""
        with self._lock:
            self._finish()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self.close()


class AsyncCompletionStream(AsyncIterator[TokenData]):
    """Async iterator of TokenData: ``run(sink)`` (on the context's worker thread) generates into ``sink``;
    ``stop()`` asks it to end."""

    def __init__(self, worker: Any, run: Callable[[TokenCallback], CompletionResult], stop: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = stop
        self.result: CompletionResult | None = None
        put = self._queue.put_nowait
        sink = lambda event: loop.call_soon_threadsafe(put, event)  # noqa: E731
        self._future = loop.run_in_executor(worker, run, sink)
        self._future.add_done_callback(lambda _f: put(_DONE))

    def __aiter__(self) -> "AsyncCompletionStream":
        return self

    async def __anext__(self) -> TokenData:
        item = await self._queue.get()
        if item is _DONE:
            self.result = await self._future  # raises the completion's error, if any
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        """Stop generating and wait until the context is free again."""
        self._stop()
        try:
            self.result = await self._future
        finally:
            while not self._queue.empty():
                self._queue.get_nowait()
