"""Issue 24: requests and neighbours that tried to kill or hold ``llamacompat serve``.

Each test replays an attack on a real server process (the packaged model, its
real sockets) and checks that the server survives it, the request gets a typed
error, and other clients go on being served; or, for SIGTERM, that the process
is gone within seconds whatever a request is doing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from llamacompat import init_llama
from llamacompat.bridge import MAX_LINE
from llamacompat.bridge.protocol import MAX_DEPTH
from llamacompat.bridge.server import AUTH_TIMEOUT_S, MAX_UNAUTHENTICATED
from llamacompat.errors import AuthenticationError, ContextLimitError, InvalidParamsError, RequestTimeoutError

from .bridge_helpers import Raw, Served

LONG = {"prompt": "Write a long story about a dragon.", "n_predict": -1, "ignore_eos": True}
NOBODY = 65534
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("attacks")
    (folder / "models").mkdir()
    (folder / "sessions").mkdir()
    server = Served(str(folder), "--models-dir", str(folder / "models"), "--sessions-dir", str(folder / "sessions"))
    assert server.started, server.log()
    yield server
    assert server.stop() == 0, server.log()


def _status(address) -> dict:
    conn = Raw(address)
    try:
        return conn.ask("STATUS")["data"]
    finally:
        conn.close()


def _wait_for(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _error(reply: dict) -> tuple[str, str]:
    assert reply is not None and "error" in reply, reply
    return reply["error"]["code"], reply["error"]["message"]


# -- 2c: SIGTERM while a job runs ---------------------------------------------------
def test_sigterm_during_a_huge_bench_exits_within_seconds(tmp_path):
    server = Served(str(tmp_path))
    assert server.started, server.log()
    bench, queued = Raw(server.socket), Raw(server.socket)
    bench.send({"id": 1, "method": "bench", "params": {"pp": 256, "tg": 256, "pl": 1, "nr": 100}})
    _wait_for(lambda: _status(server.socket)["busy"], "the bench to start")
    queued.send({"id": 2, "method": "completion", "params": {"params": {"prompt": "Hi", "n_predict": 4}}})
    _wait_for(lambda: _status(server.socket)["queue"] == 1, "the completion to queue")
    assert Raw(server.socket).ask("PING")["message"] == "pong", "other clients are served during the bench"
    began = time.monotonic()
    code = server.stop(signal.SIGTERM, timeout=60)
    assert time.monotonic() - began < 15, "serve outlived SIGTERM"
    assert code in (0, 1), server.log()  # 1: the bench did not stop in the grace and the process exited hard
    assert not os.path.exists(server.socket)
    final = bench.until(1)[1]
    assert "result" in final or _error(final)[0] == "context_released", final
    assert _error(queued.until(2)[1])[0] == "context_released"


# Jobs that never look at a stop flag, stuck where no Python signal reaches them.
STUCK = ("import time, llamacompat.local as L\n"
         "L.LocalCore.bench = lambda self, *a: time.sleep(3600)\n"
         "L.LocalCore.get_formatted_chat = lambda self, *a: time.sleep(3600)")


@pytest.mark.parametrize("sig,method,params", [
    (signal.SIGTERM, "bench", {"pp": 8, "tg": 8, "pl": 1, "nr": 1}),
    (signal.SIGINT, "get_formatted_chat", {"messages": [{"role": "user", "content": "hi"}]}),
], ids=["sigterm-queued-job", "sigint-side-job"])
def test_a_job_stuck_in_native_code_cannot_keep_serve_alive(tmp_path, sig, method, params):
    server = Served(str(tmp_path), before=STUCK)
    assert server.started, server.log()
    stuck, queued = Raw(server.socket), Raw(server.socket)
    stuck.send({"id": 1, "method": method, "params": params})
    if method == "bench":
        _wait_for(lambda: _status(server.socket)["busy"], "the stuck job to start")
        queued.send({"id": 2, "method": "completion", "params": {"params": {"prompt": "Hi", "n_predict": 4}}})
        _wait_for(lambda: _status(server.socket)["queue"] == 1, "the completion to queue")
    else:
        time.sleep(0.5)  # the side call starts at once; if not yet, it starts (and sticks) during the shutdown
    began = time.monotonic()
    assert server.stop(sig, timeout=60) == 1, server.log()
    assert time.monotonic() - began < 15, "serve outlived the signal"
    assert not os.path.exists(server.socket), "the socket file must go even on a hard exit"
    assert "exiting without it" in server.log()
    assert _error(stuck.until(1)[1])[0] == "context_released"
    if method == "bench":
        assert _error(queued.until(2)[1])[0] == "context_released"


# -- 3: the default socket cannot be squatted; the client checks who answers -----------
SQUATTER = r"""
import json, os, socket, sys
path, when = sys.argv[1], sys.argv[2]  # "before": become nobody, then bind; "after": bind as root, then become nobody
def become_nobody():
    os.setgid(65534)
    os.setuid(65534)
