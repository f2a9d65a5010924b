"""``llamacompat serve --parallel N`` (issue 27): clients share the server's slots.

Every server here is a real process serving the packaged model in parallel mode, reached through its Unix
socket. Tests marked ``batched`` need slots that decode at once (llama_cpp's batching, ``support: native``
in ``model_info``'s ``parallel``); on a backend whose slots take turns (``emulated``) they are skipped, and
the others hold either way: they read how many requests run at once (``concurrency``) from the server.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

from llamacompat import init_llama
from llamacompat.errors import ContextBusyError, ParallelModeError

from .bridge_helpers import Raw, Served

N_SLOTS = 2
# Long enough to hold a slot for the whole test (n_ctx / N_SLOTS tokens at most): each test stops it itself.
LONG = {"prompt": "Write a long story about a dragon.", "n_predict": -1, "ignore_eos": True}
SHORT = {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0}
# With two threads, ggml's threads wait on each other, and a busy neighbour core made one token take seconds
# (SIGTERM's 3 s grace ran out); on one thread a stop lands within a token.
ONE_THREAD = ("--param", "n_threads=1")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bridge-parallel"))
    server = Served(folder, "--parallel", str(N_SLOTS), "--n-ctx", "8192", "--embedding", "--n-predict", "8", *ONE_THREAD)
    assert server.started, server.log()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def slots(served) -> dict:
    """The server's parallel mode as its handshake tells it: n_parallel, concurrency, support."""
    conn = Raw(served.socket)
    try:
        return conn.ask({"id": 1, "method": "model_info", "params": {}})["result"]["parallel"]
    finally:
        conn.close()


@pytest.fixture
def batched(slots):
    if slots["support"] != "native":
        pytest.skip("needs slots that decode at once (llama_cpp's batching); this backend's slots take turns")


def _status(served) -> dict:
    conn = Raw(served.socket)
    try:
        return conn.ask("STATUS")["data"]
    finally:
        conn.close()


