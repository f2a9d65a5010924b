"""llamacompat: llama.rn's API for Python, over llama.cpp, MLX, Rockchip RKLLM and a socket bridge.

    from llamacompat import init_llama

    with init_llama({"model": "smollm2", "n_ctx": 2048}) as ctx:
        result = ctx.completion({"messages": [{"role": "user", "content": "Hi!"}], "n_predict": 32})
        print(result["text"])
"""

import logging

from .context import (
    AsyncCompletionStream,
    AsyncLlamaContext,
    CompletionStream,
    LlamaContext,
    get_backend_devices_info,
    init_llama,
    init_llama_async,
    load_llama_model_info,
    release_all_llama,
    set_context_limit,
)
from .errors import (
    AuthenticationError,
    BackendUnavailableError,
    ChecksumError,
    ContextBusyError,
    ContextFullError,
    ContextLimitError,
    ContextReleasedError,
    DownloadError,
    EmbeddingDisabledError,
    GenerationError,
    GrammarError,
    InvalidParamsError,
    LlamaCompatWarning,
    LlamaError,
    MediaError,
    ModelLoadError,
    MultimodalNotEnabledError,
    OutOfMemoryError,
    ParallelModeError,
    RequestCancelledError,
    RequestTimeoutError,
    SessionError,
    TemplateError,
    UnsupportedFeatureError,
)
from .grammars.schema import convert_json_schema_to_grammar
from .media import MEDIA_MARKER
from .native_log import add_native_log_listener, toggle_native_log
from .registry import available_backends

# A library logs; the application decides where logs go (no stderr output by default).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# llama.rn's default media marker: where each of media_paths goes in a raw prompt (chats place it themselves)
RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER = MEDIA_MARKER


def __getattr__(name: str):
    if name == "BuildInfo":  # computed on use: reading package versions costs a few ms at import
        from .buildinfo import build_info

        return build_info()
    raise AttributeError(f"module 'llamacompat' has no attribute {name!r}")

__all__ = [
    "init_llama",
    "init_llama_async",
    "release_all_llama",
    "load_llama_model_info",
    "set_context_limit",
    "toggle_native_log",
    "add_native_log_listener",
    "get_backend_devices_info",
    "BuildInfo",
    "RNLLAMA_MTMD_DEFAULT_MEDIA_MARKER",
    "convert_json_schema_to_grammar",
    "available_backends",
    "LlamaContext",
    "AsyncLlamaContext",
    "CompletionStream",
    "AsyncCompletionStream",
    "LlamaError",
    "MediaError",
    "MultimodalNotEnabledError",
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
    "__version__",
]
