"""Contexts: ``init_llama`` and the context classes, over a core that does the work (see ``core``)."""

from .asynchronous import AsyncLlamaContext
from .core import CALLS, Call, Core
from .live import release_all_llama, set_context_limit
from .loading import get_backend_devices_info, init_llama, init_llama_async, load_llama_model_info, load_local
from .streams import AsyncCompletionStream, CompletionStream
from .sync import LlamaContext

__all__ = ["LlamaContext", "AsyncLlamaContext", "CompletionStream", "AsyncCompletionStream", "init_llama",
           "init_llama_async", "release_all_llama", "load_llama_model_info", "set_context_limit",
           "get_backend_devices_info", "load_local", "Core", "Call", "CALLS"]
