"""``LlamaContext`` (blocking) and ``AsyncLlamaContext`` (awaitable) over one shared core.

The sync class owns argument checks, the busy/released state and streams; the
work goes to its core: ``LocalCore`` for a model in this process, the bridge
client for a model served by ``llamacompat serve``. The async class runs the
same calls on one worker thread per context, so the event loop stays free and
``stop_completion`` works from another task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib
import inspect
import itertools
import logging
import threading
import weakref
from typing import Any, AsyncIterator, Callable, Generator, Iterator, Protocol

from . import params as P
from .adapters.base import Adapter
from .errors import (
    ContextBusyError,
    ContextLimitError,
    ContextReleasedError,
    EmbeddingDisabledError,
    InvalidParamsError,
    ModelLoadError,
)
from .gguf_info import load_model_info
from .local import LocalCore, unsupported
from .models import resolve_model
from .registry import REMOTE, get_adapter, installed_builtin_backends, select_backend
from .types import (
    CompletionResult,
    EmbeddingResult,
    LoraAdapter,
    RerankResult,
    SessionLoadResult,
    TokenCallback,
    TokenData,
    TokenizeResult,
)

__all__ = [
    "LlamaContext",
    "AsyncLlamaContext",
    "CompletionStream",
    "AsyncCompletionStream",
    "init_llama",
    "init_llama_async",
    "release_all_llama",
    "load_llama_model_info",
    "set_context_limit",
    "get_backend_devices_info",
]

logger = logging.getLogger(__name__)

_ids = itertools.count(1)
_live: "weakref.WeakValueDictionary[int, LlamaContext]" = weakref.WeakValueDictionary()


# -- module functions ---------------------------------------------------------
def _progress_reporter(on_progress: Callable[[int], Any] | None):
    """llama.rn reports integer percentages: 0 first, the loader's values, then 100."""
    if on_progress is None:
        return None, lambda: None, lambda: None
    state = {"last": -1, "error": None}

    def emit(percent: int) -> bool:
        if percent == state["last"]:
            return True
        state["last"] = percent
        try:
            return on_progress(percent) is not False
        except BaseException as err:  # re-raised after the native call returns
            state["error"] = err
            return False

    def reraise() -> None:
        if state["error"] is not None:
            raise state["error"]

    return (lambda fraction: emit(min(100, max(0, int(fraction * 100))))), (lambda: emit(0)), reraise


def _raw_params(params: dict[str, Any] | None) -> dict[str, Any]:
    if params is not None and not isinstance(params, dict):
        raise InvalidParamsError(f"init_llama: params must be a dict, got {type(params).__name__}")
    raw = dict(params or {})
    if not isinstance(raw.get("backend", "auto"), str):
        raise InvalidParamsError(f"init_llama: 'backend' must be a string, got {raw['backend']!r}")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParamsError(f"init_llama: 'model' must be a string path, got {type(model).__name__}")
    return raw


def _context_params(raw: dict[str, Any]) -> tuple[type[Adapter], dict[str, Any]]:
    model_path = resolve_model(raw.get("model"))
    adapter_cls = select_backend(raw.get("backend", "auto"), model_path)
    checked = P.validate(raw, P.CONTEXT_FIELDS, "init_llama", extra=adapter_cls.context_fields)
    checked["model"] = model_path
    checked["lora_list"] = P.init_lora(checked)
    if "flash_attn" in raw and "flash_attn_type" not in raw:  # llama.rn's deprecated bool
        checked["flash_attn_type"] = "on" if raw["flash_attn"] else "off"
    if checked["ctx_shift"]:
        unsupported(checked["strict"], "init_llama: ctx_shift=True is not implemented; a full context stops generation")
        checked["ctx_shift"] = False
    return adapter_cls, checked


def load_local(params: dict[str, Any] | None, on_progress: Callable[[int], Any] | None = None) -> LocalCore:
    """Load a model in this process (what ``init_llama`` does for every backend but the bridge)."""
    adapter_cls, checked = _context_params(_raw_params(params))
    native_progress, start, reraise = _progress_reporter(on_progress)
    start()
    try:
        adapter = adapter_cls.load(checked, native_progress)
    except ModelLoadError:
        reraise()
        raise
    reraise()
    try:
        core = LocalCore(adapter, checked)
        if checked["lora_list"]:
            core.apply_lora(checked["lora_list"], "init_llama")
    except BaseException:
        adapter.close()
        raise
    if native_progress is not None:
        native_progress(1.0)
    return core


_limit = {"contexts": -1, "loading": 0}
_limit_lock = threading.Lock()