if when == "before":
    become_nobody()
    os.makedirs(os.path.dirname(path), exist_ok=True)
sock = socket.socket(socket.AF_UNIX)
sock.bind(path)
os.chmod(path, 0o777)
if when == "after":
    become_nobody()
sock.listen()
print("ready", flush=True)
info = {"backend": "llama_cpp", "model": {"desc": "fake"}, "capabilities": {"features": {}}, "model_path": "/fake.gguf",
        "sessions_dir": None, "gpu": False, "reason_no_gpu": "", "devices": [], "max_line": 1 << 20}
while True:
    conn, _ = sock.accept()
    got = b""
    with conn, conn.makefile("rb") as lines:
        for line in lines:  # answer like a server, so that a trusting client would go on
            got += line
            msg = json.loads(line)
            result = info if msg.get("method") == "model_info" else {"text": "fake answer"}
            conn.sendall(json.dumps({"id": msg.get("id"), "result": result}).encode() + b"\n")
    print(json.dumps(got.decode(errors="replace")), flush=True)
"""


@pytest.fixture
def shared_tmp():
    """A world-writable sticky folder like /tmp, where another user can create files."""
    folder = tempfile.mkdtemp(prefix="llamacompat-shared-")
    os.chmod(folder, 0o1777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def squatter():
    procs = []

    def start(path: str, when: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", SQUATTER, path, when], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def _received(proc: subprocess.Popen) -> str:
    """What the squatter was sent on the connection that just ended (it prints one line per connection)."""
    timer = threading.Timer(30, proc.kill)  # never hang the test
    timer.start()
    try:
        return json.loads(proc.stdout.readline() or '"<no connection ended>"')
    finally:
        timer.cancel()


@pytest.fixture
def default_env(monkeypatch, shared_tmp):
    """This process and its servers find the default socket under ``shared_tmp``, without XDG_RUNTIME_DIR."""
    monkeypatch.setenv("TMPDIR", shared_tmp)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)
    return {"TMPDIR": shared_tmp, "XDG_RUNTIME_DIR": ""}


def test_the_default_socket_lives_in_a_private_folder(tmp_path, default_env, shared_tmp, monkeypatch):
    server = Served(str(tmp_path), socket_name=None, env=default_env)
    assert server.started, server.log()
    folder = os.path.join(shared_tmp, f"llamacompat-{os.getuid()}")
    try:
        assert server.addresses == [f"unix:{folder}/bridge.sock"]
        info = os.lstat(folder)
        assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
        assert stat.S_IMODE(os.stat(f"{folder}/bridge.sock").st_mode) == 0o600
        with init_llama({"backend": "bridge"}) as ctx:  # the client finds it by default
            assert ctx.tokenize("Hello world")["tokens"] == [19556, 905]
    finally:
        assert server.stop() == 0, server.log()
    assert not os.path.exists(f"{folder}/bridge.sock")
    # an XDG_RUNTIME_DIR that is not the user's own is refused too
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with pytest.raises(AuthenticationError, match="owned by uid 65534"):
        init_llama({"backend": "bridge"})


def test_a_squatted_default_folder_gets_no_prompt_and_serve_says_why(tmp_path, default_env, shared_tmp, squatter):
    folder = os.path.join(shared_tmp, f"llamacompat-{os.getuid()}")
    proc = squatter(os.path.join(folder, "bridge.sock"), "before")  # nobody got there first
    with pytest.raises(AuthenticationError, match=f"{folder} .*owned by uid {NOBODY}"):
        ctx = init_llama({"backend": "bridge"})
        ctx.completion({"prompt": "my secret prompt: password=hunter2", "n_predict": 4})
    refused = Served(str(tmp_path), socket_name=None, env=default_env)
    assert not refused.started and refused.stop() != 0
    assert f"{folder} (the default socket's folder) must be a folder owned by you" in refused.log()
    proc.kill()
    assert proc.communicate(timeout=10)[0] == "", "the squatter was connected to"


@pytest.mark.parametrize("when,who", [("before", "socket file"), ("after", "process listening on it")],
                         ids=["socket-owned-by-nobody", "listener-running-as-nobody"])
def test_the_client_refuses_a_server_of_another_user_before_sending_anything(shared_tmp, squatter, when, who):
    path = os.path.join(shared_tmp, "bridge.sock")
    proc = squatter(path, when)
    if when == "after":
        assert os.stat(path).st_uid == 0, "the file is root's: only SO_PEERCRED can tell"
    with pytest.raises(AuthenticationError, match=f"the {who} at {path} belongs to uid {NOBODY}"):
        ctx = init_llama({"backend": "bridge", "socket": path})
        ctx.completion({"prompt": "my secret prompt: password=hunter2", "n_predict": 4})
    assert _received(proc) == "", "the client sent the impostor something"


# -- 4: TCP connections that do not authenticate -----------------------------------
def test_tcp_connections_must_authenticate_at_once(tmp_path):
    server = Served(str(tmp_path), "--port", "0", "--token", TOKEN, socket_name=None)
    assert server.started, server.log()
    address = ("127.0.0.1", server.tcp_port())
    try:
        began = time.monotonic()
        idle = [Raw(address) for _ in range(MAX_UNAUTHENTICATED)]
        time.sleep(1)  # the idle ones have had their chance: a newcomer may close the oldest
        for line in (b"HELLO", b"", b"{not json", b'{"id": 1, "method": "ping"}', b"AUTH wrong", b"x" * 10_000):
            conn = Raw(address)
            reply = conn.ask(line)
            assert reply.get("status") == "error" or "error" in reply, (line, reply)
            assert conn.read() is None, f"the connection stayed open after {line[:20]!r}"
            conn.close()
        evicted = idle.pop(0).read()
        assert evicted["id"] is None and evicted["error"]["code"] == "authentication_error"
        assert "a newer connection needed the place" in evicted["message"]
        with init_llama({"backend": "bridge", "host": address[0], "port": address[1], "token": TOKEN}) as ctx:
            assert ctx.completion({"prompt": "Hi", "n_predict": 3})["tokens_predicted"] == 3
        timed_out = [conn.read() for conn in idle]  # each blocks until the server's deadline
        assert all(msg and f"no AUTH within {AUTH_TIMEOUT_S:g} s" in msg["message"] for msg in timed_out), timed_out
        assert all(conn.read() is None for conn in idle)
        assert time.monotonic() - began >= AUTH_TIMEOUT_S - 0.5
        authed = Raw(address)
        assert authed.ask(f"AUTH {TOKEN}")["message"] == "authenticated"
        time.sleep(AUTH_TIMEOUT_S + 0.5)
        assert authed.ask("PING")["message"] == "pong", "the deadline is for connections that have not authenticated"
    finally:
        assert server.stop() == 0, server.log()


def _authed_status(address) -> int | None:
    """The server's count of connections (this one included), or None while it refuses newcomers."""
    try:
        conn = Raw(address)
    except OSError:
        return None
    try:
        if conn.ask(f"AUTH {TOKEN}").get("message") != "authenticated":
            return None
        return conn.ask("STATUS")["data"]["clients"]
    except (OSError, TypeError):
        return None
    finally:
        conn.close()


