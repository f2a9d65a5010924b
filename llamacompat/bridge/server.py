"""``llamacompat serve``: one loaded model, many clients, one FIFO queue.

The event loop only reads lines and writes replies. Work that holds the model
(completion, embedding, bench, sessions, LOAD, FREE) runs one job at a time on a
single worker thread, in the order the requests arrived; tokenize, detokenize
and chat formatting run beside it, as they do in a context. Each job has its
own stop flag, so a client stops only its own requests, and a client whose
connection breaks has its jobs stopped.

With ``parallel`` (``serve --parallel N``) the model runs in parallel mode
instead (``bridge.parallel``): completions, embeddings and reranks (and INFER,
INFER_STREAM) are requests of one ``parallel.Pool``, up to N decoding at once
and the rest waiting in FIFO order; calls that need the whole model are refused
while it is on, and LOAD and FREE replace the pool with the model.

Nothing a request does can hold the process: connections are capped (and those
still to authenticate have a deadline and a cap of their own), and a shutdown
that finds a job still running after a short grace leaves ``run_server`` to exit
hard, since a thread stuck in native code cannot be interrupted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import difflib
import functools
import hmac
import itertools
import json
import logging
import os
import re
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, cast

from .. import params as P
from ..context.core import CALLS, Call
from ..context.loading import load_local
from ..errors import (
    AuthenticationError,
    ContextBusyError,
    ContextLimitError,
    ContextReleasedError,
    InvalidParamsError,
    LlamaError,
    ModelLoadError,
    SessionError,
    UnsupportedFeatureError,
    warnings_to,
)
from ..local import LocalCore, file_name, session_path
from ..parallel.pool import ParallelRequest, Pool
from ..parallel.slots import RequestKind
from ..text_stream import drain
from ..types import TokenData
from . import parallel as par
from .protocol import (
    MAX_CLIENTS,
    MAX_LINE,
    METHODS,
    STATE_FILE_PARAMS,
    TEXT_COMMANDS,
    decode,
    default_socket,
    encode,
    error_body,
    wire_event,
)

__all__ = ["BridgeServer", "bind_unix_socket", "run_server", "MAX_UNAUTHENTICATED", "AUTH_TIMEOUT_S", "SHUTDOWN_GRACE_S"]

logger = logging.getLogger(__name__)

# Replies a client has not read yet; past this it is treated as gone (its jobs stop).
MAX_BACKLOG = 64 << 20
# Connections at once are MAX_CLIENTS (fewer when the open-file limit is low: see _client_cap); of
# them, this many may be waiting to authenticate: a newcomer past that closes the oldest such one.
MAX_UNAUTHENTICATED = 16
AUTH_TIMEOUT_S = 5.0  # to send AUTH on a server with a token
_EVICTABLE_AFTER_S = 0.5  # a connection this old that has not authenticated may be closed for a newcomer
_PRE_AUTH_LINE = 4096  # bytes in a line before AUTH
_FD_RESERVE = 32  # open files kept for the model, logs and the listening sockets
# After SIGTERM: how long running jobs may take to stop before the process exits without them.
SHUTDOWN_GRACE_S = 3.0
_NO_MODEL = "Failed to load model: the bridge server has no model loaded; send LOAD <path>"
# The id of an over-long request, read from its first bytes so that the error reaches its caller.
_LEADING_ID = re.compile(rb'\s*\{\s*"id"\s*:\s*(-?\d{1,19}|"(?:[^"\\\n]|\\.){0,256}")\s*[,}]')


class _Oversize:
    """A line longer than the limit was skipped; ``json_like`` tells which reply format to use, ``rid`` its id if read."""

    def __init__(self, head: bytes) -> None:
        self.json_like = head.lstrip().startswith(b"{")
        match = _LEADING_ID.match(head)
        try:
            self.rid = json.loads(match.group(1)) if match else None
        except ValueError:
            self.rid = None


class _LineReader:
    """Lines of at most ``limit`` bytes; a longer one is skipped whole and reported once."""

    def __init__(self, reader: asyncio.StreamReader, limit: int) -> None:
        self._reader, self.limit = reader, limit
        self._buf = bytearray()
        self._scanned = 0
        self._skipping: _Oversize | None = None

    async def next(self) -> bytes | _Oversize | None:
        while True:
            newline = self._buf.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[: newline + 1]
                self._scanned = 0
                skipped, self._skipping = self._skipping, None
                if skipped is not None:
                    return skipped
                return _Oversize(line[:512]) if len(line) > self.limit else line
            if self._skipping is None and len(self._buf) > self.limit:
                self._skipping = _Oversize(bytes(self._buf[:512]))
            if self._skipping is not None:
                self._buf.clear()
            self._scanned = len(self._buf)
            chunk = await self._reader.read(1 << 16)
            if not chunk:
                rest, self._buf = bytes(self._buf), bytearray()
                if self._skipping is not None:
                    skipped, self._skipping = self._skipping, None
                    return skipped
                return rest or None
            self._buf += chunk


@dataclass(eq=False)
class _Job:
    client: "_Client"
    rid: Any
    method: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    request: ParallelRequest | None = None  # in parallel mode: the pool's request that runs this job

    def halt(self) -> None:
        """Stop this job: its flag, and its pool request (a queued one is cancelled at once)."""
        self.stop.set()
        if self.request is not None:
            self.request.stop()


class _StreamLines:
    """INFER_STREAM's lines: ``Streaming started`` at the first token (a request that fails sends none), a line
    per token; ``start`` sends the first line at the end of a request that generated no token."""

    def __init__(self, post: Callable[[bytes], None]) -> None:
        self.post = post
        self.started = False

    def start(self, send: Callable[[bytes], None]) -> None:
        if not self.started:
            self.started = True
            send(encode({"status": "ok", "message": "Streaming started"}))

    def token(self, event: TokenData) -> None:
        self.start(self.post)
        self.post(encode({"type": "token", "token": event["token"], "final": False}))


class _Client:
    """One connection: where its replies go, its jobs by request id, whether it authenticated."""

    def __init__(self, writer: asyncio.StreamWriter, authed: bool, on_abandoned: Callable[[int], None]) -> None:
        self.writer = writer
        self.authed = authed
        self._on_abandoned = on_abandoned
        self.jobs: dict[Any, _Job] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.since = time.monotonic()

    def send(self, data: bytes) -> None:
        """Write one reply line (event-loop thread). A broken or hopelessly slow peer stops its jobs."""
        if self.closed:
            return
        if self.writer.is_closing():
            self.close()
            return
        self.writer.write(data)
        if self.writer.transport.get_write_buffer_size() > MAX_BACKLOG:
            logger.warning("bridge: a client left %d bytes of replies unread; disconnecting it", MAX_BACKLOG)
            self.close()

    def reply(self, rid: Any, **body: Any) -> None:
        self.send(encode({"id": rid, **body}))

    def status(self, status: str, message: str, data: Any = None) -> None:
        """A Llambo text-protocol reply."""
        body: dict[str, Any] = {"status": status, "message": message}
        if data is not None:
            body["data"] = data
        self.send(encode(body))

    def refuse(self, err: LlamaError) -> None:
        """End the connection with one error line that either protocol's client can read."""
        self.send(encode({"id": None, "status": "error", "message": err.message, "error": error_body(err)}))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for job in list(self.jobs.values()):
                job.halt()
            if self.jobs:
                self._on_abandoned(len(self.jobs))
            self.writer.close()


