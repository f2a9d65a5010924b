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
    init_llama,
    init_llama_async,
    load_llama_model_info,
    release_all_llama,
)
from .errors import (
    AuthenticationError,
    RequestTimeoutError,
    BackendUnavailableError,
    ContextBusyError,
    ContextFullError,
    ContextReleasedError,
    EmbeddingDisabledError,
    GenerationError,
    GrammarError,
    InvalidParamsError,
    LlamaCompatWarning,
    LlamaError,
    ModelLoadError,
    OutOfMemoryError,
    SessionError,
    TemplateError,
    UnsupportedFeatureError,
)
from .grammars.schema import convert_json_schema_to_grammar
from .registry import available_backends

# A library logs; the application decides where logs go (no stderr output by default).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "init_llama",
    "init_llama_async",
    "release_all_llama",
    "load_llama_model_info",
    "convert_json_schema_to_grammar",
    "available_backends",
    "LlamaContext",
    "AsyncLlamaContext",
    "CompletionStream",
    "AsyncCompletionStream",
    "LlamaError",
    "ModelLoadError",
    "ContextBusyError",
    "ContextReleasedError",
    "ContextFullError",
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
    "LlamaCompatWarning",
    "__version__",
]
