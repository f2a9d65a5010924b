"""One error hierarchy for every backend.

Each class carries a stable ``code`` (for programs and the bridge protocol).
Where llama.rn has a fixed message for the failure ("Context is full", "Prompt is
required", ...), ``str(err)`` is exactly that text, so ported code that compares
messages keeps working; what was wrong and how to fix it is ``err.detail`` (also
``err.message``, what the bridge sends, and a PEP 678 note, so tracebacks and
``repr`` show it). Classes also inherit the builtin exception they resemble, so
``except ValueError`` style code still catches them.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from contextvars import ContextVar
from typing import Callable, Iterator, Mapping

__all__ = [
    "LlamaError",
    "ModelLoadError",
    "ContextBusyError",
    "ContextReleasedError",
    "ContextFullError",
    "ContextLimitError",
    "RequestCancelledError",
    "ParallelModeError",
    "InvalidParamsError",
    "GrammarError",
    "TemplateError",
    "SessionError",
    "MediaError",
    "MultimodalNotEnabledError",
    "EmbeddingDisabledError",
    "UnsupportedFeatureError",
    "BackendUnavailableError",
    "GenerationError",
    "OutOfMemoryError",
    "AuthenticationError",
    "RequestTimeoutError",
    "DownloadError",
    "ChecksumError",
    "LlamaCompatWarning",
    "LLAMA_RN_MESSAGES",
    "llama_rn_text",
    "map_exceptions",
    "unsupported",
    "error_from_code",
    "compat_warning",
    "warnings_to",
]


# llama.rn's fixed error messages (its C++ what() strings and JS errors). A message that starts with one of them,
# alone or followed by ":", " (", ";" or ".", has that text as its str(); the longer ones come first.
LLAMA_RN_MESSAGES = (
    "Context is full", "Context is busy", "Context not found", "Context was released", "Context limit reached",
    "Prompt is required", "Embedding is not enabled", "Embedding is not supported in encoder-decoder models",
    "Failed to load model info", "Failed to load model", "Failed to initialize sampling",
    "Failed to load session", "Failed to save session", "Unknown reasoning format",
    "Grammar trigger word should be marked as preserved token",
    "Multimodal support not enabled. Call initMultimodal first.", "Parallel mode not enabled",
)
_RN_PREFIX = re.compile("(" + "|".join(re.escape(text) for text in LLAMA_RN_MESSAGES) + r")(?=$|:|;|\.| \()")


def llama_rn_text(message: str) -> str:
    """What llama.rn would say for ``message``: its fixed text where ``message`` starts with one, else ``message``."""
    match = _RN_PREFIX.match(message)
    return match.group(1) if match else message


class LlamaError(Exception):
    """Base of every llamacompat error: ``code`` is stable; ``str(err)`` is llama.rn's message where it has a
    fixed one, and ``detail`` (= ``message``) says what was wrong and how to fix it."""

    code = "llama_error"
    default_message = "llama error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or self.default_message
        self.detail = self.message
        if code is not None:
            self.code = code
        super().__init__(self.message)
        self._text = llama_rn_text(self.message)
        if self._text != self.message:  # a PEP 678 note: tracebacks (and pytest's match) show the detail
            self.__notes__ = [self.message]

    def __str__(self) -> str:
        return self._text


class ModelLoadError(LlamaError, RuntimeError):
    """The model file is missing, unreadable or of an unsupported architecture."""

    code = "model_load_error"
    default_message = "Failed to load model"


class ContextBusyError(LlamaError, RuntimeError):
    """Another completion (or session/embedding call) is running on this context."""

    code = "context_busy"
    default_message = "Context is busy"


class ContextReleasedError(LlamaError, RuntimeError):
    """The context was released; create a new one with ``init_llama``."""

    code = "context_released"
    default_message = "Context not found"


class ContextFullError(LlamaError, RuntimeError):
    """The prompt does not fit into ``n_ctx`` (and ``ctx_shift`` is off)."""

    code = "context_full"
    default_message = "Context is full"


class ContextLimitError(LlamaError, RuntimeError):
    """``set_context_limit(n)`` allows n live contexts and n are open: release one first."""

    code = "context_limit"
    default_message = "Context limit reached"


class InvalidParamsError(LlamaError, ValueError):
    """A parameter is unknown, of the wrong type or out of range."""

    code = "invalid_params"
    default_message = "Invalid parameters"


class GrammarError(InvalidParamsError):
    """A GBNF grammar or JSON schema is malformed; nothing was generated."""

    code = "grammar_error"
    default_message = "Failed to initialize sampling"


class TemplateError(InvalidParamsError):
    """The chat template failed to compile or render (the message names the line)."""

    code = "template_error"
    default_message = "Failed to apply the chat template"


class MediaError(InvalidParamsError):
    """A medium (image, audio) could not be used: unreadable, too large, not base64, not decodable, or of a kind
    the loaded projector does not take."""

    code = "media_error"
    default_message = "Failed to load media"


class MultimodalNotEnabledError(LlamaError, RuntimeError):
    """Media were given to a context without a projector: call ``init_multimodal`` first."""

    code = "multimodal_not_enabled"
    default_message = "Multimodal support not enabled. Call initMultimodal first."


class SessionError(LlamaError, OSError):
    """A session file could not be loaded or saved; the context is unchanged."""

    code = "session_error"
    default_message = "Failed to load session"


class EmbeddingDisabledError(LlamaError, RuntimeError):
    """``embedding()`` needs ``embedding: True`` in the init params."""

    code = "embedding_disabled"
    default_message = "Embedding is not enabled"


class UnsupportedFeatureError(LlamaError, NotImplementedError):
    """The backend cannot honour this parameter or method (see ``ctx.capabilities``)."""

    code = "unsupported_feature"
    default_message = "Feature not supported by this backend"


class BackendUnavailableError(LlamaError, ImportError):
    """The backend's package or native library is not installed."""

    code = "backend_unavailable"
    default_message = "Backend not available"


