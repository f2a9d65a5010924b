"""The bridge client: ``init_llama({"backend": "bridge", "socket": PATH})``.

``BridgeCore`` is a context core (see ``llamacompat.context``) whose calls go to
a ``llamacompat serve`` process: the context's own busy/released rules apply
here, validation and generation happen in the server, and the server's errors
and warnings arrive as the same exception and warning classes. One reader
thread routes reply lines to the call waiting for them (by request id), so a
``tokenize`` can run while a completion streams, and several threads' calls can
run at once over the one connection: that is how ``ctx.parallel`` works here
(``open_slots``), the server's slots decoding them (``serve --parallel N``) or
its FIFO queue taking them in turn.

Before it sends anything on a Unix socket, the client checks that the socket and
the process listening on it belong to this user (or root): another user's server
would read every prompt. A call waits only while the server shows it is alive:
after ``timeout`` seconds without a line the client pings it, and after twice
that the call fails with ``RequestTimeoutError``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import queue
import socket
import struct
import threading
import time
from typing import Any, Callable, Generator, Literal, Mapping

from .. import params as P
from ..chat.messages import map_media_parts
from ..context.core import CALLS, Call
from ..errors import (
    AuthenticationError,
    BackendUnavailableError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    RequestTimeoutError,
    SessionError,
    compat_warning,
    error_from_code,
)
from ..media import inline_media
from ..models import local_path, resolve_model
from ..parallel.slots import CoreSlots, Slots
from ..text_stream import drain
from ..types import CompletionResult, EmbeddingResult, RerankResult, SessionLoadResult, TokenData, TokenizeResult
from .protocol import MAX_LINE, STATE_FILE_PARAMS, EventText, default_socket, encode

__all__ = ["BridgeCore", "connect", "BRIDGE_FIELDS"]

logger = logging.getLogger(__name__)

BRIDGE_FIELDS: dict[str, P.Field] = {
    "socket": P.Field((str,), None, nullable=True),
    "host": P.Field((str,), None, nullable=True),
    "port": P.Field((int,), None, lambda v: 0 < v < 65536, "a TCP port (1..65535)", nullable=True),
    "token": P.Field((str,), None, nullable=True),
    "timeout": P.Field((int, float), 10.0, lambda v: v > 0, "> 0 seconds (to connect, to send a line, and of "
                       "silence before a ping)"),
}
# How often a waiting completion looks at its stop flag (stop latency while no token arrives),
# and how often any other waiting call looks whether the server has gone silent.
_STOP_POLL_S = 0.02
_ALIVE_POLL_S = 0.25


def connect(raw: dict[str, Any]) -> "BridgeCore":
    """Validate the init params, connect, authenticate, and read the server's model."""
    params = P.validate_remote(raw, BRIDGE_FIELDS, "bridge")
    sock, address = _open(params)
    core = BridgeCore(sock, address, params)
    try:
        core.handshake(raw.get("model"))
    except BaseException:
        core.close()
        raise
    return core


def _open(params: dict[str, Any]) -> tuple[socket.socket, str]:
    timeout = float(params["timeout"])
    tcp = params["host"] is not None or params["port"] is not None
    if tcp:
        if params["host"] is None or params["port"] is None:
            raise InvalidParamsError("init_llama: a TCP bridge needs both 'host' and 'port'")
        address = f"{params['host']}:{params['port']}"
        params["token"] = params["token"] or os.environ.get("LLAMACOMPAT_BRIDGE_TOKEN")
    else:
        address = local_path(params["socket"] or default_socket())
    try:
        if tcp:
            sock = socket.create_connection((params["host"], params["port"]), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a line per token: no Nagle delay
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
    except OSError as err:
        hint = f"llamacompat serve --host {params['host']} --port {params['port']} --token ..." if tcp \
            else f"llamacompat serve --socket {address}"
        raise BackendUnavailableError(f"no bridge server at {address} ({err.strerror or err}); start one with: {hint}") from err
    try:
        if not tcp:
            _check_server_user(sock, address)
        sock.settimeout(None)  # the reader blocks; sends get their own deadline
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(timeout), int(timeout % 1 * 1e6)))
    except BaseException:
        sock.close()
        raise
    return sock, address