def _cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_flood_under_a_low_file_limit_locks_nobody_out(tmp_path):
    """300 idle connections at a server that may open 48 files: accept hits EMFILE, the server neither
    spins nor stops, it closes every flood connection, and an authenticated client is served."""
    server = Served(str(tmp_path), "--port", "0", "--token", TOKEN, socket_name=None, nofile=48)
    assert server.started, server.log()
    address = ("127.0.0.1", server.tcp_port())
    flood = []
    try:
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            flood.append(sock)
        time.sleep(1)
        cpu, began = _cpu_seconds(server.proc.pid), time.monotonic()
        time.sleep(3)
        assert _cpu_seconds(server.proc.pid) - cpu < 0.5 * (time.monotonic() - began), "the accept loop spins"
        refusals = 0  # while a burst of the flood holds every place, a newcomer is refused (typed) and retries
        began = time.monotonic()
        while True:
            try:
                ctx = init_llama({"backend": "bridge", "host": address[0], "port": address[1], "token": TOKEN})
                break
            except ContextLimitError:
                refusals += 1
                assert time.monotonic() - began < 15, f"locked out: refused {refusals} times"
                time.sleep(0.2)
        with ctx:
            assert ctx.completion({"prompt": "Hi", "n_predict": 3})["tokens_predicted"] == 3
        # Every flood connection the server accepted is closed by its deadline (those whose handshake the
        # kernel dropped while the queue was full exist on the client side only).
        _wait_for(lambda: _authed_status(address) == 1, "the flood connections to be closed", AUTH_TIMEOUT_S + 30)
        assert "no file descriptor left to accept a connection" in server.log()
        assert Raw(address).ask(f"AUTH {TOKEN}")["message"] == "authenticated"
    finally:
        for sock in flood:
            sock.close()
        assert server.stop() == 0, server.log()