class GenerationError(LlamaError, RuntimeError):
    """The backend failed while evaluating or generating."""

    code = "generation_error"
    default_message = "Generation failed"


class OutOfMemoryError(LlamaError, MemoryError):
    """The backend ran out of memory (model, KV cache or compute buffers)."""

    code = "out_of_memory"
    default_message = "Out of memory"


class AuthenticationError(LlamaError, PermissionError):
    """A server refused the credentials (bridge token, API key)."""

    code = "authentication_error"
    default_message = "Authentication failed"


class RequestTimeoutError(LlamaError, TimeoutError):
    """A server did not answer (or stopped streaming) within the configured timeout."""

    code = "timeout"
    default_message = "The server did not answer in time"


class ParallelModeError(LlamaError, RuntimeError):
    """A call that does not fit the context's parallel mode: a parallel request while it is off, a session
    load or save while it is on (llama.rn's messages)."""

    code = "parallel_mode"
    default_message = "Parallel mode not enabled"


class RequestCancelledError(LlamaError, RuntimeError):
    """A parallel request was cancelled before it ran (``ctx.parallel.disable()``, ``release()``)."""

    code = "request_cancelled"
    default_message = "The request was cancelled before it ran"


class DownloadError(LlamaError, OSError):
    """A model could not be brought into the cache (not found, no network, an interrupted transfer)."""

    code = "download_error"
    default_message = "Failed to download the model"


class ChecksumError(DownloadError):
    """A downloaded file differs from the checksum its source publishes; nothing was added to the cache."""

    code = "checksum_mismatch"
    default_message = "The downloaded file does not match its checksum"


def _classes(root: type[LlamaError]) -> Iterator[type[LlamaError]]:
    yield root
    for sub in root.__subclasses__():
        yield from _classes(sub)


def error_from_code(code: str, message: str) -> LlamaError:
    """The exception a ``{"code", "message"}`` pair stands for (wire protocols); unknown codes stay ``LlamaError``."""
    for cls in _classes(LlamaError):
        if cls.code == code:
            return cls(message)
    return LlamaError(message, code=code)


class LlamaCompatWarning(UserWarning):
    """A parameter was accepted but the backend ignores or emulates it."""


@contextlib.contextmanager
def map_exceptions(mapping: Mapping[type[BaseException], type[LlamaError]], message: str | None = None,
                   reset: Callable[[], None] | None = None) -> Iterator[None]:
    """Translate backend exceptions at an adapter boundary, chaining the original.

    ``LlamaError`` passes through untouched; the first matching entry of
    ``mapping`` wins; anything else propagates unchanged. ``reset`` runs before a
    mapped error is raised: it puts the adapter back in a state the next call can
    use (after a runtime failure, what its cache holds is unknown).
    """
    try:
        yield
    except LlamaError:
        raise
    except Exception as err:  # noqa: BLE001 - re-raised below when unmapped
        for source, target in mapping.items():
            if isinstance(err, source):
                detail = str(err) or type(err).__name__
                if reset is not None:
                    reset()
                raise target(f"{message}: {detail}" if message else detail) from err
        raise


# Where this thread's LlamaCompatWarnings go instead of ``warnings`` (the bridge server
# relays them to the client whose request caused them). A ContextVar, so each
# thread and task has its own.
_warning_sink: ContextVar[Callable[[str], None] | None] = ContextVar("llamacompat_warning_sink", default=None)


def compat_warning(message: str, stacklevel: int = 2) -> None:
    """Warn with ``LlamaCompatWarning``, or hand ``message`` to the sink ``warnings_to`` set here."""
    sink = _warning_sink.get()
    if sink is not None:
        sink(message)
    else:
        warnings.warn(message, LlamaCompatWarning, stacklevel=stacklevel + 1)


def unsupported(strict: bool, message: str, stacklevel: int = 3) -> None:
    """A feature the backend lacks: an ``UnsupportedFeatureError`` when strict, else a LlamaCompatWarning."""
    if strict:
        raise UnsupportedFeatureError(message)
    compat_warning(message, stacklevel=stacklevel)


@contextlib.contextmanager
def warnings_to(sink: Callable[[str], None]) -> Iterator[None]:
    """Send the ``compat_warning`` messages raised in this block (this thread only) to ``sink``."""
    token = _warning_sink.set(sink)
    try:
        yield
    finally:
        _warning_sink.reset(token)