def _check_server_user(sock: socket.socket, path: str) -> None:
    """Refuse a server that another user runs (it would read our prompts), before sending it anything.

    The socket file's owner is checked everywhere, the listening process's (SO_PEERCRED) on Linux.
    """
    trusted = {os.getuid(), 0}
    owners = [("socket file", os.stat(path).st_uid)]
    if hasattr(socket, "SO_PEERCRED"):
        size = struct.calcsize("iII")
        owners.append(("process listening on it", struct.unpack("iII", sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, size))[1]))
    for what, uid in owners:
        if uid not in trusted:
            raise AuthenticationError(
                f"bridge: the {what} at {path} belongs to uid {uid}, not to you (uid {os.getuid()}) or root; "
                "refusing to send it anything, since another user may be posing as the server. Remove the "
                "socket if it is not yours and start `llamacompat serve` yourself, or pass your server's 'socket'")


class BridgeCore:
    """A context core whose model lives in a ``llamacompat serve`` process."""

    backend = "bridge"

    def __init__(self, sock: socket.socket, address: str, params: dict[str, Any]) -> None:
        self._sock = sock
        self.address = address
        self.params = params
        self._send_lock = threading.Lock()
        self._pending: dict[int, queue.SimpleQueue[dict[str, Any] | None]] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._lost: str | None = None
        self._lost_error_body: dict[str, Any] | None = None  # the server's last word, when it closed after an error
        self._timeout = float(params["timeout"])
        self._max_line = MAX_LINE  # the server's, from the handshake
        self._heard = self._pinged = time.monotonic()
        self._ping_lock = threading.Lock()
        self.model: dict[str, Any] = {}
        self.gpu, self.reason_no_gpu = False, ""  # the server's, from the handshake
        self.devices: list[str] = []
        self.system_info, self.android_lib = "", None  # the server's, from the handshake
        self._capabilities: dict[str, Any] = {"backend": self.backend, "features": {}}
        self.server_parallel: dict[str, Any] | None = None  # the server's slots (serve --parallel), from the handshake
        self._reader = threading.Thread(target=self._read_replies, name="llamacompat-bridge-client", daemon=True)
        self._reader.start()

    def handshake(self, wanted_model: str | None) -> None:
        if self.params["token"]:
            self._call("auth", {"token": self.params["token"]})
        info = self._call("model_info", {})
        if wanted_model and os.path.realpath(resolve_model(wanted_model)) != os.path.realpath(info["model_path"]):
            raise ModelLoadError(f"Failed to load model: the bridge server at {self.address} serves "
                                 f"{info['model_path']}, not {wanted_model}")
        self.model = info["model"]
        self.params["model"] = info["model_path"]
        self._max_line = info.get("max_line", MAX_LINE)
        self.gpu, self.reason_no_gpu, self.devices = info["gpu"], info["reason_no_gpu"], info["devices"]
        self.system_info, self.android_lib = info.get("system_info", ""), info.get("android_lib")
        self.server_parallel = info.get("parallel")
        self._capabilities = {"backend": self.backend, "features": info["capabilities"]["features"],
                              "server_backend": info["backend"], "server_parallel": self.server_parallel}

    @property
    def capabilities(self) -> dict[str, Any]:
        return self._capabilities

    # -- the wire ------------------------------------------------------------
    def _read_replies(self) -> None:
        reason = "the bridge server closed the connection"
        last_error = None
        try:
            with self._sock.makefile("rb") as lines:
                for line in lines:
                    self._heard = time.monotonic()
                    msg = json.loads(line)
                    rid = msg.get("id")
                    waiting = self._pending.get(rid) if rid is not None else None
                    last_error = msg["error"] if rid is None and "error" in msg else None
                    if waiting is not None:
                        waiting.put(msg)
                    elif last_error is not None:
                        logger.warning("bridge: error from the server: %s", last_error.get("message"))
        except (OSError, ValueError) as err:
            reason = f"the bridge connection broke: {err}"
        finally:
            if last_error is not None:  # the server's reason for closing (a connection limit, ...)
                self._lost_error_body = last_error
                reason = f"{reason}: {last_error.get('message')}"
            self._lost = reason
            for waiting in list(self._pending.values()):
                waiting.put(None)

    def _open_request(self, method: str, params: dict[str, Any], strict: bool = False
                      ) -> tuple[int, "queue.SimpleQueue[dict[str, Any] | None]"]:
        rid = next(self._ids)
        try:
            data = encode({"id": rid, "method": method, "params": params, "strict": strict})
        except (TypeError, ValueError) as err:
            raise InvalidParamsError(f"{method}: the arguments must be JSON data to cross the bridge: {err}") from None
        if len(data) - 1 > self._max_line:  # the server would skip it
            raise InvalidParamsError(f"{method}: the request is {len(data) - 1} bytes of JSON, over the bridge server's "
                                     f"line limit of {self._max_line} bytes (`llamacompat serve --max-line`); send "
                                     "less at once (split the text), or raise the server's limit")
        replies: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._pending[rid] = replies
        try:
            self._send(data)
        except BaseException:
            self._pending.pop(rid, None)
            raise
        return rid, replies

    def _send(self, data: bytes) -> None:
        if self._lost is not None:
            raise self._lost_error()
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as err:  # a line may be half sent: the connection cannot go on
            if not isinstance(err, (BlockingIOError, TimeoutError)):
                self._reader.join(self._timeout)  # the server closed: its last line may say why
                if self._lost_error_body is not None:
                    raise self._lost_error() from err
            self._shut()
            if isinstance(err, (BlockingIOError, TimeoutError)):
                raise RequestTimeoutError(f"the bridge server at {self.address} took no data for {self._timeout:g} s "
                                          "(the 'timeout' init param); the connection is closed") from err
            raise BackendUnavailableError(f"the bridge server at {self.address} went away: {err}") from err

    def _lost_error(self) -> LlamaError:
        if self._lost_error_body is not None:
            body = self._lost_error_body
            return error_from_code(body.get("code", "llama_error"), f"the bridge server at {self.address} closed the "
                                   f"connection: {body.get('message')}")
        return BackendUnavailableError(f"the bridge server at {self.address} went away: {self._lost}")

    def _check_alive(self, since: float) -> None:
        """A call waits while the server talks: after ``timeout`` s of silence (since the call began) ping it,
        after twice that give up."""
        heard = max(self._heard, since)
        silent = time.monotonic() - heard
        if silent < self._timeout:
            return
        if silent > 2 * self._timeout:
            raise RequestTimeoutError(f"the bridge server at {self.address} has sent nothing for {silent:.0f} s, not "
                                      f"even the answer to a ping (the 'timeout' init param is {self._timeout:g} s)")
        with self._ping_lock:
            if self._pinged <= heard:  # one ping per silence
                self._pinged = time.monotonic()
                self._send(encode({"id": f"alive-{next(self._ids)}", "method": "ping", "params": {}}))

    def _reply(self, msg: dict[str, Any] | None) -> Any:
        """The result of a final reply line; raises its error."""
        if msg is None:
            raise self._lost_error()
        if "error" in msg:
            error = msg["error"]
            raise error_from_code(error.get("code", "llama_error"), error.get("message", "bridge error"))
        return msg["result"]

    def _request(self, method: str, params: dict[str, Any], strict: bool = False, stop: threading.Event | None = None,
                 on_event: Callable[[Any], Any] | None = None) -> Generator[Any, None, Any]:
        """Send one request; yield its events, return its result or raise its error.

        With ``stop``, a set flag sends a ``stop`` request (checked at each event, and every
        ``_STOP_POLL_S`` while none arrives), and a generator closed early stops the server's work.
        """
        rid, replies = self._open_request(method, params, strict)
        began = time.monotonic()
        stop_sent = finished = False
        try:
            while True:
                if stop is not None and stop.is_set() and not stop_sent:
                    stop_sent = True
                    self._send_stop(rid)
                try:
                    msg = replies.get(timeout=_STOP_POLL_S if stop is not None else _ALIVE_POLL_S)
                except queue.Empty:
                    self._check_alive(began)
                    continue
                if msg is not None and "event" in msg:
                    yield msg["event"] if on_event is None else on_event(msg["event"])
                elif msg is not None and "warning" in msg:
                    compat_warning(msg["warning"], stacklevel=4)
                else:
                    finished = True
                    return self._reply(msg)
        finally:
            if stop is not None and not finished and self._lost is None and not stop_sent:  # abandoned stream
                try:
                    self._send_stop(rid)
                except LlamaError:
                    pass
            self._pending.pop(rid, None)

    def _send_stop(self, rid: int) -> None:
        self._send(encode({"id": f"stop-{rid}", "method": "stop", "params": {"id": rid}}))

    def _call(self, method: str, params: dict[str, Any], strict: bool = False) -> Any:
        return drain(self._request(method, params, strict), None)

    # -- the core: each call of CALLS is forwarded (see _forwarder); these translate first ----------------
    def _forward(self, call: Call, args: tuple[Any, ...]) -> Any:
        """Send ``call`` with ``args`` as the context passes them (its arguments, then stop, then strict)."""
        n = len(call.args)
        stop = args[n] if call.stop else None
        strict = args[-1] if call.strict else False
        wire = dict(zip(call.args, args[:n], strict=True))
        if not call.events:
            return drain(self._request(call.name, wire, strict, stop), None)
        params = wire.get("params")
        prefill = params.get("prefill_text") if isinstance(params, Mapping) else None
        return self._request(call.name, wire, strict, stop, EventText(prefill if isinstance(prefill, str) else ""))

    def completion(self, params: Mapping[str, Any] | None, stop: threading.Event,
                   strict: bool) -> Generator[TokenData, None, CompletionResult]:
        """``completion`` on the server's model; safe to call from several threads at once."""
        return self._forward(CALLS["completion"], (_inline_media(_state_paths(params), "completion"), stop, strict))

    def open_slots(self, n_parallel: int, n_batch: int) -> Slots:
        """Parallel mode: ``n_parallel`` requests at once over this connection, each with its own id and stop.

        The server decides how they run: ``native`` where its slots decode together (``serve --parallel N``
        on a backend that batches), ``emulated`` where it takes them in turn. Asking more slots than the
        server has is fine: the extra requests wait in its FIFO queue. ``n_batch`` is the server's own.
        """
        slots = self.server_parallel
        support: Literal["native", "emulated"] = \
            "native" if slots is not None and slots.get("support") == "native" else "emulated"
        return CoreSlots(self, n_parallel, n_parallel, support)

    def embedding(self, text: str, params: Mapping[str, Any] | None) -> EmbeddingResult:
        P.require_embedding(self.params, "embedding")  # this context's own init params decide, as they would locally
        if params is None or (isinstance(params, dict) and "embd_normalize" not in params):
            params = {**(params or {}), "embd_normalize": self.params["embd_normalize"]}
        return self._forward(CALLS["embedding"], (text, params))

    def rerank(self, query: str, documents: list[str], params: Mapping[str, Any] | None) -> list[RerankResult]:
        P.require_embedding(self.params, "rerank")
        return self._forward(CALLS["rerank"], (query, documents, params))

    def tokenize(self, text: str, params: Mapping[str, Any] | None) -> TokenizeResult:
        return self._forward(CALLS["tokenize"], (text, _inline_media(params, "tokenize")))

    def init_multimodal(self, params: Mapping[str, Any] | None) -> bool:
        if isinstance(params, Mapping) and isinstance(params.get("path"), str) and params["path"]:
            params = {**params, "path": os.path.abspath(local_path(params["path"]))}  # the server's folder is not ours
        return bool(self._forward(CALLS["init_multimodal"], (params,)))

    def apply_lora_adapters(self, lora_list: Any) -> None:
        entries = P.lora_entries(lora_list, "apply_lora_adapters")
        self._forward(CALLS["apply_lora_adapters"], ([{**e, "path": os.path.abspath(e["path"])} for e in entries],))

    def load_session(self, path: str) -> SessionLoadResult:
        return self._forward(CALLS["load_session"], (_server_path(path, "load"),))

    def save_session(self, path: str, token_size: int) -> int:
        return self._forward(CALLS["save_session"], (_server_path(path, "save"), token_size))

    def _shut(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end and fails every waiting call
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._shut()
        self._sock.close()
        self._reader.join(5)


def _state_paths(params: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    """A completion's per-sequence state files travel absolute, as session paths do (``_server_path``)."""
    if not isinstance(params, Mapping) or not any(isinstance(params.get(k), str) for k in STATE_FILE_PARAMS):
        return params
    return {**params, **{key: os.path.abspath(local_path(value)) for key in STATE_FILE_PARAMS
                         if isinstance(value := params.get(key), str) and value}}


def _inline_media(params: Mapping[str, Any] | None, where: str) -> Mapping[str, Any] | None:
    """Media named by path (``media_paths``, chat ``image_url`` / ``input_audio`` urls) travel as their bytes
    (``data:`` URLs): the server reads no file a client names. Malformed shapes go as they are: the server
    names what is wrong with them."""
    if not isinstance(params, Mapping):
        return params
    out = dict(params)
    refs = params.get("media_paths")
    if isinstance(refs, str) or (isinstance(refs, list) and all(isinstance(r, str) and r for r in refs)):
        out["media_paths"] = [inline_media(r, f"{where}: media {i}")
                              for i, r in enumerate([refs] if isinstance(refs, str) else refs)]
    if isinstance(params.get("messages"), list):
        out["messages"] = map_media_parts(params["messages"], lambda part, at: _inline_part(part, f"{where}: {at}"))
    return out


def _inline_part(part: dict[str, Any], where: str) -> dict[str, Any]:
    kind = part["type"]
    body = part.get(kind)
    if isinstance(body, dict) and isinstance(body.get("url"), str) and body["url"]:
        return {**part, kind: {**body, "url": inline_media(body["url"], where)}}
    if kind == "image_url" and isinstance(body, str) and body:
        return {**part, kind: inline_media(body, where)}
    return part


def _server_path(path: Any, action: str) -> Any:
    """Paths travel absolute (the server's working folder is not ours) and as UTF-8 JSON text."""
    if not isinstance(path, str) or not path:
        return path  # the server names what is wrong with it
    try:
        path.encode()
    except UnicodeEncodeError:
        raise SessionError(f"Failed to {action} session: {path!r} is not valid UTF-8, "
                           "which the bridge protocol cannot carry") from None
    return os.path.abspath(local_path(path))


def _forwarder(call: Call) -> Callable[..., Any]:
    def forward(self: BridgeCore, *args: Any) -> Any:
        return self._forward(call, args)

    forward.__name__ = forward.__qualname__ = call.name
    forward.__doc__ = f"``{call.name}`` on the bridge server's model."
    return forward


for _call in CALLS.values():  # the calls without a translation of their own
    if _call.name not in vars(BridgeCore):
        setattr(BridgeCore, _call.name, _forwarder(_call))