def test_connections_past_the_cap_get_a_typed_refusal(tmp_path):
    server = Served(str(tmp_path), "--max-clients", "3")
    assert server.started, server.log()
    held = [Raw(server.socket) for _ in range(3)]
    try:
        assert all(conn.ask("PING")["message"] == "pong" for conn in held)
        with pytest.raises(ContextLimitError, match="holds 3 connections, 0 of them waiting to authenticate; its limit is 3"):
            init_llama({"backend": "bridge", "socket": server.socket})
        extra = Raw(server.socket)
        assert extra.read()["status"] == "error" and extra.read() is None  # a Llambo client reads it too
        held.pop().close()

        def admitted() -> bool:
            try:
                init_llama({"backend": "bridge", "socket": server.socket}).release()
                return True
            except ContextLimitError:
                return False

        _wait_for(admitted, "a freed place", timeout=10)
        assert all(conn.ask("PING")["message"] == "pong" for conn in held)
    finally:
        for conn in held:
            conn.close()
        assert server.stop() == 0, server.log()


# -- 8: lines that raised past the request handlers --------------------------------
def _nested(depth_of_lists: int) -> str:
    """A tokenize request nested 3 + ``depth_of_lists`` deep (the request, its params, their params, the lists)."""
    return ('{"id": 1, "method": "tokenize", "params": {"text": "x", "params": {"a": '
            + "[" * depth_of_lists + "]" * depth_of_lists + "}}}")


def test_deeply_nested_json_gets_an_error_naming_the_limit(raw, served):
    for lists in (100_000, MAX_DEPTH - 2):
        code, message = _error(raw.ask(_nested(lists)))
        assert code == "invalid_params" and f"nested deeper than {MAX_DEPTH} levels" in message
    code, message = _error(raw.ask(_nested(MAX_DEPTH - 3)))  # at the limit: parsed, refused for its content
    assert "deeper" not in message
    assert raw.ask({"id": 2, "method": "tokenize", "params": {"text": "Hello world"}})["result"]["tokens"] == [19556, 905]
    assert _status(served.socket)["clients"] >= 1


def test_a_nul_byte_in_a_path_is_invalid_params(raw, served):
    sessions = os.path.join(os.path.dirname(served.socket), "sessions")
    for rid, method, params in [
        (1, "load_session", {"path": f"{sessions}/a\0b"}),
        (2, "save_session", {"path": f"{sessions}/a\0b", "token_size": -1}),
        (3, "load", {"path": "a\0b.gguf"}),
        (4, "apply_lora_adapters", {"lora_list": [{"path": "lora\0.gguf"}]}),
    ]:
        reply = raw.ask({"id": rid, "method": method, "params": params})
        assert reply["id"] == rid and _error(reply)[0] == "invalid_params" and "NUL byte" in _error(reply)[1], reply
    reply = raw.ask(b"LOAD a\0b.gguf")
    assert reply["status"] == "error" and "NUL byte" in reply["message"]
    assert raw.ask("INFER Hello")["status"] == "ok", "the model is still served"