class BridgeServer:
    """Serves one model (loaded from ``model_params``) to every client of its sockets.

    ``parallel``: run the model in parallel mode with that many slots (``serve --parallel N``; see
    ``bridge.parallel``); None keeps the single FIFO worker.
    """

    def __init__(self, model_params: dict[str, Any], *, models_dir: str | None = None,
                 sessions_dir: str | None = None, token: str | None = None, n_predict: int = 512,
                 max_line: int = MAX_LINE, max_clients: int = MAX_CLIENTS, auth_timeout: float = AUTH_TIMEOUT_S,
                 parallel: int | None = None) -> None:
        self._params = dict(model_params)
        self._parallel = _slot_count(parallel, self._params)
        self._n_batch = int(self._params.get("n_batch") or par.DEFAULT_BATCH)
        self._pool: Pool | None = None  # parallel mode's requests, on the loaded model
        self._request_ids = itertools.count(1).__next__  # the pools' request ids, unique for the server's life
        self._models_dir = os.path.realpath(models_dir) if models_dir else None
        self._sessions_dir = os.path.realpath(sessions_dir) if sessions_dir else None
        self._token = token.encode() if token else None
        self._n_predict = n_predict
        self._max_line = max_line
        self._max_clients = _client_cap(max_clients)
        self._auth_timeout = auth_timeout
        self.core: LocalCore | None = None
        self._use = threading.Lock()  # side calls vs. a model swap or free
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llamacompat-bridge")
        self._side = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="llamacompat-bridge-side")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._servers: list[asyncio.AbstractServer] = []
        self._socket_path: str | None = None
        self._socket_inode = 0
        self._clients: set[_Client] = set()
        self._unauthed: dict[_Client, None] = {}  # oldest first
        self._tasks: set[asyncio.Task[Any]] = set()  # every request being answered, whatever its client does
        self._submitted = 0  # counted by the event loop ...
        self._started_jobs = 0  # ... and by the worker: each counter has one writer
        self._served = 0
        self._abandoned = 0  # requests stopped because their client went away
        self._running = False
        self._started = time.monotonic()
        self._closing = False
        self._done: asyncio.Event | None = None
        self.clean = True  # False: a shutdown left a job running (run_server then exits hard)

    # -- lifetime ------------------------------------------------------------
    def load(self) -> None:
        """Load the model named by the init params (before serving, so a bad model fails the start)."""
        core = self._load_core(self._params)
        try:
            self._pool = self._open_pool(core)
        except BaseException:
            core.close()
            raise
        self.core = core

    @staticmethod
    def _load_core(params: dict[str, Any]) -> LocalCore:
        core = load_local(params)
        core.media_files = False  # clients send media as bytes (data: URLs), never names of the server's files
        return core

    def _open_pool(self, core: LocalCore) -> Pool | None:
        if self._parallel is None:
            return None
        return par.open_pool(core, self._parallel, self._n_batch, self._request_ids)

    async def start_unix(self, path: str) -> None:
        sock = bind_unix_socket(path)
        self._socket_path, self._socket_inode = path, os.stat(path).st_ino
        self._servers.append(await asyncio.start_unix_server(self._handle, sock=sock))
        logger.info("bridge: serving %s on unix socket %s", self._params.get("model"), path)

    async def start_tcp(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (the port actually bound is returned); TCP needs a token."""
        if self._token is None:
            raise InvalidParamsError("serve: TCP needs a token (--token or LLAMACOMPAT_BRIDGE_TOKEN)")
        server = await asyncio.start_server(self._handle, host, port)
        self._servers.append(server)
        bound = server.sockets[0].getsockname()[1]
        logger.info("bridge: serving on tcp %s:%d", host, bound)
        return bound

    async def serve(self, ready: Callable[[], None] | None = None) -> None:
        """Serve until ``shutdown`` (SIGTERM and SIGINT call it); then clean up."""
        self._loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._loop.set_exception_handler(_loop_error)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.shutdown()))
            except (RuntimeError, ValueError):  # not the main thread: the embedding program stops us
                pass
        if ready is not None:
            ready()
        await self._done.wait()

    async def shutdown(self, grace: float = SHUTDOWN_GRACE_S) -> bool:
        """Stop accepting, stop what runs, answer every request, remove the socket file, free the model.

        Jobs get ``grace`` seconds to stop. One that has not (native code, or a loop that never looks
        at its stop flag) cannot be interrupted: its request and those queued behind it are answered
        ``context_released``, the model stays loaded, and False is returned (``run_server`` exits hard).
        """
        if self._closing:
            return self.clean
        self._closing = True
        for server in self._servers:
            server.close()
        for client in list(self._clients):
            for job in list(client.jobs.values()):
                job.halt()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        self.clean = not self._tasks
        gone = ContextReleasedError("Context not found: the bridge server is shutting down")
        for client in list(self._clients):
            for rid in list(client.jobs):
                if isinstance(rid, tuple):  # a text command
                    client.status("error", gone.message)
                else:
                    client.reply(rid, error=error_body(gone))
            client.close()
        if self._socket_path and _inode(self._socket_path) == self._socket_inode:  # ours, not a successor's
            os.unlink(self._socket_path)
        if self.clean:
            try:
                await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._worker, self._free), grace)
            except asyncio.TimeoutError:
                self.clean = False
        self._worker.shutdown(wait=False)
        self._side.shutdown(wait=False)
        if self._done is not None:
            self._done.set()
        return self.clean

    def close(self) -> None:
        """Free the model (and its pool) of a server that did not get to serve."""
        self._free()

    # -- connections ---------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._loop = asyncio.get_running_loop()  # the worker posts replies to it
        client = _Client(writer, self._token is None, self._count_abandoned)
        if not self._admit(client):
            return
        lines = _LineReader(reader, self._max_line)
        deadline = None if client.authed else self._loop.call_later(self._auth_timeout, self._auth_expired, client)
        try:
            while not client.closed:
                lines.limit = self._max_line if client.authed else _PRE_AUTH_LINE
                line = await lines.next()
                if line is None:
                    break
                if isinstance(line, _Oversize):
                    message = f"request line longer than {lines.limit} bytes (the bridge's line limit); it was skipped"
                    if line.json_like:
                        client.reply(line.rid, error={"code": InvalidParamsError.code, "message": message})
                    else:
                        client.status("error", message)
                elif line.strip() or not client.authed:
                    if line.lstrip().startswith(b"{"):
                        self._json_request(client, line)
                    elif not await self._track(client, self._text_command(client, line)):
                        break
                if not client.authed:  # anything but a right AUTH ends a connection that has not authenticated
                    client.close()
            # At end of input, answer what is in flight: `echo "INFER hi" | nc -U` half-closes and reads on.
            if client.tasks:
                await asyncio.wait(list(client.tasks))
        except ConnectionError:
            pass
        finally:
            if deadline is not None:
                deadline.cancel()
            client.close()
            self._clients.discard(client)
            self._unauthed.pop(client, None)

    def _admit(self, client: _Client) -> bool:
        """Count a new connection in. Past a cap, the oldest connection still to authenticate makes room
        if it has had its chance (a burst of newcomers cannot push out one whose AUTH is on its way);
        otherwise this one is refused."""
        waiting = len(self._unauthed) >= MAX_UNAUTHENTICATED and not client.authed
        if waiting or len(self._clients) >= self._max_clients:
            oldest = next(iter(self._unauthed), None)
            if oldest is None or time.monotonic() - oldest.since < _EVICTABLE_AFTER_S:
                client.refuse(ContextLimitError(
                    f"Context limit reached: the bridge server holds {len(self._clients)} connections, "
                    f"{len(self._unauthed)} of them waiting to authenticate; its limit is {self._max_clients} "
                    f"({MAX_UNAUTHENTICATED} waiting). Retry shortly"))
                return False
            oldest.refuse(AuthenticationError("closed: no AUTH yet, and a newer connection needed the place; "
                                              "send AUTH as soon as you connect"))
            self._clients.discard(oldest)
            self._unauthed.pop(oldest, None)
        self._clients.add(client)
        if not client.authed:
            self._unauthed[client] = None
        return True

    def _auth_expired(self, client: _Client) -> None:
        if not client.authed and not client.closed:
            client.refuse(AuthenticationError(f"no AUTH within {self._auth_timeout:g} s; connection closed"))

    def _authenticated(self, client: _Client) -> None:
        client.authed = True
        self._unauthed.pop(client, None)

    def _track(self, client: _Client, work: Any) -> "asyncio.Task[Any]":
        """Run ``work`` as a task of ``client`` (shutdown waits for these), counted as served."""
        task = asyncio.ensure_future(work)
        client.tasks.add(task)
        self._tasks.add(task)

        def finished(done: "asyncio.Task[Any]") -> None:
            client.tasks.discard(done)
            self._tasks.discard(done)
            self._served += 1

        task.add_done_callback(finished)
        return task

    def _count_abandoned(self, n: int) -> None:
        if not self._closing:
            self._abandoned += n

    # -- the JSON protocol ---------------------------------------------------
    def _json_request(self, client: _Client, line: bytes) -> None:
        try:
            msg = decode(line)
        except LlamaError as err:
            client.reply(None, error=error_body(err))
            return
        rid = msg.get("id") if isinstance(msg, dict) else None
        try:
            method, params, strict = self._check_request(client, msg)
        except LlamaError as err:
            client.reply(rid, error=error_body(err))
            if isinstance(err, AuthenticationError):  # no second guess on this connection
                client.close()
            return
        if rid in client.jobs:  # answered with id null: the running request's caller must not take it for its own
            client.reply(None, error=error_body(InvalidParamsError(
                f"request id {_brief(rid)} is already in flight on this connection; this request was not run. "
                "Give each request in flight its own id")))
            return
        if method == "auth":
            self._authenticated(client)
            client.reply(rid, result={"authenticated": True})
            return
        if self._closing and METHODS[method] != "inline":  # the shutdown waits only for what it found running
            client.reply(rid, error=error_body(ContextReleasedError("Context not found: the bridge server is shutting down")))
            return
        refused = par.refusal(method, self._parallel) if self._parallel is not None else None
        if refused is not None:
            client.reply(rid, error=error_body(refused))
            return
        job = _Job(client, rid, method)
        client.jobs[rid] = job
        # Queued jobs are submitted here, before any await, so the FIFO order is the arrival order.
        run = functools.partial(self._context_call, call=CALLS[method]) if method in CALLS \
            else getattr(self, "_m_" + method)
        future: concurrent.futures.Future[Any] | None = None
        if self._parallel is not None and method in par.POOLED:
            post, event_rid = self._poster(client), rid
            emit = (lambda event: post(encode({"id": event_rid, "event": wire_event(event)}))) \
                if method == "completion" else None
            try:
                future = self._pooled(job, method, params, strict, emit)
            except Exception as err:  # answered by _answer, as a failure of the call would be
                future = concurrent.futures.Future()
                future.set_exception(err)
        elif METHODS[method] == "queue":
            future = self._submit(job, run, params, strict)
        self._track(client, self._answer(job, run, METHODS[method], params, strict, future))

    def _check_request(self, client: _Client, msg: Any) -> tuple[str, dict[str, Any], bool]:
        if not isinstance(msg, dict):
            raise InvalidParamsError("a JSON request must be an object {\"id\", \"method\", \"params\"}")
        rid, method, params = msg.get("id"), msg.get("method"), msg.get("params", {})
        if not _is_id(rid):
            raise InvalidParamsError(f"request 'id' must be a string or an integer, got {_brief(rid)}")
        if not isinstance(method, str):
            raise InvalidParamsError(f"request 'method' must be a string, got {_brief(method)}")
        if method not in METHODS:
            close = difflib.get_close_matches(method, list(METHODS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; methods: {', '.join(METHODS)}"
            raise InvalidParamsError(f"unknown method {method!r}{hint}")
        if method == "auth":
            self._authenticate(params.get("token") if isinstance(params, dict) else None)
        elif not client.authed:
            raise AuthenticationError("authenticate first: send {\"method\": \"auth\", \"params\": {\"token\": ...}}")
        if not isinstance(params, dict):
            raise InvalidParamsError(f"request 'params' must be an object, got {type(params).__name__}")
        strict = msg.get("strict", False)
        if not isinstance(strict, bool):
            raise InvalidParamsError(f"request 'strict' must be a bool, got {_brief(strict)}")
        return method, params, strict

    def _authenticate(self, token: Any) -> None:
        if self._token is None:
            return
        given = token.encode() if isinstance(token, str) else b""
        if not hmac.compare_digest(given, self._token):
            raise AuthenticationError("wrong bridge token")

    async def _answer(self, job: _Job, run: Callable[..., Any], where: str, params: dict[str, Any], strict: bool,
                      future: "concurrent.futures.Future[Any] | None") -> None:
        client = job.client
        try:
            if future is not None:
                result = await asyncio.wrap_future(future)
            elif where == "side":
                result = await asyncio.get_running_loop().run_in_executor(
                    self._side, self._side_call, job, run, params, strict)
            else:
                result = run(job, params, strict)
        except Exception as err:  # every failure is answered; the server keeps serving
            if not isinstance(err, LlamaError):
                logger.exception("bridge: %s failed", job.method)
            client.reply(job.rid, error=error_body(err))
        else:
            client.reply(job.rid, result=result)
        finally:
            client.jobs.pop(job.rid, None)

    def _pooled(self, job: _Job, method: str, params: dict[str, Any], strict: bool,
                emit: Callable[[TokenData], None] | None) -> "concurrent.futures.Future[Any]":
        """Parallel mode: ``job`` (a completion, embedding or rerank) as a request of the pool; its promise.

        ``emit`` gets each TokenData on the pool's delivery thread, all of them before the promise settles.
        """
        call = CALLS[method]
        args = [self._on_server(method, name, params.get(name, call.defaults.get(name))) for name in call.args]
        on_token = None if emit is None else (lambda _request_id, event: emit(event))
        while True:
            pool = self._pool
            if pool is None:
                raise ModelLoadError(_NO_MODEL)
            try:
                job.request = pool.submit(cast(RequestKind, method), tuple(args), on_token, strict=strict,
                                          warn=self._warning_sink(job))
                return job.request.promise
            except ContextBusyError:
                if self._pool is pool:  # its queue is full
                    raise
                # LOAD swapped the pool between our read and the submit: the new one takes it

    def _submit(self, job: _Job, run: Callable[..., Any], *args: Any) -> "concurrent.futures.Future[Any]":
        self._submitted += 1
        return self._worker.submit(self._queued_call, job, run, *args)

    def _queued_call(self, job: _Job, run: Callable[..., Any], *args: Any) -> Any:
        """A job's turn on the worker thread."""
        self._started_jobs += 1
        if self._closing:
            raise ContextReleasedError("Context not found: the bridge server is shutting down")
        if job.client.closed:
            raise ContextReleasedError("Context not found: the client disconnected")
        self._running = True
        try:
            with warnings_to(self._warning_sink(job)):
                return run(job, *args)
        finally:
            self._running = False

    def _side_call(self, job: _Job, run: Callable[..., Any], *args: Any) -> Any:
        with self._use, warnings_to(self._warning_sink(job)):
            return run(job, *args)

    def _poster(self, client: _Client) -> Callable[[bytes], None]:
        """Send a reply line to ``client`` from a worker thread (the event loop writes it)."""
        loop = self._loop
        assert loop is not None, "requests are answered only while the server runs"

        def post(line: bytes) -> None:
            loop.call_soon_threadsafe(client.send, line)

        return post

    def _warning_sink(self, job: _Job) -> Callable[[str], None]:
        post = self._poster(job.client)
        return lambda message: post(encode({"id": job.rid, "warning": message}))

    def _model(self) -> LocalCore:
        if self.core is None:
            raise ModelLoadError(_NO_MODEL)
        return self.core

    # -- methods: where each runs is protocol.METHODS ---------------------------
    def _context_call(self, job: _Job, params: dict[str, Any], strict: bool, *, call: Call) -> Any:
        """One of the context's calls (``CALLS``), on the model's core: the core checks its arguments."""
        args = [self._on_server(call.name, name, params.get(name, call.defaults.get(name))) for name in call.args]
        if call.stop:
            args.append(job.stop)
        if call.strict:
            args.append(strict)
        result = getattr(self._model(), call.name)(*args)
        if call.events:
            post, rid = self._poster(job.client), job.rid
            return drain(result, lambda event: post(encode({"id": rid, "event": wire_event(event)})))
        return result

    def _on_server(self, method: str, name: str, value: Any) -> Any:
        """A file named by a client, as the server may open it: under --sessions-dir or --models-dir only."""
        if name == "path":
            return self._session_file(value, method)
        if method == "completion" and name == "params" and isinstance(value, dict):
            named = [key for key in STATE_FILE_PARAMS if value.get(key) is not None]
            return {**value, **{key: self._state_file(value[key], key) for key in named}} if named else value
        if method == "init_multimodal" and name == "params" and isinstance(value, dict) and "path" in value:
            return {**value, "path": self._model_file(value["path"], "multimodal projectors")}
        if name == "lora_list":
            return [{**entry, "path": self._model_file(entry["path"], "LoRA adapters")}
                    for entry in P.lora_entries(value, method)]
        return value

    def _generate(self, job: _Job, params: Any, emit: Callable[[Any], None] | None) -> Any:
        return drain(self._model().completion(params, job.stop, False), emit)

    def _m_load(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        self._load_model(params.get("path"))
        return self._model_info()

    def _m_free(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        self._free()
        return {"freed": True}

    def _m_model_info(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        return self._model_info()

    def _m_stop(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        if not _is_id(params.get("id")):
            raise InvalidParamsError(f"stop: 'id' must be the string or integer id of one of this connection's "
                                     f"requests, got {_brief(params.get('id'))}")
        target = job.client.jobs.get(params.get("id"))
        if target is not None and target is not job:
            target.halt()
        return {"stopped": target is not None and target is not job}

    def _m_ping(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        return "pong"

    def _m_status(self, job: _Job, params: dict[str, Any], strict: bool) -> Any:
        return self._status()

    # -- the Llambo text protocol --------------------------------------------
    async def _text_command(self, client: _Client, line: bytes) -> bool:
        """Answer one text command; False ends the connection."""
        text = line.decode("utf-8", "replace").strip()
        command, _, arg = text.partition(" ")
        command = command.upper()
        if command not in TEXT_COMMANDS:
            client.status("error", f"unknown command {command!r}; commands: {', '.join(TEXT_COMMANDS)} "
                                   "(or a JSON request line)")
            return True
        if command == "AUTH":
            try:
                self._authenticate(arg.strip())
            except AuthenticationError as err:
                client.status("error", err.message)
                return False
            self._authenticated(client)
            client.status("ok", "authenticated")
            return True
        if not client.authed:
            client.status("error", "authenticate first: AUTH <token>")
            return False
        if command == "PING":
            client.status("ok", "pong")
        elif command == "STATUS":
            client.status("ok", "running", self._status())
        elif command == "QUIT":
            client.status("ok", "bye")
            return False
        else:
            await self._text_job(client, command, arg)
        return True

    async def _text_job(self, client: _Client, command: str, arg: str) -> None:
        job = _Job(client, ("text", command))
        client.jobs[job.rid] = job
        params = {"prompt": arg, "n_predict": self._n_predict}
        streaming = command == "INFER_STREAM"
        run: Callable[..., Any]
        args: tuple[Any, ...]
        if command in ("INFER", "INFER_STREAM"):
            run, args, done = self._text_generate, (params, streaming), "Inference completed"
        elif command == "LOAD":
            run, args, done = self._text_load, (arg.strip(),), "Model loaded successfully"
        else:
            run, args, done = self._text_free, (), "Resources freed"
        try:
            if run == self._text_generate and self._parallel is not None:
                result = await self._text_pooled(job, params, streaming)
            else:
                result = await asyncio.wrap_future(self._submit(job, run, *args))
        except Exception as err:
            client.status("error", error_body(err)["message"])
        else:
            if streaming:
                client.send(encode({"type": "token", "token": "", "final": True}))
            else:
                client.status("ok", done, result)
        finally:
            client.jobs.pop(job.rid, None)

    def _text_generate(self, job: _Job, params: dict[str, Any], streaming: bool) -> Any:
        """INFER's text; INFER_STREAM answers ok once the request is valid, then a line per token."""
        lines = _StreamLines(self._poster(job.client))
        result = self._generate(job, params, lines.token if streaming else None)
        if streaming:
            lines.start(lines.post)
        return result["text"]

    async def _text_pooled(self, job: _Job, params: dict[str, Any], streaming: bool) -> Any:
        """``_text_generate`` as a request of the pool (parallel mode)."""
        lines = _StreamLines(self._poster(job.client))
        result = await asyncio.wrap_future(self._pooled(job, "completion", {"params": params}, False,
                                                        lines.token if streaming else None))
        if streaming:  # every token line was posted before the promise settled, so this one comes after them
            lines.start(job.client.send)
        return result["text"]

    def _text_load(self, job: _Job, path: str) -> None:
        self._load_model(path)

    def _text_free(self, job: _Job) -> None:
        self._free()

    # -- model and files -----------------------------------------------------
    def _load_model(self, path: Any) -> None:
        """Swap in another model; on failure the current one stays.

        In parallel mode the new model's pool opens before the swap, so a request that arrives meanwhile has
        a pool to go to; then the old pool closes: its running requests end ``interrupted``, its queued ones
        are cancelled (every promise settles, every client is answered), and the old model is freed.
        """
        new = self._load_core({**self._params, "model": self._model_file(path)})
        try:
            pool = self._open_pool(new)
        except BaseException:
            new.close()
            raise
        self._swap(new, pool, "cancelled: the bridge server loaded another model")

    def _free(self) -> None:
        self._swap(None, None, "cancelled: the bridge server freed its model")

    def _swap(self, core: LocalCore | None, pool: Pool | None, why: str) -> None:
        with self._use:
            old, self.core = self.core, core
            old_pool, self._pool = self._pool, pool
        try:
            if old_pool is not None:
                old_pool.close(why)
        finally:
            if old is not None:
                old.close()

    def _state_file(self, path: Any, key: str) -> str:
        """A completion's per-sequence state file (llama.rn's ``load_state_path``, ...): under --sessions-dir only."""
        where = f"completion: '{key}'"
        if self._sessions_dir is None:
            raise UnsupportedFeatureError(f"{where}: state files are disabled on this bridge server; start it with "
                                          "--sessions-dir DIR")
        real = _inside(self._sessions_dir, session_path(path, where), where)
        if real is None:
            raise SessionError(f"{where}: {path!r} is outside the server's --sessions-dir ({self._sessions_dir})")
        return real

    def _model_file(self, path: Any, what: str = "LOAD") -> str:
        if self._models_dir is None:
            raise UnsupportedFeatureError(f"{what} is disabled: start the server with --models-dir DIR")
        if not isinstance(path, str) or not path:
            raise InvalidParamsError(f"{what} needs a path inside the server's --models-dir")
        real = _inside(self._models_dir, path, what)
        if real is None:
            raise ModelLoadError(f"Failed to load model: {path!r} is outside the server's --models-dir "
                                 f"({self._models_dir})")
        return real

    def _session_file(self, path: Any, where: str) -> str:
        if self._sessions_dir is None:
            raise UnsupportedFeatureError(f"{where}: sessions are disabled on this bridge server; "
                                          "start it with --sessions-dir DIR")
        real = _inside(self._sessions_dir, session_path(path, where), where)
        if real is None:
            action = where.removesuffix("_session")
            raise SessionError(f"Failed to {action} session: {path!r} is outside the server's --sessions-dir "
                               f"({self._sessions_dir})")
        return real

    def _model_info(self) -> dict[str, Any]:
        core = self._model()
        caps = core.capabilities
        if self._sessions_dir is None:
            caps = {**caps, "features": {**caps["features"], "session": "missing"}}
        if self._models_dir is None:
            caps = {**caps, "features": {**caps["features"], "lora": "missing"}}
        return {"backend": core.backend, "model": core.model, "capabilities": caps,
                "model_path": core.params["model"], "sessions_dir": self._sessions_dir, "max_line": self._max_line,
                "gpu": core.gpu, "reason_no_gpu": core.reason_no_gpu, "devices": core.devices,
                "system_info": core.system_info, "android_lib": core.android_lib, "parallel": self._slots_info()}

    def _slots_info(self) -> dict[str, Any] | None:
        """Parallel mode as a client sees it: the slots, how many decode at once, whether the backend batches them."""
        pool = self._pool
        if pool is None:
            return None
        slots = pool.slots
        return {"n_parallel": slots.n_parallel, "concurrency": slots.concurrency, "support": slots.support}

    def _status(self) -> dict[str, Any]:
        """STATUS: the model, the queue, the clients; in parallel mode ``parallel`` is the pool's status (llama.rn's
        ParallelStatus: n_parallel, active_slots, queued_requests, requests), and ``queue`` and ``busy`` count its
        requests too."""
        core, pool = self.core, self._pool
        slots = pool.status() if pool is not None else par.idle_status(self._parallel) if self._parallel else None
        return {
            "model": core.params["model"] if core else None,
            "backend": core.backend if core else None,
            "queue": max(0, self._submitted - self._started_jobs) + (slots["queued_requests"] if slots else 0),
            "busy": self._running or bool(slots and slots["active_slots"]),
            "parallel": slots,
            "abandoned": self._abandoned,
            "served": self._served,
            "clients": len(self._clients),
            "uptime_s": round(time.monotonic() - self._started, 3),
        }


def _slot_count(parallel: int | None, params: dict[str, Any]) -> int | None:
    """``--parallel``'s slot count, checked; the model is then created for that many sequences (``n_parallel``)."""
    if parallel is None:
        return None
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise InvalidParamsError(f"serve: --parallel must be an int >= 1 (the slots decoding at once), got {parallel!r}")
    given = params.get("n_parallel")
    if given is None:
        params["n_parallel"] = parallel
    elif isinstance(given, int) and not isinstance(given, bool) and given < parallel:
        raise InvalidParamsError(f"serve: --parallel {parallel} needs the model's n_parallel >= {parallel}, got "
                                 f"--param n_parallel={given}; raise it or leave it out")
    return parallel


def _inside(root: str, path: str, what: str) -> str | None:
    """The real path of ``path`` (relative to ``root`` unless absolute) if it is inside ``root``, symlinks followed."""
    real = os.path.realpath(os.path.join(root, file_name(path, what)))
    return real if os.path.commonpath([root, real]) == root else None


def _loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """asyncio's own errors; out of file descriptors in accept is one line (asyncio retries after a second)."""
    if context.get("message") == "socket.accept() out of system resource":
        logger.warning("bridge: no file descriptor left to accept a connection (%s); accepting again in 1 s",
                       context.get("exception"))
    else:
        loop.default_exception_handler(context)


def _is_id(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (str, int))


def _brief(value: Any) -> str:
    """A value for an error message, cut short: it came from the client and may be huge."""
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else f"a JSON {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."


def _client_cap(wanted: int) -> int:
    """``wanted`` connections, fewer if the open-file limit could not hold them (accept would fail with EMFILE)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    # Half of what is left: asyncio accepts a burst of connections before any is turned away.
    return min(wanted, max(4, (soft - _FD_RESERVE) // 2))


def _inode(path: str) -> int:
    try:
        return os.lstat(path).st_ino
    except FileNotFoundError:
        return -1


def bind_unix_socket(path: str) -> socket.socket:
    """A listening-ready Unix socket at ``path`` with mode 0600.

    A stale socket file (no server answers) is replaced; a live one, or a file
    that is not a socket, is refused.
    """
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise LlamaError(f"serve: {path} exists and is not a socket; refusing to replace it",
                             code="address_in_use")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            logger.info("bridge: replacing the stale socket %s", path)
            os.unlink(path)
        else:
            raise LlamaError(f"serve: a server is already listening on {path}; stop it or pass another --socket",
                             code="address_in_use")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is reachable by others
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return sock


def run_server(model_params: dict[str, Any], *, socket_path: str | None = None, host: str = "127.0.0.1",
               port: int | None = None, token: str | None = None, models_dir: str | None = None,
               sessions_dir: str | None = None, n_predict: int = 512, max_line: int = MAX_LINE,
               max_clients: int = MAX_CLIENTS, on_ready: Callable[[list[str]], None] | None = None,
               parallel: int | None = None) -> None:
    """Load the model and serve it until SIGTERM / SIGINT (blocking): a Unix socket unless only a port is given.
    ``parallel``: that many slots decode at once (``serve --parallel N``; see ``BridgeServer``).

    If a job has not stopped ``SHUTDOWN_GRACE_S`` after the signal, the process exits at once with
    status 1 (``os._exit``: a thread stuck in native code would otherwise keep it alive), the socket
    file already removed and every request answered.
    """
    server = BridgeServer(model_params, models_dir=models_dir, sessions_dir=sessions_dir, token=token,
                          n_predict=n_predict, max_line=max_line, max_clients=max_clients, parallel=parallel)
    server.load()

    async def main() -> None:
        addresses = []
        if socket_path is not None or port is None:
            path = socket_path or default_socket(create=True)
            await server.start_unix(path)
            addresses.append(f"unix:{path}")
        if port is not None:
            if host not in ("127.0.0.1", "::1", "localhost"):
                logger.warning("bridge: listening on %s, beyond this machine; anyone with the token can use it", host)
            bound = await server.start_tcp(host, port)
            addresses.append(f"tcp:{host}:{bound}")
        await server.serve(lambda: on_ready(addresses) if on_ready else None)
        if not server.clean:  # inside the loop: tearing it down would wait on, or cancel, what is stuck
            logger.error("bridge: a request was still running %g s after the shutdown signal; exiting without it",
                         SHUTDOWN_GRACE_S)
            logging.shutdown()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(1)

    try:
        asyncio.run(main())
    finally:
        if server.core is not None:  # a start that failed after loading
            server.close()
