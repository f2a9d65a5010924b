"""The bridge's wire format: one UTF-8 JSON object a line, both ways.

A line that starts with ``{`` is a JSON request ``{"id", "method", "params"}``;
any other line is one of the Llambo text commands (``PING``, ``STATUS``,
``LOAD``, ``INFER``, ``INFER_STREAM``, ``FREE``, ``QUIT``, plus ``AUTH`` for TCP).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any

from ..context.core import CALLS
from ..errors import AuthenticationError, InvalidParamsError, LlamaError
from ..types import TokenData

__all__ = ["MAX_LINE", "MAX_DEPTH", "MAX_CLIENTS", "METHODS", "TEXT_COMMANDS", "STATE_FILE_PARAMS", "encode", "decode",
           "error_body", "default_socket", "private_folder", "wire_event", "EventText"]

MAX_LINE = 1 << 20  # bytes in one request line, newline excluded
MAX_DEPTH = 100  # nesting of arrays and objects in one JSON request
MAX_CLIENTS = 256  # connections a server holds at once (fewer under a low open-file limit)

# JSON methods -> where they run: "queue" (the model's FIFO worker, one at a time; in parallel
# mode completion, embedding and rerank go to the slots' pool instead), "side" (beside it, as
# tokenize runs beside a completion in a context) or "inline" (answered by the event loop at once).
# The context's calls are those of context.core.CALLS, with the arguments it names as their params.
METHODS = {
    **{call.name: "queue" if call.runs == "model" else "side" for call in CALLS.values()},
    "load": "queue", "free": "queue",
    "model_info": "inline", "stop": "inline", "ping": "inline", "status": "inline", "auth": "inline",
}
TEXT_COMMANDS = ("PING", "STATUS", "LOAD", "INFER", "INFER_STREAM", "FREE", "QUIT", "AUTH")
# Completion params that name a file (llama.rn's per-sequence state of parallel requests): the client sends
# them absolute, the server opens them under its --sessions-dir only, as it does session files.
STATE_FILE_PARAMS = ("load_state_path", "save_state_path", "save_prompt_state_path")


def default_socket(create: bool = False) -> str:
    """Where ``serve`` listens and the client connects by default: one socket per user, in a folder only it can use.

    ``$XDG_RUNTIME_DIR/llamacompat-<uid>.sock`` (that folder is the user's own), else
    ``<temp>/llamacompat-<uid>/bridge.sock``: a world-writable temp folder would let another user
    create the socket first. ``create`` (the server) makes the private folder.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(private_folder(runtime, create=False), f"llamacompat-{os.getuid()}.sock")
    folder = os.path.join(tempfile.gettempdir(), f"llamacompat-{os.getuid()}")
    return os.path.join(private_folder(folder, create), "bridge.sock")


def private_folder(folder: str, create: bool) -> str:
    """``folder`` if it is ours and closed to others (made mode 0700 with ``create``); else AuthenticationError."""
    if create:
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return folder  # nothing listens there yet: connecting fails with "no bridge server"
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise AuthenticationError(
            f"bridge: {folder} (the default socket's folder) must be a folder owned by you (uid {os.getuid()}) "
            f"with mode 0700; it is owned by uid {info.st_uid} with mode {stat.filemode(info.st_mode)}. Another user "
            "may have created it to intercept the bridge: remove it, or pass an explicit socket path")
    return folder


def wire_event(event: TokenData) -> dict[str, Any]:
    """A TokenData as the server sends it: without the reply so far, which the client rebuilds from the tokens
    (``EventText``), so that a token's line stays short however long the reply grows. ``"plain": true`` says
    that ``content`` was that text too (a plain completion, or a chat without reasoning or tool calls)."""
    out: dict[str, Any] = dict(event)
    text = out.pop("accumulated_text", None)
    if text is not None and out.get("content") == text:
        del out["content"]
        out["plain"] = True
    return out


class EventText:
    """The client's half of ``wire_event``: puts ``accumulated_text`` (and a plain ``content``) back."""

    def __init__(self, prefill: str = "") -> None:
        self.text = prefill  # llama.rn's accumulated_text starts with the request's prefill_text

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        self.text += event.get("token", "")
        if event.pop("plain", False):
            event["content"] = self.text
        if self.text:
            event["accumulated_text"] = self.text
        return event


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line. Non-ASCII text stays UTF-8 (half the bytes of \\u escapes for CJK)."""
    try:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate (a request's "\\ud800" escape): escaped, it comes back as it was sent
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Any:
    """A request line's JSON; InvalidParamsError if it is malformed or nested deeper than ``MAX_DEPTH``."""
    too_deep = InvalidParamsError(f"JSON request nested deeper than {MAX_DEPTH} levels of arrays and objects "
                                  "(llamacompat.bridge.MAX_DEPTH); flatten it")
    try:
        value = json.loads(line)
    except RecursionError:  # the parser's own limit, far deeper than ours
        raise too_deep from None
    except ValueError as err:
        raise InvalidParamsError(f"malformed JSON: {err}") from None
    # Counting brackets is cheap; only a line with many of them is walked.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        raise too_deep
    return value


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in ``value`` (iterative: no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def error_body(err: BaseException) -> dict[str, str]:
    """``{"code", "message"}``: a LlamaError's own code, anything else as an internal error."""
    if isinstance(err, LlamaError):
        return {"code": err.code, "message": err.message}
    if isinstance(err, RecursionError):  # a request's data nested past what some step can walk
        return {"code": InvalidParamsError.code, "message": f"request data nested too deeply to process: {err}"}
    return {"code": "internal_error", "message": f"internal error in the bridge server: {type(err).__name__}: {err}"}
