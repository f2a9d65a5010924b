"""``LlamaContext``: llama.rn's context methods over one core, with the busy/released state they share.

The context does no validation and no work of its own: each call goes to its core
(``context.core``), which checks it. What the context owns is the state every backend
shares: one call at a time holds the model (another gets ``ContextBusyError``), the
``beside`` calls (tokenize) may run during a completion, ``stop_completion`` ends the
running one, and ``release`` frees the model once nothing uses it.
"""

from __future__ import annotations

import threading
from typing import Any, Generator

from ..errors import ContextBusyError, ContextReleasedError, InvalidParamsError, ParallelModeError
from ..parallel.api import Parallel
from ..parallel.pool import ParallelRequest
from ..parallel.slots import Slots
from ..text_stream import drain
from ..types import (
    CompletionParams,
    CompletionResult,
    EmbeddingParams,
    EmbeddingResult,
    LoraAdapter,
    RerankParams,
    RerankResult,
    SessionLoadResult,
    TokenCallback,
    TokenData,
    TokenizeParams,
    TokenizeResult,
)
from . import live
from .core import CALLS, Core
from .streams import CompletionStream, first_event

__all__ = ["LlamaContext"]


class LlamaContext:
    """A loaded model on one backend, with llama.rn's methods."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._strict: bool = core.params["strict"]
        self._busy = threading.Lock()  # held by the call that holds the model
        self._use = threading.Lock()  # held briefly by the calls that run beside it, and by release
        self._stop = threading.Event()
        self._released = False
        self._stream: CompletionStream | None = None
        self.id = live.register(self)
        self.backend = core.backend
        self.gpu: bool = core.gpu
        self.reason_no_gpu: str = core.reason_no_gpu
        self.devices: list[str] = list(core.devices)
        self.system_info: str = core.system_info
        self.android_lib: str | None = core.android_lib
        self.model = core.model
        self._plain: set[ParallelRequest] = set()  # plain calls queued in parallel mode (stop_completion stops them)
        self.parallel = Parallel(self)

    # -- state ---------------------------------------------------------------
    @property
    def capabilities(self) -> dict[str, Any]:
        """What this backend does natively, emulates or lacks."""
        return self._core.capabilities

    def is_llama_chat_supported(self) -> bool:
        """llama.rn's isLlamaChatSupported: the model has a chat template."""
        return bool(self.model["chat_templates"]["llama_chat"])

    def is_jinja_supported(self) -> bool:
        """llama.rn's isJinjaSupported: a Jinja template for chats (the default one, or a tool-use one)."""
        jinja = self.model["chat_templates"]["jinja"]
        return bool(jinja["tool_use"] or jinja["default"])

    @property
    def released(self) -> bool:
        return self._released

    @property
    def busy(self) -> bool:
        """Whether a call holds the model now (a completion, an embedding, ...)."""
        return self._busy.locked()

    def _check_alive(self) -> None:
        if self._released:
            raise ContextReleasedError()

    check_alive = _check_alive

    @property
    def strict(self) -> bool:
        return self._strict

    # -- parallel mode (``self.parallel``; llamacompat.parallel) ---------------------------------------
    @property
    def n_parallel_max(self) -> int:
        """The most slots ``parallel.enable`` may ask for (the ``n_parallel`` init param)."""
        return int(self._core.params.get("n_parallel") or 1)

    def open_slots(self, n_parallel: int, n_batch: int) -> Slots:
        """The core's parallel mode (the caller, ``Parallel.enable``, holds the claim)."""
        return self._core.open_slots(n_parallel, n_batch)

    def _through_slots(self, kind: str, *args: Any, callback: TokenCallback | None = None) -> Any:
        """A plain call while parallel mode is on: queued as a parallel request, waited for."""
        on_token = None if callback is None else (lambda _request_id, event: callback(event))
        parallel = self.parallel
        if kind == "completion":
            request = parallel.completion(args[0], on_token)
        else:
            request = getattr(parallel, kind)(*args)
        self._plain.add(request)
        try:
            return request.promise.result()
        finally:
            self._plain.discard(request)

    # -- the seam for wrappers (AsyncLlamaContext): claim the model here, run the call elsewhere ---------
    def claim(self) -> None:
        """Take the model for one call, or raise ``ContextBusyError`` / ``ContextReleasedError`` at once.

        Pair it with ``run_claimed`` or ``completion_claimed`` (which give the claim back), or ``unclaim``.
        """
        self._check_alive()
        if not self._busy.acquire(blocking=False):
            if self.parallel.enabled:
                raise ContextBusyError("Context is busy: parallel mode holds the model (call ctx.parallel.disable() "
                                       "first)")
            raise ContextBusyError()
        if self._released:
            self._busy.release()
            raise ContextReleasedError()

    def unclaim(self) -> None:
        self._busy.release()

    def run_claimed(self, name: str, *args: Any) -> Any:
        """Run the ``model`` call ``name`` (``core.CALLS``) under a claim from ``claim``, then give it back."""
        try:
            call = CALLS[name]
            if call.stop:
                self._stop.clear()
                args = (*args, self._stop)
            if call.strict:
                args = (*args, self._strict)
            return getattr(self._core, name)(*args)
        finally:
            self._busy.release()

    def completion_claimed(self, params: CompletionParams | dict[str, Any] | None,
                           callback: TokenCallback | None) -> CompletionResult:
        """``completion`` under a claim from ``claim`` (given back when it returns)."""
        try:
            return drain(self._generation(params), callback)
        finally:
            self._busy.release()

    def beside(self, name: str, *args: Any) -> Any:
        """Run the ``beside`` call ``name`` (tokenize, ...): it may overlap a completion, not a release."""
        with self._use:
            self._check_alive()
            if CALLS[name].strict:
                args = (*args, self._strict)
            return getattr(self._core, name)(*args)

    def _call(self, name: str, *args: Any) -> Any:
        if CALLS[name].runs == "beside":
            return self.beside(name, *args)
        if self.parallel.enabled:
            if name in ("embedding", "rerank"):
                return self._through_slots(name, *args)
            if name in ("load_session", "save_session"):
                raise ParallelModeError(f"Session {name.split('_')[0]} is not supported while parallel mode is enabled")
            if name in ("init_multimodal", "release_multimodal"):
                raise ParallelModeError(f"{name}: parallel requests use the projector; call ctx.parallel.disable() "
                                        "before changing it")
        self.claim()
        return self.run_claimed(name, *args)

    # -- completion ----------------------------------------------------------
    def _generation(self, params: CompletionParams | dict[str, Any] | None) -> Generator[TokenData, None, CompletionResult]:
        """The core's completion; the caller holds the claim."""
        self._stop.clear()
        result = yield from self._core.completion(params, self._stop, self._strict)
        if self._released:
            result["context_released"] = True
        return result

    def completion(self, params: CompletionParams | dict[str, Any] | None = None,
                   callback: TokenCallback | None = None) -> CompletionResult:
        """Generate from ``prompt`` or ``messages``; ``callback`` gets each TokenData."""
        if callback is not None and not callable(callback):
            raise InvalidParamsError("completion: callback must be callable")
        if self.parallel.enabled:
            return self._through_slots("completion", params, callback=callback)
        self.claim()
        return self.completion_claimed(params, callback)

    def stream(self, params: CompletionParams | dict[str, Any] | None = None) -> CompletionStream:
        """Iterate TokenData; the final result is ``stream.result`` once exhausted."""
        if self.parallel.enabled:
            raise ParallelModeError("stream() is not available while parallel mode is enabled; use "
                                    "ctx.parallel.completion(params, on_token) or completion(params, callback)")
        self.claim()
        try:
            gen = self._generation(params)
            first = first_event(gen)  # validation errors surface here, not at the first next()
        except BaseException:
            self._busy.release()
            raise
        stream = CompletionStream(gen, first, self._stream_done)
        self._stream = stream
        return stream

    def _stream_done(self) -> None:
        self._stream = None
        self._busy.release()

    def stop_completion(self) -> None:
        """Ask the running completion (or bench) to stop; it returns with ``interrupted: True``."""
        self._check_alive()
        self._stop.set()
        for request in list(self._plain):  # plain completions queued in parallel mode
            request.stop()

    # -- tokens --------------------------------------------------------------
    def tokenize(self, text: str, params: TokenizeParams | dict[str, Any] | None = None) -> TokenizeResult:
        """Tokens of ``text``, special tokens parsed, no BOS (as llama.rn). May run during a completion."""
        return self._call("tokenize", text, params)

    def detokenize(self, tokens: list[int]) -> str:
        """Text of ``tokens`` (special tokens rendered). May run during a completion."""
        return self._call("detokenize", tokens)

    # -- embedding, chat, bench ----------------------------------------------
    def embedding(self, text: str, params: EmbeddingParams | dict[str, Any] | None = None) -> EmbeddingResult:
        """Sentence embedding of ``text``; needs ``embedding: True`` at init. Clears the KV cache."""
        return self._call("embedding", text, params)

    def get_formatted_chat(self, messages: list[dict[str, Any]], template: str | None = None,
                           params: CompletionParams | dict[str, Any] | None = None) -> dict[str, Any]:
        """llama.rn's getFormattedChat: the prompt, plus the grammar, stops and thinking tags a completion would use."""
        return self._call("get_formatted_chat", messages, template, params)

    def bench(self, pp: int, tg: int, pl: int = 1, nr: int = 1) -> dict[str, Any]:
        """llama.rn's bench: prompt-processing and generation speed (camelCase keys).

        ``stop_completion()`` ends it early: the result then has ``interrupted: True``.
        """
        return self._call("bench", pp, tg, pl, nr)

    def rerank(self, query: str, documents: list[str], params: RerankParams | dict[str, Any] | None = None) -> list[RerankResult]:
        """Score ``documents`` against ``query``: ``[{score, index, document}]``, best first.

        Needs ``embedding: True``; a reranker model (``pooling_type: "rank"``) scores natively, any other
        embedding context ranks by cosine similarity (``capabilities["features"]["rerank"]`` says which).
        """
        return self._call("rerank", query, documents, params)

    # -- LoRA adapters and the cache -------------------------------------------
    def apply_lora_adapters(self, lora_list: list[LoraAdapter]) -> None:
        """Apply ``[{path, scaled}]`` (scale 1.0 by default), replacing the current adapters.

        The KV cache is emptied (it was computed with other weights). A refused file raises with the
        previous adapters still applied.
        """
        self._call("apply_lora_adapters", lora_list)

    def remove_lora_adapters(self) -> None:
        """Remove every LoRA adapter (the KV cache is emptied if any was applied)."""
        self._call("remove_lora_adapters")

    def get_loaded_lora_adapters(self) -> list[LoraAdapter]:
        """The applied adapters as ``[{path, scaled}]``."""
        return self._call("get_loaded_lora_adapters")

    def clear_cache(self, clear_data: bool = False) -> None:
        """Forget the KV cache, so the next completion evaluates its whole prompt (``clear_data`` zeroes it too)."""
        self._call("clear_cache", clear_data)

    # -- sessions ------------------------------------------------------------
    def load_session(self, path: str) -> SessionLoadResult:
        """Restore a saved KV cache; the next completion reuses it as a cached prefix.

        A wrong, damaged or foreign file raises ``SessionError`` and leaves the context as it was.
        """
        return self._call("load_session", path)

    def save_session(self, path: str, token_size: int = -1) -> int:
        """Save the cached tokens (the first ``token_size`` if > 0) and KV state; return the token count.

        The file is written atomically (temporary file, fsync, rename): a failure leaves
        any previous file intact. The model identity goes to ``<path>.llamacompat.json``.
        """
        return self._call("save_session", path, token_size)

    # -- multimodal ----------------------------------------------------------
    def init_multimodal(self, params: dict[str, Any]) -> bool:
        """llama.rn's initMultimodal: load a projector ``{path, use_gpu=True, image_min_tokens?, image_max_tokens?}``.

        True once loaded. Unlike llama.rn (which returns false), a failure raises a typed error saying why."""
        return self._call("init_multimodal", params)

    def is_multimodal_enabled(self) -> bool:
        return self._call("is_multimodal_enabled")

    def get_multimodal_support(self) -> dict[str, bool]:
        """``{"vision": bool, "audio": bool}`` of the loaded projector (both False without one)."""
        return self._call("get_multimodal_support")

    def release_multimodal(self) -> None:
        """Unload the projector; cached media are dropped from the KV cache."""
        self._call("release_multimodal")

    # -- lifetime ------------------------------------------------------------
    def release(self) -> None:
        """Interrupt any running completion, wait for it, free the model. Idempotent."""
        if self._released:
            return
        self._released = True
        self._stop.set()
        self.parallel.release()  # every parallel promise settles, with context_released
        while not self._busy.acquire(timeout=0.05):
            stream = self._stream
            if stream is not None and not stream.running:
                stream.close()  # an abandoned stream would hold the context forever
        try:
            with self._use:
                self._core.close()
        finally:
            self._busy.release()
            live.unregister(self.id)

    def __enter__(self) -> "LlamaContext":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "live"
        return f"<LlamaContext id={self.id} backend={self.backend} model={self._core.params['model']!r} {state}>"

