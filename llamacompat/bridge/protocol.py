"""The bridge's wire format: one UTF-8 JSON object a line, both ways.

A line that starts with ``{`` is a JSON request ``{"id", "method", "params"}``;
any other line is one of the Llambo text commands (``PING``, ``STATUS``,
``LOAD``, ``INFER``, ``INFER_STREAM``, ``FREE``, ``QUIT``, plus ``AUTH`` for TCP).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from ..errors import LlamaError

__all__ = ["MAX_LINE", "METHODS", "TEXT_COMMANDS", "encode", "error_body", "default_socket"]

MAX_LINE = 1 << 20  # bytes in one request line, newline excluded

# JSON methods -> where they run: "queue" (the model's FIFO worker, one at a time),
# "side" (beside it, as tokenize runs beside a completion in a context) or "inline"
# (answered by the event loop at once).
METHODS = {
    "completion": "queue", "embedding": "queue", "bench": "queue", "load_session": "queue",
    "save_session": "queue", "load": "queue", "free": "queue", "rerank": "queue", "clear_cache": "queue",
    "apply_lora_adapters": "queue", "remove_lora_adapters": "queue",
    "tokenize": "side", "detokenize": "side", "get_formatted_chat": "side", "get_loaded_lora_adapters": "side",
    "model_info": "inline", "stop": "inline", "ping": "inline", "status": "inline", "auth": "inline",
}
TEXT_COMMANDS = ("PING", "STATUS", "LOAD", "INFER", "INFER_STREAM", "FREE", "QUIT", "AUTH")


def default_socket() -> str:
    """Where ``serve`` listens and the client connects by default: one socket per user."""
    return os.path.join(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir(), f"llamacompat-{os.getuid()}.sock")


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line. Non-ASCII text stays UTF-8 (half the bytes of \\u escapes for CJK)."""
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def error_body(err: BaseException) -> dict[str, str]:
    """``{"code", "message"}``: a LlamaError's own code, anything else as an internal error."""
    if isinstance(err, LlamaError):
        return {"code": err.code, "message": err.message}
    return {"code": "internal_error", "message": f"internal error in the bridge server: {type(err).__name__}: {err}"}
