"""The bridge: ``llamacompat serve`` in a real process, its two protocols, its client, its faults.

Every server here is a subprocess serving the packaged model, reached through
its real Unix socket (or loopback TCP), as other programs reach it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import warnings

import pytest

from llamacompat import init_llama, init_llama_async
from llamacompat.bridge import MAX_LINE
from llamacompat.conformance import CHECKS, Kit, NotApplicable
from llamacompat.errors import (
    AuthenticationError,
    BackendUnavailableError,
    ContextReleasedError,
    EmbeddingDisabledError,
    InvalidParamsError,
    LlamaCompatWarning,
    ModelLoadError,
    SessionError,
    UnsupportedFeatureError,
)

from .bridge_helpers import Raw, Served

GREEDY = {"temperature": 0}
LONG = {"prompt": "Write a long story about a dragon.", "n_predict": -1, "ignore_eos": True}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server for the module: embeddings on, sessions under the temp folder the conformance suite uses."""
    folder = str(tmp_path_factory.mktemp("bridge"))
    server = Served(folder, "--embedding", "--sessions-dir", tempfile.gettempdir())
    assert server.started, server.log()
    yield server
    assert server.stop() == 0, server.log()


def _status(socket_path: str) -> dict:
    conn = Raw(socket_path)
    try:
        return conn.ask("STATUS")["data"]
    finally:
        conn.close()


# -- the conformance suite, over the bridge ----------------------------------
@pytest.fixture(scope="module")
def bridge_kit(served):
    kit = Kit("bridge", {"socket": served.socket})
    yield kit
    kit.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance_over_the_bridge(name, bridge_kit):
    try:
        CHECKS[name].run(bridge_kit)
    except NotApplicable:
        pass


# -- the Llambo text protocol -------------------------------------------------
def test_text_commands_answer_one_json_line_each(raw, served):
    assert raw.ask("PING") == {"status": "ok", "message": "pong"}
    status = raw.ask("STATUS")
    assert status["status"] == "ok"
    data = status["data"]
    assert data["model"].endswith(".gguf") and data["backend"] == "llama_cpp"
    assert {"queue", "busy", "served", "clients", "uptime_s", "abandoned"} <= set(data)
    assert data["parallel"] is None, "no slots without --parallel"
    assert data["served"] >= 0 and data["uptime_s"] > 0
    reply = raw.ask("INFER The capital of France is")
    assert reply["status"] == "ok" and reply["message"] == "Inference completed"
    assert isinstance(reply["data"], str) and reply["data"]


def test_infer_stream_answers_ok_then_a_line_per_token(raw):
    assert raw.ask("INFER_STREAM Count: one, two, three,") == {"status": "ok", "message": "Streaming started"}
    tokens = []
    while True:
        line = raw.read()
        assert line["type"] == "token" and isinstance(line["token"], str)
        if line["final"]:
            assert line["token"] == ""
            break
        tokens.append(line["token"])
    assert tokens, "no token streamed"
    assert raw.ask("PING")["message"] == "pong", "the connection is usable after a stream"


def test_infer_without_a_prompt_is_an_error_line(raw):
    reply = raw.ask("INFER_STREAM")
    assert reply["status"] == "error" and "Prompt is required" in reply["message"]


def test_quit_ends_the_connection(raw):
    assert raw.ask("quit") == {"status": "ok", "message": "bye"}
    assert raw.read() is None


