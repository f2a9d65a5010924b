"""``LlamaContext`` (blocking) and ``AsyncLlamaContext`` (awaitable) over one shared core.

The sync class owns validation, the busy/released state and delegation to the
engine and adapter. The async class runs the same calls on one worker thread
per context, so the event loop stays free and ``stop_completion`` works from
another task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import os
import threading
import warnings
import weakref
from typing import Any, AsyncIterator, Callable, Generator, Iterator

from . import params as P
from .adapters.base import Adapter, SamplingParams
from .chat import ChatOptions, FormattedChat, ReplyParser, TemplateTokens, format_chat
from .chat.formats import CONTENT
from .chat.template import template_caps
from .embeddings import normalize_embedding
from .engine import CompletionRequest, generate
from .errors import (
    ContextBusyError,
    ContextReleasedError,
    EmbeddingDisabledError,
    InvalidParamsError,
    LlamaCompatWarning,
    ModelLoadError,
    SessionError,
    TemplateError,
    UnsupportedFeatureError,
)
from .gguf_info import load_model_info
from .grammars.builtin import checked_grammar
from .grammars.schema import convert_json_schema_to_grammar
from .models import local_path, resolve_model
from .registry import select_backend
from .sessions import atomic_write, check_identity, read_sidecar, write_sidecar
from .types import CompletionResult, EmbeddingResult, SessionLoadResult, TokenCallback, TokenData, TokenizeResult

__all__ = [
    "LlamaContext",
    "AsyncLlamaContext",
    "CompletionStream",
    "AsyncCompletionStream",
    "init_llama",
    "init_llama_async",
    "release_all_llama",
    "load_llama_model_info",
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


def _context_params(params: dict[str, Any] | None) -> tuple[type[Adapter], dict[str, Any]]:
    if params is not None and not isinstance(params, dict):
        raise InvalidParamsError(f"init_llama: params must be a dict, got {type(params).__name__}")
    raw = dict(params or {})
    backend = raw.get("backend", "auto")
    if not isinstance(backend, str):
        raise InvalidParamsError(f"init_llama: 'backend' must be a string, got {backend!r}")
    model = raw.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidParamsError(f"init_llama: 'model' must be a string path, got {type(model).__name__}")
    model_path = resolve_model(model)
    adapter_cls = select_backend(backend, model_path)
    checked = P.validate(raw, P.CONTEXT_FIELDS, "init_llama", extra=adapter_cls.context_fields)
    checked["model"] = model_path
    if "flash_attn" in raw and "flash_attn_type" not in raw:  # llama.rn's deprecated bool
        checked["flash_attn_type"] = "on" if raw["flash_attn"] else "off"
    if checked["ctx_shift"]:
        _unsupported(checked["strict"], "init_llama: ctx_shift=True is not implemented; a full context stops generation")
        checked["ctx_shift"] = False
    return adapter_cls, checked


def _unsupported(strict: bool, message: str) -> None:
    if strict:
        raise UnsupportedFeatureError(message)
    warnings.warn(message, LlamaCompatWarning, stacklevel=4)


def init_llama(params: dict[str, Any] | None = None, on_progress: Callable[[int], Any] | None = None) -> "LlamaContext":
    """Load a model and return a context (llama.rn's ``initLlama``). Blocks while loading."""
    adapter_cls, checked = _context_params(params)
    native_progress, start, reraise = _progress_reporter(on_progress)
    start()
    try:
        adapter = adapter_cls.load(checked, native_progress)
    except ModelLoadError:
        reraise()
        raise
    reraise()
    if native_progress is not None:
        native_progress(1.0)
    return LlamaContext(adapter, checked)


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


def _caps(adapter: Adapter) -> dict[str, bool] | None:
    """llama.rn's ``defaultCaps`` of the model's own template (snake_case), probed as llama.cpp does."""
    if not adapter.chat_template:
        return None
    try:
        caps = template_caps(adapter.chat_template)
    except TemplateError:  # a broken template fails when it is used, with its line
        return None
    return {"tools": caps.tools, "tool_calls": caps.tool_calls, "system_role": caps.system_role}


# -- the sync context ---------------------------------------------------------
class LlamaContext:
    """A loaded model on one backend, with llama.rn's methods."""

    def __init__(self, adapter: Adapter, params: dict[str, Any]) -> None:
        self._adapter = adapter
        self._params = params
        self._strict = params["strict"]
        self._busy = threading.Lock()  # held by completion / embedding / bench
        self._use = threading.Lock()  # held briefly by tokenize / detokenize, and by release
        self._stop = threading.Event()
        self._released = False
        self._stream: CompletionStream | None = None
        self.id = next(_ids)
        self.backend = adapter.name
        self.gpu = False
        self.reason_no_gpu = "GPU backend is not available"
        self.devices: list[str] = []
        info = adapter.model_info()
        has_template = bool(adapter.chat_template)
        self.model = {
            **info,
            "chat_templates": {"llama_chat": has_template, "jinja": {"default": has_template, "default_caps": _caps(adapter),
                                                                     "tool_use": False}},
            "is_chat_template_supported": has_template,
        }
        _live[self.id] = self

    # -- state ---------------------------------------------------------------
    @property
    def capabilities(self) -> dict[str, Any]:
        """What this backend does natively, emulates or lacks."""
        return self._adapter.capabilities.as_dict()

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

    def _require(self, feature: str, what: str) -> None:
        if not self._adapter.capabilities.supports(feature):
            hint = " (it was created with vocab_only=True)" if self._params["vocab_only"] else ""
            raise UnsupportedFeatureError(f"{what} is not available on this {self.backend} context{hint}")

    def _exclusive(self, fn: Callable[..., Any], *args: Any) -> Any:
        self._enter()
        try:
            return fn(*args)
        finally:
            self._busy.release()

    # -- completion ----------------------------------------------------------
    def _chat(self, messages: Any, template: str | None, p: dict[str, Any], has_grammar: bool) -> FormattedChat:
        adapter = self._adapter
        source = template or self._params["chat_template"] or adapter.chat_template or "chatml"
        tokens = TemplateTokens(adapter.bos_text, adapter.eos_text, adapter.add_bos)
        return format_chat(source, messages, tokens, ChatOptions.from_params(p), has_grammar=has_grammar)

    def _resolve_logit_bias(self, value: Any) -> tuple[tuple[int, float], ...]:
        out: list[tuple[int, float]] = []
        for token, bias in P.normalize_logit_bias(value):
            ids = self._adapter.tokenize(token, False) if isinstance(token, str) else [token]
            for tid in ids:
                if not 0 <= tid < self._adapter.n_vocab:
                    raise InvalidParamsError(
                        f"completion: logit_bias token {tid} is outside the vocabulary (0..{self._adapter.n_vocab - 1})"
                    )
                out.append((tid, bias))
        return tuple(out)

    def _request(self, params: dict[str, Any] | None) -> CompletionRequest:
        ignored = None if self._strict else P.COMPLETION_IGNORED
        p = P.validate(params, P.COMPLETION_FIELDS, "completion", not_yet=P.COMPLETION_NOT_YET,
                       ignored=ignored)
        format_schema = P.response_format_schema(p["response_format"])
        if format_schema is None:
            p["response_format"] = None  # plain text: nothing to constrain
        schema = p["json_schema"] if p["json_schema"] is not None else format_schema
        # Checked here, so a bad grammar or schema fails the same way on every backend.
        if p["grammar"] is not None:
            p["grammar"] = checked_grammar(p["grammar"])
        elif schema is not None:
            p["grammar"] = convert_json_schema_to_grammar(schema, strict=self._strict)
        text, stops, chat_format, parse = self._prompt(p)
        self._check_features(p)
        tokens = self._adapter.tokenize(text, True)
        sampling = SamplingParams.from_params(p, self._resolve_logit_bias(p["logit_bias"]))
        return CompletionRequest(tokens, sampling, p["n_predict"], tuple(stops), p["n_probs"], parse, chat_format)

    def _prompt(self, p: dict[str, Any]) -> tuple[str, list[str], int, ReplyParser | None]:
        """Prompt text, stop strings, chat format and reply parser; a chat's tool grammar goes into ``p``."""
        if p["messages"] is None:
            if not p["prompt"]:
                raise InvalidParamsError("Prompt is required: pass a non-empty 'prompt' or 'messages'")
            if p["tools"]:
                raise InvalidParamsError("completion: 'tools' need 'messages' (the chat template describes them)")
            parse = ReplyParser(CONTENT, p["reasoning_format"]) if p["reasoning_format"] != "none" else None
            return p["prompt"], p["stop"], 0, parse
        if p["prompt"] is not None:
            raise InvalidParamsError("completion: pass either 'prompt' or 'messages', not both")
        chat = self._chat(p["messages"], p["chat_template"], p, has_grammar=p["grammar"] is not None)
        if chat.grammar:
            p["grammar"] = chat.grammar
        return chat.prompt, p["stop"] + chat.additional_stops, chat.tool_format.chat_format, chat.parser()

    def _check_features(self, p: dict[str, Any]) -> None:
        caps = self._adapter.capabilities
        for feature, name in P.features_used(p):
            if caps.supports(feature):
                continue
            message = f"completion: '{name}' needs '{feature}', which the {self.backend} backend does not support"
            if feature in P.REFUSED_WHEN_MISSING:
                raise UnsupportedFeatureError(message + " (refused rather than generating unconstrained output)")
            _unsupported(self._strict, message + " (ignored)")

    def _generation(self, params: dict[str, Any] | None) -> Generator[TokenData, None, CompletionResult]:
        """Validate, then run; the caller holds ``_busy``."""
        self._require("completion", "completion")
        request = self._request(params)
        self._stop.clear()
        result = yield from generate(self._adapter, request, self._stop)
        if self._released:
            result["context_released"] = True
        return result

    def _completion_locked(self, params: dict[str, Any] | None, callback: TokenCallback | None) -> CompletionResult:
        try:
            return _drain(self._generation(params), callback)
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
        if not isinstance(text, str):
            raise InvalidParamsError(f"tokenize: text must be a string, got {type(text).__name__}")
        P.validate(params, {}, "tokenize", not_yet={"media_paths": "multimodal input"})
        with self._using():
            tokens = self._adapter.tokenize(text, False)
        return {"tokens": tokens, "has_media": False, "bitmap_hashes": [], "chunk_pos": [], "chunk_pos_media": []}

    def detokenize(self, tokens: list[int]) -> str:
        """Text of ``tokens`` (special tokens rendered)."""
        if not isinstance(tokens, (list, tuple)):
            raise InvalidParamsError(f"detokenize: tokens must be a list of ints, got {type(tokens).__name__}")
        n_vocab = self._adapter.n_vocab
        for i, token in enumerate(tokens):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n_vocab:
                raise InvalidParamsError(f"detokenize: tokens[{i}] = {token!r} is not a token id (0..{n_vocab - 1})")
        with self._using():
            return self._adapter.detokenize(list(tokens))

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Keep the model alive for a short call that may overlap a completion (tokenize)."""
        with self._use:
            self._check_alive()
            yield

    # -- embedding, chat, bench ----------------------------------------------
    def embedding(self, text: str, params: dict[str, Any] | None = None) -> EmbeddingResult:
        """Sentence embedding of ``text``; needs ``embedding: True`` at init. Clears the KV cache."""
        if not isinstance(text, str):
            raise InvalidParamsError(f"embedding: text must be a string, got {type(text).__name__}")
        p = P.validate(params, P.EMBEDDING_FIELDS, "embedding")
        mode = p["embd_normalize"] if params and "embd_normalize" in params else self._params["embd_normalize"]

        def run() -> EmbeddingResult:
            if not self._params["embedding"]:
                raise EmbeddingDisabledError("Embedding is not enabled: create the context with 'embedding': True")
            self._require("embedding", "embedding")
            tokens = self._adapter.tokenize(text, True)
            return {"embedding": normalize_embedding(self._adapter.embedding(tokens), mode)}

        return self._exclusive(run)

    def get_formatted_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                           params: dict[str, Any] | None = None) -> dict[str, Any]:
        """llama.rn's getFormattedChat: the prompt, plus the grammar, stops and thinking tags a completion would use."""
        self._check_alive()
        if template is not None and not isinstance(template, str):
            raise InvalidParamsError(f"get_formatted_chat: template must be a string, got {type(template).__name__}")
        p = P.validate(params, {name: P.COMPLETION_FIELDS[name] for name in P.CHAT_FIELDS}, "get_formatted_chat")
        schema = p["json_schema"] if p["json_schema"] is not None else P.response_format_schema(p["response_format"])
        chat = self._chat(messages, template or p["chat_template"], p, has_grammar=schema is not None)
        if schema is not None and not chat.grammar:
            chat.grammar = convert_json_schema_to_grammar(schema, strict=self._strict)
        return chat.as_result()

    def bench(self, pp: int, tg: int, pl: int = 1, nr: int = 1) -> dict[str, Any]:
        """llama.rn's bench: prompt-processing and generation speed (camelCase keys)."""
        for name, value in (("pp", pp), ("tg", tg), ("pl", pl), ("nr", nr)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidParamsError(f"bench: '{name}' must be an int >= 1, got {value!r}")

        def run() -> dict[str, Any]:
            self._require("bench", "bench")
            return self._adapter.bench(pp, tg, pl, nr)

        return self._exclusive(run)

    # -- sessions ------------------------------------------------------------
    def load_session(self, path: str) -> SessionLoadResult:
        """Restore a saved KV cache; the next completion reuses it as a cached prefix.

        A wrong, damaged or foreign file raises ``SessionError`` and leaves the context as it was.
        """
        path = _session_path(path, "load_session")

        def run() -> SessionLoadResult:
            self._require("session", "load_session")
            if not os.path.isfile(path):
                raise SessionError(f"Failed to load session: no such file: {path}")
            saved = read_sidecar(path)
            if saved is not None:
                check_identity(saved, self._adapter.session_identity(), path)
            tokens = self._adapter.load_session(path)
            return {"tokens_loaded": len(tokens), "prompt": self._adapter.detokenize(tokens)}

        return self._exclusive(run)

    def save_session(self, path: str, token_size: int = -1) -> int:
        """Save the cached tokens (the first ``token_size`` if > 0) and KV state; return the token count.

        The file is written atomically (temporary file, fsync, rename): a failure leaves
        any previous file intact. The model identity goes to ``<path>.llamacompat.json``.
        """
        path = _session_path(path, "save_session")
        if isinstance(token_size, bool) or not isinstance(token_size, int):
            raise InvalidParamsError(f"save_session: token_size must be an int (<= 0 saves all tokens), got {token_size!r}")

        def run() -> int:
            self._require("session", "save_session")
            if os.path.isdir(path):
                raise SessionError(f"Failed to save session: {path} is a folder; pass a file path")
            saved: list[int] = []
            try:
                atomic_write(path, lambda tmp: saved.append(self._adapter.save_session(tmp, token_size)))
            except SessionError:
                raise
            except OSError as err:
                raise SessionError(f"Failed to save session: {path}: {err.strerror or err}") from err
            try:
                write_sidecar(path, self._adapter.session_identity(), saved[0])
            except OSError as err:  # the session itself is saved; it just loads without the identity check
                logger.warning("session %s saved, but its identity sidecar could not be written: %s", path, err)
            return saved[0]

        return self._exclusive(run)

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
                self._adapter.close()
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


def _session_path(path: Any, where: str) -> str:
    if not isinstance(path, str) or not path:
        raise InvalidParamsError(f"{where}: path must be a non-empty string, got {path!r}")
    return local_path(path)  # llama.rn strips file:// on load only; we accept it on both


def _drain(gen: Generator[TokenData, None, CompletionResult], callback: TokenCallback | None) -> CompletionResult:
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