@pytest.mark.parametrize("bad", [[1], {"id": 1}, True, None, 1.5], ids=repr)
def test_stop_with_a_bad_id_is_invalid_params(raw, bad):
    reply = raw.ask({"id": "s", "method": "stop", "params": {"id": bad}})
    code, message = _error(reply)
    assert reply["id"] == "s" and code == "invalid_params" and "stop: 'id' must be" in message


def test_a_duplicate_id_is_refused_without_touching_the_running_request(raw):
    raw.send({"id": 7, "method": "completion", "params": {"params": LONG}})
    assert raw.read()["id"] == 7
    raw.send({"id": 7, "method": "tokenize", "params": {"text": "x"}})
    while "event" in (msg := raw.read()):
        assert msg["id"] == 7
    assert msg["id"] is None and _error(msg)[0] == "invalid_params"
    assert "request id 7 is already in flight" in _error(msg)[1]
    assert "event" in raw.read(), "the running completion goes on"
    raw.send({"id": 8, "method": "stop", "params": {"id": 7}})
    assert raw.until(7)[1]["result"]["interrupted"] is True


# -- 9: requests over the line limit, and calls that waited forever -----------------
def test_a_request_over_the_line_limit_fails_at_once_naming_the_limit(served, raw):
    with init_llama({"backend": "bridge", "socket": served.socket}) as ctx:
        began = time.monotonic()
        with pytest.raises(InvalidParamsError, match=f"line limit of {MAX_LINE} bytes"):
            ctx.tokenize("x" * 1_350_000)
        assert time.monotonic() - began < 10
        assert ctx.tokenize("Hello world")["tokens"] == [19556, 905]
    # A client that sends one anyway gets the error under the request's own id.
    for rid in (42, "big"):
        reply = raw.ask({"id": rid, "method": "tokenize", "params": {"text": "x" * 1_350_000}})
        assert reply["id"] == rid and _error(reply) == (
            "invalid_params", f"request line longer than {MAX_LINE} bytes (the bridge's line limit); it was skipped")


def test_the_client_keeps_to_the_servers_own_line_limit(tmp_path):
    server = Served(str(tmp_path), "--max-line", "4096")
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket}) as ctx:
            with pytest.raises(InvalidParamsError, match="line limit of 4096 bytes"):
                ctx.tokenize("x " * 2500)
            assert len(ctx.tokenize("x " * 1500)["tokens"]) >= 1500
    finally:
        assert server.stop() == 0, server.log()


def test_a_call_waits_while_the_server_answers_and_fails_once_it_is_silent(served):
    runner = Raw(served.socket)
    try:
        runner.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        assert "event" in runner.read()
        with init_llama({"backend": "bridge", "socket": served.socket, "timeout": 1}) as ctx:
            box: dict = {}
            queued = threading.Thread(target=lambda: box.update(result=ctx.completion({"prompt": "Hi", "n_predict": 3})))
            queued.start()
            time.sleep(3.5)  # past twice the timeout: only the answered pings keep it waiting
            assert queued.is_alive() and not box, "a call queued behind a live server gave up"
            runner.send({"id": 2, "method": "stop", "params": {"id": 1}})
            assert runner.until(1)[1]["result"]["interrupted"] is True
            queued.join(60)
            assert box["result"]["tokens_predicted"] == 3
            os.kill(served.proc.pid, signal.SIGSTOP)  # alive but silent, as a hung process
            try:
                began = time.monotonic()
                with pytest.raises(RequestTimeoutError, match="not even the answer to a ping"):
                    ctx.tokenize("Hi")
                assert 2 <= time.monotonic() - began < 15
            finally:
                os.kill(served.proc.pid, signal.SIGCONT)
            assert ctx.tokenize("Hello world")["tokens"] == [19556, 905], "the connection works again"
    finally:
        runner.close()