def test_half_closed_client_still_gets_its_answer(served):
    """``echo PING | nc -U sock`` sends, half-closes, then reads."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(60)
    sock.connect(served.socket)
    sock.sendall(b"PING\nINFER Hello\n")
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    sock.close()
    lines = data.decode().splitlines()
    assert lines[0] == '{"status":"ok","message":"pong"}'
    assert '"Inference completed"' in lines[1]


# -- bad lines ---------------------------------------------------------------
BAD_LINES = [
    (b'{"id": 1, "method": "completion", "params": ', "malformed JSON"),
    (b'{"id": 2, "method": "complete", "params": {}}', "did you mean 'completion'"),
    (b'{"method": "ping"}', "'id' must be a string or an integer"),
    (b'{"id": 3, "method": "tokenize", "params": [1, 2]}', "'params' must be an object"),
    (b'{"id": 4, "method": "completion", "params": {}, "strict": "yes"}', "'strict' must be a bool"),
    (b"FROBNICATE now", "unknown command 'FROBNICATE'"),
    (b"{" + b"x" * (MAX_LINE + 10), f"longer than {MAX_LINE} bytes"),
    (b"INFER " + b"y" * (MAX_LINE + 10), f"longer than {MAX_LINE} bytes"),
]


@pytest.mark.parametrize("line,expected", BAD_LINES, ids=[e for _l, e in BAD_LINES])
def test_a_bad_line_gets_an_error_reply_and_the_connection_goes_on(raw, served, line, expected):
    reply = raw.ask(line)
    message = reply["message"] if "status" in reply else reply["error"]["message"]
    assert expected in message, reply
    if "error" in reply:
        assert reply["error"]["code"] == "invalid_params"
    assert raw.ask("PING")["message"] == "pong"
    assert raw.ask({"id": "t", "method": "tokenize", "params": {"text": "Hi"}})["result"]["tokens"]


def test_request_errors_carry_the_hierarchy_codes(raw):
    reply = raw.ask({"id": 1, "method": "completion", "params": {"params": {"prompt": "x", "grammar": 'root ::= "a'}}})
    assert reply["error"]["code"] == "grammar_error" and "line 1" in reply["error"]["message"]
    reply = raw.ask({"id": 2, "method": "detokenize", "params": {"tokens": [10**9]}})
    assert reply["error"]["code"] == "invalid_params"
    reply = raw.ask({"id": 4, "method": "embedding", "params": {"text": "x", "params": {"embd_normalize": "L2"}}})
    assert reply["error"]["code"] == "invalid_params" and "embd_normalize" in reply["error"]["message"]
    reply = raw.ask({"id": 3, "method": "load_session", "params": {"path": "/etc/passwd"}})
    assert reply["error"]["code"] == "session_error" and "outside the server's --sessions-dir" in reply["error"]["message"]


# -- the client ----------------------------------------------------------------
def test_server_errors_and_warnings_arrive_as_the_same_classes(served):
    with init_llama({"backend": "bridge", "socket": served.socket}) as ctx:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = ctx.completion({"prompt": "Hi", "n_predict": 2, "chat_format": 3})
        assert result["tokens_predicted"] == 2
        assert [str(w.message) for w in caught if w.category is LlamaCompatWarning] == [
            "completion: 'chat_format' is ignored (llamacompat derives it from the chat template of 'messages')"]
        with pytest.raises(SessionError, match="outside the server's --sessions-dir"):
            ctx.save_session("/etc/llamacompat-test.session")
        with pytest.raises(EmbeddingDisabledError):
            ctx.embedding("needs embedding: True on the client context")
        assert ctx.capabilities["server_backend"] == "llama_cpp"
        assert ctx.capabilities["server_parallel"] is None
        assert ctx._core.open_slots(2, 512).support == "emulated", "a FIFO server takes parallel requests in turn"
    with init_llama({"backend": "bridge", "socket": served.socket, "strict": True}) as ctx:
        with pytest.raises(UnsupportedFeatureError, match="chat_format"):  # strict: no leniency for ignored keys
            ctx.completion({"prompt": "Hi", "n_predict": 2, "chat_format": 3})


def test_client_refuses_a_model_the_server_does_not_serve(served, tmp_path):
    with pytest.raises(ModelLoadError, match="serves"):
        init_llama({"backend": "bridge", "socket": served.socket, "model": str(tmp_path / "other.gguf")})
    with init_llama({"backend": "bridge", "socket": served.socket, "model": "smollm2"}) as ctx:
        assert ctx.model["n_embd"] == 576


def test_no_server_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nobody.sock")
    with pytest.raises(BackendUnavailableError, match=f"llamacompat serve --socket {missing}"):
        init_llama({"backend": "bridge", "socket": missing})
    with pytest.raises(InvalidParamsError, match="both 'host' and 'port'"):
        init_llama({"backend": "bridge", "port": 9})


def test_async_context_over_the_bridge(served):
    import asyncio

    async def run():
        ctx = await init_llama_async({"backend": "bridge", "socket": served.socket})
        try:
            events = []
            result = await ctx.completion({"prompt": "The sky is", "n_predict": 4, **GREEDY}, events.append)
            tokens = await ctx.tokenize("The sky is")
            return result, events, tokens
        finally:
            await ctx.release()

    result, events, tokens = asyncio.run(run())
    assert result["tokens_predicted"] == 4 and "".join(e["token"] for e in events) == result["text"]
    assert tokens["tokens"]


def test_bridge_gives_the_in_process_answer(served, ctx):
    request = {"prompt": "The three primary colours are", "n_predict": 12, "n_probs": 2, **GREEDY}
    with init_llama({"backend": "bridge", "socket": served.socket}) as remote:
        over_bridge = remote.completion(request)
    here = ctx.completion(request)
    assert over_bridge["text"] == here["text"]
    ours, theirs = over_bridge["completion_probabilities"], here["completion_probabilities"]
    assert [step["content"] for step in ours] == [step["content"] for step in theirs]
    for step, expected in zip(ours, theirs, strict=True):
        assert [p["prob"] for p in step["probs"]] == pytest.approx([p["prob"] for p in expected["probs"]], abs=1e-3)


# -- concurrency ---------------------------------------------------------------
def test_each_client_stops_only_its_own_request(served):
    a, b = Raw(served.socket), Raw(served.socket)
    try:
        a.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        assert "event" in a.read()
        assert b.ask({"id": 9, "method": "stop", "params": {"id": 1}})["result"] == {"stopped": False}
        assert "event" in a.read(), "another client's stop request stopped this completion"
        a.send({"id": 2, "method": "stop", "params": {"id": 1}})
        _events, final = a.until(1)
        assert final["result"]["interrupted"] is True
    finally:
        a.close()
        b.close()


def test_completions_are_served_first_come_first_served(served):
    """A runs; B then C queue behind it; once A stops, B is answered before C."""
    a, b, c = Raw(served.socket), Raw(served.socket), Raw(served.socket)
    arrived: dict[str, float] = {}
    try:
        a.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        assert "event" in a.read()
        b.send({"id": 1, "method": "completion", "params": {"params": {"prompt": "B:", "n_predict": 8}}})
        deadline = time.monotonic() + 30
        while _status(served.socket)["queue"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        c.send({"id": 1, "method": "completion", "params": {"params": {"prompt": "C:", "n_predict": 8}}})
        while _status(served.socket)["queue"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _status(served.socket)["queue"] == 2, "B and C should wait behind A"
        readers = [threading.Thread(target=lambda n=n, conn=conn: (conn.until(1), arrived.__setitem__(n, time.monotonic())))
                   for n, conn in (("b", b), ("c", c))]
        for reader in readers:
            reader.start()
        a.send({"id": 2, "method": "stop", "params": {"id": 1}})
        assert a.until(1)[1]["result"]["interrupted"] is True
        for reader in readers:
            reader.join(120)
        assert arrived["b"] < arrived["c"], arrived
    finally:
        for conn in (a, b, c):
            conn.close()


def test_tokenize_runs_beside_a_completion(served):
    a, b = Raw(served.socket), Raw(served.socket)
    try:
        a.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        assert "event" in a.read()
        reply = b.ask({"id": 1, "method": "tokenize", "params": {"text": "Hello world"}})
        assert reply["result"]["tokens"] == [19556, 905]
        assert _status(served.socket)["busy"] is True, "the completion should still be running"
        a.send({"id": 2, "method": "stop", "params": {"id": 1}})
        assert a.until(1)[1]["result"]["interrupted"] is True
    finally:
        a.close()
        b.close()


def test_a_client_that_disconnects_mid_stream_has_its_generation_stopped(served):
    before = _status(served.socket)["abandoned"]
    quitter = Raw(served.socket)
    quitter.send({"id": 1, "method": "completion", "params": {"params": LONG}})
    assert "event" in quitter.read()
    quitter.sock.shutdown(socket.SHUT_RDWR)
    quitter.close()
    deadline = time.monotonic() + 30
    while (status := _status(served.socket))["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not status["busy"], "the abandoned completion is still generating"
    assert status["abandoned"] == before + 1


# -- the load test ----------------------------------------------------------------
def test_sixteen_clients_twenty_completions_each_none_lost_none_mixed(served):
    """Every answer is whole and reaches the right client, while 3 clients die mid-stream and
    another connection throws 50 malformed lines."""
    n_clients, n_requests = 16, 20
    failures: list[str] = []
    done = [0] * n_clients

    def client(k: int) -> None:
        with init_llama({"backend": "bridge", "socket": served.socket}) as ctx:
            for r in range(n_requests):
                tag = f"c{k}r{r}"
                events: list[dict] = []
                result = ctx.completion({"prompt": f"Say {tag}:", "grammar": f'root ::= "{tag}"', **GREEDY},
                                        events.append)
                streamed = "".join(e["token"] for e in events)
                if result["text"] != tag or streamed != tag:
                    failures.append(f"client {k} request {r}: got {result['text']!r}, streamed {streamed!r}")
                done[k] += 1

    def dying_client() -> None:
        conn = Raw(served.socket)
        conn.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        for _ in range(3):
            assert "event" in conn.read()
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # no goodbye: as a killed process

    def vandal() -> None:
        conn = Raw(served.socket)
        try:
            for i in range(50):
                reply = conn.ask([b"{not json", b'{"id": [], "method": 5}', b"\xff\xfe GARBAGE", b"{}"][i % 4])
                assert reply is not None and (reply.get("status") == "error" or "error" in reply), reply
        finally:
            conn.close()

    before = _status(served.socket)["abandoned"]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    threads += [threading.Thread(target=dying_client) for _ in range(3)] + [threading.Thread(target=vandal)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not any(thread.is_alive() for thread in threads), "a client hung"
    assert failures == []
    assert done == [n_requests] * n_clients
    status = _status(served.socket)
    assert status["abandoned"] == before + 3 and status["queue"] == 0


# -- security ---------------------------------------------------------------------
def test_socket_is_private_and_a_live_one_is_not_taken_over(served, tmp_path):
    mode = os.stat(served.socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    second = Served(os.path.dirname(served.socket))
    assert not second.started and second.stop() != 0
    assert "already listening" in second.log()
    assert Raw(served.socket).ask("PING")["message"] == "pong", "the live server was disturbed"


def test_a_stale_socket_is_replaced_and_a_plain_file_is_not(tmp_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "bridge.sock"))
    stale.close()  # the file stays, nobody listens: a server that died
    server = Served(str(tmp_path), "--n-predict", "4")
    try:
        assert server.started, server.log()
        assert Raw(server.socket).ask("PING")["message"] == "pong"
    finally:
        assert server.stop() == 0
    assert not os.path.exists(server.socket), "SIGTERM must remove the socket file"
    (tmp_path / "bridge.sock").write_text("precious data")
    refused = Served(str(tmp_path))
    assert not refused.started and refused.stop() != 0
    assert "is not a socket" in refused.log() and (tmp_path / "bridge.sock").read_text() == "precious data"


def test_tcp_needs_the_right_token(tmp_path):
    no_token = Served(str(tmp_path), "--port", "0", socket_name=None, env={"LLAMACOMPAT_BRIDGE_TOKEN": ""})
    assert not no_token.started and no_token.stop() != 0 and "TCP needs a token" in no_token.log()
    server = Served(str(tmp_path), "--port", "0", "--token", "s3cret", socket_name=None)
    assert server.started, server.log()
    assert server.addresses[0].startswith("tcp:127.0.0.1:"), "TCP must bind to loopback by default"
    port = server.tcp_port()
    try:
        with pytest.raises(AuthenticationError, match="wrong bridge token"):
            init_llama({"backend": "bridge", "host": "127.0.0.1", "port": port, "token": "guess"})
        conn = Raw(("127.0.0.1", port))
        reply = conn.ask({"id": 1, "method": "tokenize", "params": {"text": "x"}})
        assert reply["error"]["code"] == "authentication_error"
        assert conn.read() is None, "an unauthenticated request must end the connection"
        conn = Raw(("127.0.0.1", port))
        assert conn.ask("AUTH nope")["status"] == "error" and conn.read() is None
        conn = Raw(("127.0.0.1", port))
        assert conn.ask("AUTH s3cret")["message"] == "authenticated" and conn.ask("PING")["message"] == "pong"
        with init_llama({"backend": "bridge", "host": "127.0.0.1", "port": port, "token": "s3cret"}) as ctx:
            assert ctx.completion({"prompt": "Hi", "n_predict": 3})["tokens_predicted"] == 3
    finally:
        assert server.stop() == 0


def test_load_stays_inside_the_models_dir(tmp_path, model_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_path, models / "copy.gguf")
    (models / "escape.gguf").symlink_to(model_path)  # points outside
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    server = Served(str(tmp_path), "--models-dir", str(models), "--n-predict", "4")
    assert server.started, server.log()
    conn = Raw(server.socket)
    try:
        for path in ("../outside.gguf", str(tmp_path / "outside.gguf"), "escape.gguf", "/etc/passwd"):
            reply = conn.ask(f"LOAD {path}")
            assert reply["status"] == "error" and "outside the server's --models-dir" in reply["message"], path
        assert "Failed to load model" in conn.ask("LOAD missing.gguf")["message"]
        assert conn.ask("INFER Hello")["status"] == "ok", "a refused LOAD must keep the current model"
        assert conn.ask("LOAD copy.gguf") == {"status": "ok", "message": "Model loaded successfully"}
        assert conn.ask("STATUS")["data"]["model"] == str(models / "copy.gguf")
        assert conn.ask("FREE") == {"status": "ok", "message": "Resources freed"}
        reply = conn.ask("INFER Hello")
        assert reply["status"] == "error" and "no model loaded" in reply["message"]
        reply = conn.ask({"id": 1, "method": "load", "params": {"path": "copy.gguf"}})
        assert reply["result"]["backend"] == "llama_cpp"
        assert conn.ask("INFER Hello")["status"] == "ok"
    finally:
        conn.close()
        assert server.stop() == 0


def test_sessions_and_load_are_off_unless_a_folder_is_given(tmp_path):
    server = Served(str(tmp_path), "--n-predict", "4")
    assert server.started, server.log()
    try:
        with init_llama({"backend": "bridge", "socket": server.socket}) as ctx:
            assert ctx.capabilities["features"]["session"] == "missing"
            with pytest.raises(UnsupportedFeatureError, match="--sessions-dir"):
                ctx.save_session(str(tmp_path / "s.session"))
        assert "--models-dir" in Raw(server.socket).ask("LOAD x.gguf")["message"]
    finally:
        assert server.stop() == 0


# -- shutdown and crashes -----------------------------------------------------------
def test_sigterm_answers_the_running_completion_and_removes_the_socket(tmp_path):
    server = Served(str(tmp_path))
    assert server.started, server.log()
    ctx = init_llama({"backend": "bridge", "socket": server.socket})
    started, box = threading.Event(), {}
    worker = threading.Thread(target=lambda: box.update(result=ctx.completion(LONG, lambda _e: started.set())))
    worker.start()
    assert started.wait(60)
    assert server.stop(signal.SIGTERM) == 0, server.log()
    worker.join(60)
    assert box["result"]["interrupted"] is True
    assert not os.path.exists(server.socket)
    with pytest.raises(BackendUnavailableError, match="went away"):
        ctx.completion({"prompt": "Hi", "n_predict": 2})
    ctx.release()
    with pytest.raises(ContextReleasedError):
        ctx.tokenize("x")


def test_a_killed_server_fails_the_call_with_a_clear_error(tmp_path):
    server = Served(str(tmp_path))
    assert server.started, server.log()
    ctx = init_llama({"backend": "bridge", "socket": server.socket})
    started, box = threading.Event(), {}

    def run() -> None:
        try:
            ctx.completion(LONG, lambda _e: started.set())
        except Exception as err:  # noqa: BLE001 - inspected below
            box["error"] = err

    worker = threading.Thread(target=run)
    worker.start()
    assert started.wait(60)
    server.stop(signal.SIGKILL)
    worker.join(60)
    assert isinstance(box.get("error"), BackendUnavailableError), box
    ctx.release()


def test_line_reader_limits_lines_across_chunks():
    import asyncio

    from llamacompat.bridge.server import _LineReader, _Oversize

    async def lines(chunks: list[bytes], limit: int) -> list:
        reader = asyncio.StreamReader()
        for chunk in chunks:
            reader.feed_data(chunk)
        reader.feed_eof()
        got, lr = [], _LineReader(reader, limit)
        while (line := await lr.next()) is not None:
            got.append(("oversize", line.json_like) if isinstance(line, _Oversize) else line)
        return got

    assert asyncio.run(lines([b"ab", b"cd\nef", b"\n", b"gh"], 4)) == [b"abcd", b"ef", b"gh"]
    assert asyncio.run(lines([b"abcde\n", b"ok\n"], 4)) == [("oversize", False), b"ok"]
    assert asyncio.run(lines([b'{"a":', b"1" * 100, b"2}\n", b"ok\n"], 8)) == [("oversize", True), b"ok"]
    assert asyncio.run(lines([b"x" * 50], 8)) == [("oversize", False)]
    # reads come 64 KiB at a time: lines that span several reads
    long_ok, too_long = b"a" * 100_000, b"b" * 150_001
    assert asyncio.run(lines([long_ok + b"\n" + too_long + b"\nok\n"], 150_000)) == [long_ok, ("oversize", False), b"ok"]


def test_events_carry_the_reply_so_far_yet_each_line_stays_short(served, raw):
    """llama.rn's TokenData has content and accumulated_text (the reply so far) on every token; over the wire the
    server leaves that text out and the client rebuilds it, so a line does not grow with the reply."""
    events = []
    with init_llama({"backend": "bridge", "socket": served.socket}) as ctx:
        result = ctx.completion({"prompt": "Count: one, two, three,", "n_predict": 24, **GREEDY}, events.append)
    text = ""
    for event in events:
        text += event["token"]
        assert event["accumulated_text"] == event["content"] == text
    assert text == result["text"] == result["accumulated_text"] == result["content"]
    raw.send({"id": 1, "method": "completion", "params": {"params": {"prompt": "Count: one, two, three,",
                                                                    "n_predict": 24, **GREEDY}}})
    lines = []
    while "event" in (line := raw.read()):
        lines.append(line["event"])
    assert line["result"]["text"] == result["text"]
    assert lines and all("accumulated_text" not in e and "content" not in e and e["plain"] is True for e in lines)