def _wait_for(predicate, what: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _slots_are(served, active: int, queued: int) -> dict:
    """Wait until STATUS shows ``active`` running and ``queued`` waiting requests; return that STATUS."""
    return _wait_for(lambda: (s := _status(served))["parallel"]["active_slots"] == active
                     and s["parallel"]["queued_requests"] == queued and s, f"{active} running, {queued} queued")


class Holder:
    """A connection whose LONG completion holds one slot until ``stop``."""

    def __init__(self, served, wait_for_token: bool = True) -> None:
        self.conn = Raw(served.socket)
        self.conn.send({"id": 1, "method": "completion", "params": {"params": LONG}})
        if wait_for_token:
            self.first_event()

    def first_event(self) -> None:
        msg = self.conn.read()
        assert msg is not None and "event" in msg, msg

    def stop(self) -> dict:
        self.conn.send({"id": "stop", "method": "stop", "params": {"id": 1}})
        _events, final = self.conn.until(1)
        self.conn.close()
        return final["result"]


def _hold_every_slot(served, slots) -> list[Holder]:
    holders = []
    for _ in range(slots["concurrency"]):
        holders.append(Holder(served))
    _slots_are(served, slots["concurrency"], 0)
    return holders


# -- what the server says ------------------------------------------------------------
def test_status_reports_the_slots_and_the_queue(served, slots):
    assert slots["n_parallel"] == N_SLOTS and slots["support"] in ("native", "emulated")
    assert slots["concurrency"] == (N_SLOTS if slots["support"] == "native" else 1)
    idle = _slots_are(served, 0, 0)["parallel"]
    assert idle == {"n_parallel": N_SLOTS, "active_slots": 0, "queued_requests": 0, "requests": []}
    holders = _hold_every_slot(served, slots)
    waiting = Raw(served.socket)
    try:
        waiting.send({"id": 7, "method": "completion", "params": {"params": SHORT}})
        text_status = _slots_are(served, slots["concurrency"], 1)
        conn = Raw(served.socket)
        json_status = conn.ask({"id": "s", "method": "status", "params": {}})["result"]
        conn.close()
        for status in (text_status, json_status):
            parallel = status["parallel"]
            assert parallel["n_parallel"] == N_SLOTS
            assert status["busy"] is True and status["queue"] >= 1
            running = [r for r in parallel["requests"] if r["state"] != "queued"]
            queued = [r for r in parallel["requests"] if r["state"] == "queued"]
            assert len(queued) == 1 and len(running) == slots["concurrency"]
            for request in parallel["requests"]:
                assert {"request_id", "type", "state", "prompt_length", "tokens_generated", "prompt_ms",
                        "generation_ms", "tokens_per_second"} <= set(request)
                assert request["type"] == "completion"
            assert all(r["state"] in ("processing_prompt", "generating") for r in running)
            assert len({r["request_id"] for r in parallel["requests"]}) == len(parallel["requests"])
            assert all(r["tokens_generated"] >= 1 for r in running), "every holder streamed a token already"
    finally:
        for holder in holders:
            assert holder.stop()["interrupted"] is True
    _events, final = waiting.until(7)
    waiting.close()
    assert final["result"]["tokens_predicted"] == 4, "the queued request runs once a slot frees"
    _slots_are(served, 0, 0)


@pytest.mark.parametrize("args,expected", [
    (("--parallel", "0"), "--parallel must be an int >= 1"),
    (("--parallel", "4", "--param", "n_parallel=2"), "needs the model's n_parallel >= 4"),
])
def test_serve_refuses_a_bad_slot_count(tmp_path, args, expected):
    server = Served(str(tmp_path), *args)
    assert not server.started and server.stop() != 0
    assert expected in server.log(), server.log()


# -- clients at once ----------------------------------------------------------------------
def test_a_second_client_streams_while_the_first_decodes(served, batched):
    """B's first token and its whole answer arrive while A's long request, sent first, is still running."""
    a = Holder(served)
    b = Raw(served.socket)
    try:
        b.send({"id": 1, "method": "completion", "params": {"params": {**LONG, "n_predict": 16}}})
        events, final = b.until(1)
        assert final["result"]["tokens_predicted"] == 16 and events
        status = _status(served)["parallel"]
        assert status["active_slots"] == 1 and status["requests"][0]["state"] == "generating", \
            "A must still be decoding after B finished"
    finally:
        b.close()
    assert a.stop()["interrupted"] is True, "A ended on its own: the two did not decode at once"


def test_both_slots_generate_in_one_status(served, batched):
    holders = [Holder(served) for _ in range(N_SLOTS)]
    try:
        status = _slots_are(served, N_SLOTS, 0)["parallel"]
        assert [r["state"] for r in status["requests"]] == ["generating"] * N_SLOTS
    finally:
        results = [holder.stop() for holder in holders]
    assert all(r["interrupted"] is True and r["tokens_predicted"] > 0 for r in results)


def test_clients_beyond_the_slots_wait_in_fifo_order(served, slots):
    """Every slot held: C then D queue; the first freed slot takes C (D still waits), the next one D."""
    holders = _hold_every_slot(served, slots)
    try:
        holders.append(Holder(served, wait_for_token=False))  # C
        _slots_are(served, slots["concurrency"], 1)
        holders.append(Holder(served, wait_for_token=False))  # D
        queued = [r["request_id"] for r in _slots_are(served, slots["concurrency"], 2)["parallel"]["requests"]
                  if r["state"] == "queued"]
        assert queued == sorted(queued), "the queue is in arrival order"
        assert holders.pop(0).stop()["interrupted"] is True
        c, d = holders[-2], holders[-1]
        c.first_event()  # C runs ...
        status = _slots_are(served, slots["concurrency"], 1)["parallel"]
        assert [r["request_id"] for r in status["requests"] if r["state"] == "queued"] == queued[1:], "... D waits"
        assert holders.pop(-2).stop()["interrupted"] is True
        d.first_event()  # C's slot went to D
        _slots_are(served, slots["concurrency"], 0)
    finally:
        for holder in holders:
            assert holder.stop()["interrupted"] is True


def test_each_client_stops_only_its_own_request(served, slots):
    a = Holder(served)
    b = Holder(served, wait_for_token=slots["concurrency"] > 1)  # with one slot, B waits behind A
    try:
        result = b.stop()  # id 1 on B's connection: B's request, whether it runs or waits
        assert result["interrupted"] is True
        for _ in range(3):
            msg = a.conn.read()
            assert msg is not None and msg.get("id") == 1 and "event" in msg, "B's stop reached A's request"
    finally:
        assert a.stop()["interrupted"] is True


def test_a_client_that_disconnects_frees_its_slot_for_the_next(served, slots):
    before = _status(served)["abandoned"]
    holders = _hold_every_slot(served, slots)
    quitter = holders.pop(0)
    waiting = Raw(served.socket)
    try:
        waiting.send({"id": 1, "method": "completion", "params": {"params": SHORT}})
        _slots_are(served, slots["concurrency"], 1)
        quitter.conn.sock.shutdown(socket.SHUT_RDWR)
        quitter.conn.close()
        _events, final = waiting.until(1)
        assert final["result"]["tokens_predicted"] == 4, "the waiting client took the freed slot"
        assert _status(served)["abandoned"] == before + 1
    finally:
        waiting.close()
        for holder in holders:
            assert holder.stop()["interrupted"] is True


def test_a_bad_request_leaves_the_other_clients_running(served, batched):
    a = Holder(served)
    b = Raw(served.socket)
    try:
        reply = b.ask({"id": 1, "method": "completion", "params": {"params": {"prompt": "x", "grammar": 'root ::= "a'}}})
        assert reply["error"]["code"] == "grammar_error"
        reply = b.ask({"id": 2, "method": "completion", "params": {"params": {"prompt": "x", "n_predict": "many"}}})
        assert reply["error"]["code"] == "invalid_params"
        b.send({"id": 3, "method": "completion", "params": {"params": SHORT}})
        assert b.until(3)[1]["result"]["tokens_predicted"] == 4
        for _ in range(3):  # A was never disturbed
            assert "event" in a.conn.read()
    finally:
        b.close()
        assert a.stop()["interrupted"] is True


def test_infer_and_infer_stream_take_slots(served, slots):
    """INFER and INFER_STREAM queue for a slot like JSON completions, and stream from it."""
    holders = _hold_every_slot(served, slots)
    text = Raw(served.socket)
    try:
        text.send("INFER_STREAM Once upon a time")
        _slots_are(served, slots["concurrency"], 1)
        holder = holders.pop(0)
        assert holder.stop()["interrupted"] is True
        assert text.read() == {"status": "ok", "message": "Streaming started"}
        tokens = []
        while not (line := text.read())["final"]:
            tokens.append(line["token"])
        assert 1 <= len(tokens) <= 8  # --n-predict 8
        holders.append(Holder(served))  # the slot is held again: INFER waits for it
        text.send("INFER The capital of France is")
        _slots_are(served, slots["concurrency"], 1)
        assert holders.pop(0).stop()["interrupted"] is True
        reply = text.read()
        assert reply["status"] == "ok" and reply["message"] == "Inference completed" and reply["data"]
        assert text.ask("INFER_STREAM")["status"] == "error", "no prompt: an error line, the slots unharmed"
    finally:
        text.close()
        for holder in holders:
            holder.stop()


def test_calls_that_need_the_whole_model_are_refused(served):
    conn = Raw(served.socket)
    try:
        for rid, (method, params) in enumerate((("bench", {"pp": 8, "tg": 8}), ("clear_cache", {}),
                                                ("remove_lora_adapters", {}),
                                                ("apply_lora_adapters", {"lora_list": []}))):
            error = conn.ask({"id": rid, "method": method, "params": params})["error"]
            assert error["code"] == "context_busy" and "--parallel 2" in error["message"], error
        for action in ("load", "save"):
            error = conn.ask({"id": action, "method": f"{action}_session", "params": {"path": "x.session"}})["error"]
            assert error["code"] == "parallel_mode"
            assert error["message"].startswith(f"Session {action} is not supported while parallel mode is enabled")
        assert conn.ask({"id": "t", "method": "tokenize", "params": {"text": "Hello world"}})["result"]["tokens"] \
            == [19556, 905], "calls beside the model still run"
    finally:
        conn.close()


# -- the client's ctx.parallel ---------------------------------------------------------------
def test_ctx_parallel_over_the_bridge_gives_the_plain_answers(served, slots, ctx):
    # prompts whose greedy continuations have no near tie (a batch computes in another order: see
    # bench/bench_parallel.py); "The sky is" parts at " endless" 0.141 / " colors" 0.129
    prompts = ["The capital of France is", "One, two, three,", "Monday, Tuesday,", "Water boils at"]
    with init_llama({"backend": "bridge", "socket": served.socket, "n_parallel": 4, "embedding": True}) as remote:
        assert remote.capabilities["server_parallel"] == slots
        assert remote._core.open_slots(4, 512).support == slots["support"]
        assert remote.parallel.enable({"n_parallel": 4}) is True  # more than the server's 2: the rest queue there
        streamed: dict[int, list[str]] = {}
        requests = [remote.parallel.completion({"prompt": p, "n_predict": 8, "temperature": 0},
                                               lambda rid, data: streamed.setdefault(rid, []).append(data["token"]))
                    for p in prompts]
        embedding = remote.parallel.embedding("Hello")
        assert remote.parallel.get_status()["n_parallel"] == 4
        results = [r.promise.result(120) for r in requests]
        assert len({r.request_id for r in requests}) == len(requests)
        for request, result in zip(requests, results, strict=True):
            assert result["tokens_predicted"] == 8
            assert "".join(streamed[request.request_id]) == result["text"], "a stream got another request's tokens"
        assert len(embedding.promise.result(120)["embedding"]) == 576
        plain = remote.completion({"prompt": prompts[0], "n_predict": 8, "temperature": 0})  # queued through the slots
        with pytest.raises(ContextBusyError):
            remote.bench(8, 8)
        with pytest.raises(ParallelModeError, match="Session save is not supported while parallel mode is enabled"):
            remote.save_session("/tmp/llamacompat-never.session")
        assert remote.parallel.disable() is True
        with pytest.raises(ContextBusyError, match="parallel mode"):  # the server's own parallel mode refuses it
            remote.bench(8, 8)
    here = [ctx.completion({"prompt": p, "n_predict": 8, "temperature": 0})["text"] for p in prompts]
    assert [r["text"] for r in results] == here
    assert plain["text"] == here[0]


def test_a_parallel_request_stopped_on_the_client_stops_only_itself(served):
    with init_llama({"backend": "bridge", "socket": served.socket, "n_parallel": 2}) as remote:
        remote.parallel.enable({"n_parallel": 2})
        first_token = threading.Event()
        first = remote.parallel.completion(LONG, lambda _rid, _data: first_token.set())
        second = remote.parallel.completion(LONG)
        assert first_token.wait(60)
        first.stop()
        assert first.promise.result(60)["interrupted"] is True
        assert not second.promise.done(), "stopping one request ended the other"
        _wait_for(lambda: any(r["state"] == "generating" for r in remote.parallel.get_status()["requests"]),
                  "the second request to generate")
        second.stop()
        assert second.promise.result(60)["interrupted"] is True
    _slots_are(served, 0, 0)


# -- LOAD and FREE --------------------------------------------------------------------------
def test_load_and_free_replace_the_pool(tmp_path, model_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(model_path, models / "copy.gguf")
    server = Served(str(tmp_path), "--parallel", "2", "--n-ctx", "4096", "--models-dir", str(models),
                    "--n-predict", "4", *ONE_THREAD)
    assert server.started, server.log()
    try:
        holder = Holder(server)
        conn = Raw(server.socket)
        assert conn.ask("LOAD copy.gguf") == {"status": "ok", "message": "Model loaded successfully"}
        _events, final = holder.conn.until(1)
        assert final["result"]["interrupted"] is True, "the old model's request settles when its pool closes"
        holder.conn.close()
        status = conn.ask("STATUS")["data"]
        assert status["model"] == str(models / "copy.gguf")
        assert status["parallel"]["n_parallel"] == 2 and status["parallel"]["requests"] == []
        assert conn.ask("INFER Hello")["status"] == "ok"
        assert conn.ask("FREE") == {"status": "ok", "message": "Resources freed"}
        assert conn.ask("STATUS")["data"]["parallel"] == {"n_parallel": 2, "active_slots": 0, "queued_requests": 0,
                                                          "requests": []}
        reply = conn.ask({"id": 1, "method": "completion", "params": {"params": SHORT}})
        assert reply["error"]["code"] == "model_load_error" and "no model loaded" in reply["error"]["message"]
        assert conn.ask({"id": 2, "method": "load", "params": {"path": "copy.gguf"}})["result"]["parallel"]["n_parallel"] == 2
        conn.send({"id": 3, "method": "completion", "params": {"params": SHORT}})
        assert conn.until(3)[1]["result"]["tokens_predicted"] == 4
        conn.close()
    finally:
        assert server.stop() == 0, server.log()


def test_sigterm_settles_running_and_queued_requests(tmp_path):
    server = Served(str(tmp_path), "--parallel", "1", "--n-ctx", "4096", *ONE_THREAD)
    assert server.started, server.log()
    holder = Holder(server)
    waiting = Raw(server.socket)
    waiting.send({"id": 1, "method": "completion", "params": {"params": SHORT}})
    _wait_for(lambda: _status(server)["parallel"]["queued_requests"] == 1, "the second request to queue")
    assert server.stop() == 0, server.log()
    _events, final = holder.conn.until(1)
    assert final["result"]["interrupted"] is True
    _events, final = waiting.until(1)
    assert "result" in final or final["error"]["code"] == "context_released", final
    holder.conn.close()
    waiting.close()


def test_each_client_keeps_its_own_strict_flag_and_warnings(served):
    """Pooled requests carry their client's strict flag and warning sink (Pool.submit's strict/warn)."""
    import warnings

    from llamacompat.errors import LlamaCompatWarning, UnsupportedFeatureError

    ignored = {**SHORT, "chat_format": 3}  # a key llamacompat ignores: a warning, or an error under strict
    with init_llama({"backend": "bridge", "socket": served.socket}) as lenient, \
            init_llama({"backend": "bridge", "socket": served.socket, "strict": True}) as strict:
        box: dict = {}

        def refused():
            try:
                strict.completion(ignored)
            except UnsupportedFeatureError as err:
                box["error"] = err

        other = threading.Thread(target=refused)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            other.start()
            result = lenient.completion(ignored)
            other.join(30)
        assert result["tokens_predicted"] == 4
        assert "chat_format" in str(box["error"].detail)
        ours = [str(w.message) for w in caught if w.category is LlamaCompatWarning]
        assert ours == ["completion: 'chat_format' is ignored (llamacompat derives it from the chat template of "
                        "'messages')"], "the lenient client gets its warning once; the strict one's error is not one"