def set_context_limit(limit: int) -> None:
    """Allow at most ``limit`` live contexts (-1: no limit, the default); ``init_llama`` beyond it raises
    ``ContextLimitError`` ("Context limit reached")."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < -1:
        raise InvalidParamsError(f"set_context_limit: limit must be an int >= -1 (-1 = no limit), got {limit!r}")
    _limit["contexts"] = limit


@contextlib.contextmanager
def _context_slot() -> Iterator[None]:
    """Hold a place under the context limit while a context loads (two loads cannot both take the last one)."""
    with _limit_lock:
        if _limit["contexts"] >= 0 and len(_live) + _limit["loading"] >= _limit["contexts"]:
            raise ContextLimitError(f"Context limit reached: {_limit['contexts']} contexts are allowed "
                                    "(set_context_limit); release one first")
        _limit["loading"] += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit["loading"] -= 1


def get_backend_devices_info() -> list[dict[str, Any]]:
    """llama.rn's getBackendDevicesInfo: the devices of every installed backend
    (``backend``, ``type``, ``deviceName``, ``maxMemorySize``, ``metadata``)."""
    devices: list[dict[str, Any]] = []
    for name in installed_builtin_backends():
        devices += get_adapter(name).backend_devices()
    return devices


def init_llama(params: dict[str, Any] | None = None, on_progress: Callable[[int], Any] | None = None) -> "LlamaContext":
    """Load a model and return a context (llama.rn's ``initLlama``). Blocks while loading.

    ``backend: "bridge"`` connects to a ``llamacompat serve`` process instead of loading, and
    ``backend: "openai"`` to an OpenAI-compatible inference server.
    """
    raw = _raw_params(params)
    remote = REMOTE.get(raw.get("backend", "auto"))
    with _context_slot():
        if remote is not None:
            module_name, _, function = remote.partition(":")
            core = getattr(importlib.import_module(module_name), function)(raw)
        else:
            core = load_local(raw, on_progress)
        return LlamaContext(core)


async def init_llama_async(params: dict[str, Any] | None = None, on_progress: Callable[[int], Any] | None = None) -> "AsyncLlamaContext":
    """Awaitable ``init_llama``; the load runs on the context's own worker thread."""
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacompat")
    loop = asyncio.get_running_loop()
    progress = None
    if on_progress is not None:
        progress = lambda percent: loop.call_soon_threadsafe(on_progress, percent)  # noqa: E731
    try:
        ctx = await loop.run_in_executor(executor, init_llama, params, progress)
    except BaseException:
        executor.shutdown(wait=False)
        raise
    return AsyncLlamaContext(ctx, executor)


def release_all_llama() -> None:
    """Release every live context (llama.rn's ``releaseAllLlama``)."""
    for ctx in list(_live.values()):
        ctx.release()


def load_llama_model_info(path: str) -> dict[str, str]:
    """GGUF metadata as strings without loading the model (llama.rn's ``loadLlamaModelInfo``)."""
    if not isinstance(path, str):
        raise InvalidParamsError(f"load_llama_model_info: path must be a string, got {type(path).__name__}")
    return load_model_info(resolve_model(path))


# -- the sync context ---------------------------------------------------------
class Core(Protocol):
    """What a context delegates to: ``LocalCore`` (a model in this process) or the bridge client."""

    backend: str
    model: dict[str, Any]
    params: dict[str, Any]  # the checked init params
    gpu: bool  # llama.rn's context attributes, of the process that holds the model
    reason_no_gpu: str
    devices: list[str]

    @property
    def capabilities(self) -> dict[str, Any]: ...
    def generation(self, params: dict[str, Any] | None, stop: threading.Event,
                   strict: bool) -> Generator[TokenData, None, CompletionResult]: ...
    def tokenize(self, text: str, params: dict[str, Any] | None) -> TokenizeResult: ...
    def detokenize(self, tokens: list[int]) -> str: ...
    def embedding(self, text: str, normalize: int) -> EmbeddingResult: ...
    def formatted_chat(self, messages: Any, template: str | None, params: dict[str, Any] | None,
                       strict: bool) -> dict[str, Any]: ...
    def bench(self, pp: int, tg: int, pl: int, nr: int) -> dict[str, Any]: ...
    def rerank(self, query: str, documents: list[str], params: dict[str, Any] | None) -> list[RerankResult]: ...
    def apply_lora(self, adapters: Any) -> None: ...
    def remove_lora(self) -> None: ...
    def loaded_lora(self) -> list[dict[str, Any]]: ...
    def clear_cache(self, clear_data: bool) -> None: ...
    def load_session(self, path: str) -> SessionLoadResult: ...
    def save_session(self, path: str, token_size: int) -> int: ...
    def close(self) -> None: ...


class LlamaContext:
    """A loaded model on one backend, with llama.rn's methods."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._params = core.params
        self._strict = core.params["strict"]
        self._busy = threading.Lock()  # held by completion / embedding / bench
        self._use = threading.Lock()  # held briefly by tokenize / detokenize, and by release
        self._stop = threading.Event()
        self._released = False
        self._stream: CompletionStream | None = None
        self.id = next(_ids)
        self.backend = core.backend
        self.gpu: bool = core.gpu
        self.reason_no_gpu: str = core.reason_no_gpu
        self.devices: list[str] = list(core.devices)
        self.model = core.model
        _live[self.id] = self

    # -- state ---------------------------------------------------------------
    @property
    def capabilities(self) -> dict[str, Any]:
        """What this backend does natively, emulates or lacks."""
        return self._core.capabilities

    @property
    def released(self) -> bool:
        return self._released

    def _check_alive(self) -> None:
        if self._released:
            raise ContextReleasedError()

    def _enter(self) -> None:
        """Claim the context for one exclusive call (raises busy/released at once)."""
        self._check_alive()
        if not self._busy.acquire(blocking=False):
            raise ContextBusyError()
        if self._released:
            self._busy.release()
            raise ContextReleasedError()

    def _exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._enter()
        try:
            return fn(*args)
        finally:
            self._busy.release()

    # -- completion ----------------------------------------------------------
    def _generation(self, params: dict[str, Any] | None) -> Generator[TokenData, None, CompletionResult]:
        """Validate, then run; the caller holds ``_busy``."""
        self._stop.clear()
        result = yield from self._core.generation(params, self._stop, self._strict)
        if self._released:
            result["context_released"] = True
        return result

    def _completion_locked(self, params: dict[str, Any] | None, callback: TokenCallback | None) -> CompletionResult:
        try:
            return drain(self._generation(params), callback)
        finally:
            self._busy.release()

    def completion(self, params: dict[str, Any] | None = None, callback: TokenCallback | None = None) -> CompletionResult:
        """Generate from ``prompt`` or ``messages``; ``callback`` gets each TokenData."""
        if callback is not None and not callable(callback):
            raise InvalidParamsError("completion: callback must be callable")
        self._enter()
        return self._completion_locked(params, callback)

    def stream(self, params: dict[str, Any] | None = None) -> "CompletionStream":
        """Iterate TokenData; the final result is ``stream.result`` once exhausted."""
        self._enter()
        try:
            gen = self._generation(params)
            next_event = _prime(gen)  # validation errors surface here, not at the first next()
        except BaseException:
            self._busy.release()
            raise
        stream = CompletionStream(self, gen, next_event)
        self._stream = stream
        return stream

    def stop_completion(self) -> None:
        """Ask the running completion to stop; it returns with ``interrupted: True``."""
        self._check_alive()
        self._stop.set()

    # -- tokens --------------------------------------------------------------
    def tokenize(self, text: str, params: dict[str, Any] | None = None) -> TokenizeResult:
        """Tokens of ``text``, special tokens parsed, no BOS (as llama.rn)."""
        with self._using():
            return self._core.tokenize(text, params)

    def detokenize(self, tokens: list[int]) -> str:
        """Text of ``tokens`` (special tokens rendered)."""
        with self._using():
            return self._core.detokenize(tokens)

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Keep the model alive for a short call that may overlap a completion (tokenize)."""
        with self._use:
            self._check_alive()
            yield

    # -- embedding, chat, bench ----------------------------------------------
    def embedding(self, text: str, params: dict[str, Any] | None = None) -> EmbeddingResult:
        """Sentence embedding of ``text``; needs ``embedding: True`` at init. Clears the KV cache."""
        p = P.validate(params, P.EMBEDDING_FIELDS, "embedding")
        mode = p["embd_normalize"] if params and "embd_normalize" in params else self._params["embd_normalize"]

        def run() -> EmbeddingResult:
            if not self._params["embedding"]:
                raise EmbeddingDisabledError("Embedding is not enabled: create the context with 'embedding': True")
            return self._core.embedding(text, mode)

        return self._exclusive(run)

    def get_formatted_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                           params: dict[str, Any] | None = None) -> dict[str, Any]:
        """llama.rn's getFormattedChat: the prompt, plus the grammar, stops and thinking tags a completion would use."""
        self._check_alive()
        return self._core.formatted_chat(messages, template, params, self._strict)

    def bench(self, pp: int, tg: int, pl: int = 1, nr: int = 1) -> dict[str, Any]:
        """llama.rn's bench: prompt-processing and generation speed (camelCase keys).

        ``stop_completion()`` ends it early: the result then has ``interrupted: True``.
        """
        def run() -> dict[str, Any]:
            self._stop.clear()
            if isinstance(self._core, LocalCore):  # remote cores (bridge, openai) take no stop flag for bench yet
                return self._core.bench(pp, tg, pl, nr, self._stop)
            return self._core.bench(pp, tg, pl, nr)

        return self._exclusive(run)

    def rerank(self, query: str, documents: list[str], params: dict[str, Any] | None = None) -> list[RerankResult]:
        """Score ``documents`` against ``query``: ``[{score, index, document}]``, best first.

        Needs ``embedding: True``; a reranker model (``pooling_type: "rank"``) scores natively, any other
        embedding context ranks by cosine similarity (``capabilities["features"]["rerank"]`` says which).
        """
        return self._exclusive(self._core.rerank, query, documents, params)

    # -- LoRA adapters and the cache -------------------------------------------
    def apply_lora_adapters(self, lora_list: list[LoraAdapter]) -> None:
        """Apply ``[{path, scaled}]`` (scale 1.0 by default), replacing the current adapters.

        The KV cache is emptied (it was computed with other weights). A refused file raises with the
        previous adapters still applied.
        """
        self._exclusive(self._core.apply_lora, lora_list)

    def remove_lora_adapters(self) -> None:
        """Remove every LoRA adapter (the KV cache is emptied if any was applied)."""
        self._exclusive(self._core.remove_lora)

    def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        """The applied adapters as ``[{path, scaled}]``."""
        self._check_alive()
        return self._core.loaded_lora()  # type: ignore[return-value]

    def clear_cache(self, clear_data: bool = False) -> None:
        """Forget the KV cache, so the next completion evaluates its whole prompt (``clear_data`` zeroes it too)."""
        self._exclusive(self._core.clear_cache, clear_data)

    # -- sessions ------------------------------------------------------------
    def load_session(self, path: str) -> SessionLoadResult:
        """Restore a saved KV cache; the next completion reuses it as a cached prefix.

        A wrong, damaged or foreign file raises ``SessionError`` and leaves the context as it was.
        """
        return self._exclusive(self._core.load_session, path)

    def save_session(self, path: str, token_size: int = -1) -> int:
        """Save the cached tokens (the first ``token_size`` if > 0) and KV state; return the token count.

        The file is written atomically (temporary file, fsync, rename): a failure leaves
        any previous file intact. The model identity goes to ``<path>.llamacompat.json``.
        """
        return self._exclusive(self._core.save_session, path, token_size)

    # -- lifetime ------------------------------------------------------------
    def release(self) -> None:
        """Interrupt any running completion, wait for it, free the model. Idempotent."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        while not self._busy.acquire(timeout=0.05):
            stream = self._stream
            if stream is not None and not stream.running:
                stream.close()  # an abandoned stream would hold the context forever
        try:
            with self._use:
                self._core.close()
        finally:
            self._busy.release()
            _live.pop(self.id, None)

    def __enter__(self) -> "LlamaContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return f"<LlamaContext id={self.id} backend={self.backend} model={self._params['model']!r} {state}>"


def drain(gen: Generator[TokenData, None, CompletionResult], callback: TokenCallback | None) -> CompletionResult:
    """Run a generation to its result, handing each event to ``callback``."""
    try:
        if callback is None:
            while True:
                next(gen)
        while True:
            callback(next(gen))
    except StopIteration as done:
        return done.value
    finally:
        gen.close()


_DONE = object()


def _prime(gen: Generator[TokenData, None, CompletionResult]) -> Any:
    """Run ``gen`` to its first event (or result) so that errors surface immediately."""
    try:
        return next(gen)
    except StopIteration as done:
        return (_DONE, done.value)


class CompletionStream(Iterator[TokenData]):
    """Iterator of TokenData from ``LlamaContext.stream``; ``result`` once exhausted."""

    def __init__(self, ctx: LlamaContext, gen: Generator[TokenData, None, CompletionResult], first: Any) -> None:
        self._ctx, self._gen, self._first = ctx, gen, first
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
            self._ctx._stream = None
            self._ctx._busy.release()

    def close(self) -> None:
        """Stop generating and free the context for the next call."""
        with self._lock:
            self._finish()

    def __del__(self) -> None:
        if getattr(self, "_open", False):
            self.close()


# -- the async context --------------------------------------------------------
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
    """Awaitable twin of ``LlamaContext``: blocking work runs on the context's worker thread."""

    def __init__(self, ctx: LlamaContext, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        self._ctx = ctx
        self._executor = executor

    def __getattr__(self, name: str) -> Any:  # id, model, capabilities, backend, gpu, ...
        if name in ("id", "model", "capabilities", "backend", "gpu", "reason_no_gpu", "devices", "released"):
            return getattr(self._ctx, name)
        raise AttributeError(name)

    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an exclusive call on the worker; busy/released raise at once, as in the sync context."""
        self._ctx._check_alive()
        if self._ctx._busy.locked():  # a completion holds the context (claimed before it was queued)
            raise ContextBusyError()
        return await self._await(asyncio.get_running_loop().run_in_executor(self._executor, fn, *args))

    async def _await(self, future: "asyncio.Future[Any]") -> Any:
        try:
            return await future
        except asyncio.CancelledError:
            self._ctx._stop.set()  # a cancelled await must not leave the model generating
            raise

    async def completion(self, params: dict[str, Any] | None = None,
                         callback: Callable[[TokenData], Any] | None = None) -> CompletionResult:
        if callback is not None and not callable(callback):
            raise InvalidParamsError("completion: callback must be callable")
        loop = asyncio.get_running_loop()
        self._ctx._enter()  # busy/released raise here, at once
        try:
            future = loop.run_in_executor(self._executor, self._ctx._completion_locked, params,
                                          _event_sink(loop, callback))
        except BaseException:
            self._ctx._busy.release()
            raise
        return await self._await(future)

    def stream(self, params: dict[str, Any] | None = None) -> "AsyncCompletionStream":
        """``async for event in ctx.stream(params)``; ``stream.result`` once exhausted."""
        self._ctx._enter()
        return AsyncCompletionStream(self, params)

    def stop_completion(self) -> None:
        self._ctx.stop_completion()

    async def tokenize(self, text: str, params: dict[str, Any] | None = None) -> TokenizeResult:
        return self._ctx.tokenize(text, params)  # fast and thread-safe: no hop needed

    async def detokenize(self, tokens: list[int]) -> str:
        return self._ctx.detokenize(tokens)

    async def embedding(self, text: str, params: dict[str, Any] | None = None) -> EmbeddingResult:
        return await self._run(self._ctx.embedding, text, params)

    async def get_formatted_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                                 params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self._ctx.get_formatted_chat(messages, template, params)

    async def rerank(self, query: str, documents: list[str], params: dict[str, Any] | None = None) -> list[RerankResult]:
        return await self._run(self._ctx.rerank, query, documents, params)

    async def apply_lora_adapters(self, lora_list: list[LoraAdapter]) -> None:
        await self._run(self._ctx.apply_lora_adapters, lora_list)

    async def remove_lora_adapters(self) -> None:
        await self._run(self._ctx.remove_lora_adapters)

    async def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        return self._ctx.get_loaded_lora_adapters()

    async def clear_cache(self, clear_data: bool = False) -> None:
        await self._run(self._ctx.clear_cache, clear_data)

    async def bench(self, pp: int, tg: int, pl: int = 1, nr: int = 1) -> dict[str, Any]:
        return await self._run(self._ctx.bench, pp, tg, pl, nr)

    async def load_session(self, path: str) -> SessionLoadResult:
        return await self._run(self._ctx.load_session, path)

    async def save_session(self, path: str, token_size: int = -1) -> int:
        return await self._run(self._ctx.save_session, path, token_size)

    async def release(self) -> None:
        self._ctx._stop.set()
        await asyncio.get_running_loop().run_in_executor(None, self._ctx.release)
        self._executor.shutdown(wait=False)

    async def __aenter__(self) -> "AsyncLlamaContext":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.release()

    def __repr__(self) -> str:
        return repr(self._ctx).replace("<LlamaContext", "<AsyncLlamaContext", 1)


class AsyncCompletionStream(AsyncIterator[TokenData]):
    """Async iterator of TokenData; the completion runs on the context's worker thread."""

    def __init__(self, actx: AsyncLlamaContext, params: dict[str, Any] | None) -> None:
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._actx = actx
        self.result: CompletionResult | None = None
        put = self._queue.put_nowait
        sink = lambda event: loop.call_soon_threadsafe(put, event)  # noqa: E731
        self._future = loop.run_in_executor(actx._executor, actx._ctx._completion_locked, params, sink)
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
        self._actx._ctx._stop.set()
        try:
            self.result = await self._future
        finally:
            while not self._queue.empty():
                self._queue.get_nowait()
