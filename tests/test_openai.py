"""backend: "openai" against llama-cpp-python's own OpenAI-compatible server (a real server no one here wrote).

The conformance suite runs over it; fault tests kill it mid-stream, freeze it
(read timeout), put a 503-answering proxy in front of it (retries) and use a
wrong API key. Request-building for the other server dialects and the parsing
of chat deltas (tool calls, reasoning) are checked on httpx2's MockTransport.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
import warnings

import httpx2
import pytest

from llamacompat import (
    AuthenticationError,
    BackendUnavailableError,
    ContextFullError,
    GrammarError,
    InvalidParamsError,
    LlamaCompatWarning,
    ModelLoadError,
    RequestTimeoutError,
    UnsupportedFeatureError,
    init_llama,
    init_llama_async,
)
from llamacompat import params as P
from llamacompat.conformance import CHECKS, Kit, NotApplicable
from llamacompat.context import LlamaContext
from llamacompat.openai.core import OPENAI_FIELDS, OpenAICore
from llamacompat.openai.dialects import DIALECTS, ServerFacts
from llamacompat.openai.http import HttpSession, http_error
from llamacompat.openai.request import plan_completion

from .openai_helpers import API_KEY, FaultProxy, LlamaCppPythonServer

GREEDY = {"temperature": 0}
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def server():
    srv = LlamaCppPythonServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ctx(server):
    context = init_llama(server.params())
    yield context
    context.release()


@pytest.fixture(scope="module")
def local():
    # llama-cpp-python's server runs without flash attention (its Llama default); so does this twin, else the
    # probabilities differ by about 0.01 (0.146 vs 0.157 for ' the' after PROMPT, where FA is on with 'auto')
    context = init_llama({"n_ctx": 1024, "embedding": True, "flash_attn_type": "off"})
    yield context
    context.release()


def _alive(ctx) -> None:
    result = ctx.completion({"prompt": PROMPT, "n_predict": 2, **GREEDY})
    assert result["tokens_predicted"] == 2 and not result["interrupted"]


# -- the conformance suite ----------------------------------------------------
@pytest.fixture(scope="module")
def openai_kit(server):
    kit = Kit("openai", {"base_url": server.base_url, "api_key": server.api_key})
    yield kit
    kit.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance_against_llama_cpp_python_server(name, openai_kit):
    try:
        CHECKS[name].run(openai_kit)
    except NotApplicable:
        assert name == "sessions", f"{name} is not applicable on the openai backend"


# -- what the server is and says ----------------------------------------------
def test_probe_finds_the_dialect_and_the_model_facts(ctx, server):
    caps = ctx.capabilities
    assert caps["backend"] == "openai" and caps["server"] == "llama-cpp-python"
    features = caps["features"]
    assert features["grammar"] == features["top_k"] == features["min_p"] == features["mirostat"] == "native"
    assert features["typical_p"] == features["dry"] == features["ignore_eos"] == "missing"
    assert features["session"] == features["bench"] == features["prefix_cache"] == "missing"
    # its server cuts the stream in progress when another request comes: parallel requests take turns
    assert features["parallel"] == "emulated"
    assert ctx.model["n_vocab"] == 49152 and ctx.model["n_embd"] == 576  # read from the served GGUF file
    assert ctx._core.facts.model == server.model


def test_probabilities_match_in_process_llama_cpp(ctx, local):
    """The same model through the server and in process: the same top tokens with (numerically) the same
    probabilities. Texts are not compared whole: batch sizes and threads differ, so near ties may break apart."""
    for prompt in (PROMPT, "Here is a short poem about the sea:\n\n", "def fibonacci(n):"):
        request = {"prompt": prompt, "n_predict": 1, "n_probs": 3, **GREEDY}
        remote, here = ctx.completion(request), local.completion(request)
        assert remote["text"] == here["text"] and remote["tokens_evaluated"] == here["tokens_evaluated"]
        (a,), (b,) = remote["completion_probabilities"], here["completion_probabilities"]
        assert a["content"] == b["content"] == remote["text"]
        assert [p["tok_str"] for p in a["probs"]] == [p["tok_str"] for p in b["probs"]]
        assert all(math.isclose(p["prob"], q["prob"], abs_tol=0.01) for p, q in zip(a["probs"], b["probs"], strict=True))


def test_tokens_and_embeddings_match_in_process(ctx, local, server):
    text = "Café naïve 日本語 🎉 tokens"
    assert ctx.tokenize(text)["tokens"] == local.tokenize(text)["tokens"]
    with init_llama(server.params(embedding=True)) as ectx:
        remote = ectx.embedding("The cat sat on the mat.")["embedding"]
    here = local.embedding("The cat sat on the mat.")["embedding"]
    cosine = sum(a * b for a, b in zip(remote, here, strict=True))
    assert len(remote) == len(here) == 576 and cosine > 0.999


def test_chat_messages_go_to_the_chat_endpoint(ctx):
    events = []
    result = ctx.completion({"messages": [{"role": "system", "content": "Answer in one short sentence."},
                                          {"role": "user", "content": "Which city is the capital of France?"}],
                             "n_predict": 24, **GREEDY}, events.append)
    assert "Paris" in result["content"] and result["text"] == result["content"]
    assert "".join(e["token"] for e in events) == result["text"]
    assert events[-1]["content"] == result["content"]  # cumulative, as llama.rn streams it
    assert result["tokens_predicted"] >= len(events)


def test_stop_string_is_cut_and_reported(ctx):
    full = ctx.completion({"prompt": PROMPT, "n_predict": 16, **GREEDY})["text"]
    word = full.split()[2]
    result = ctx.completion({"prompt": PROMPT, "n_predict": 16, "stop": [word], **GREEDY})
    assert result["stopped_word"] and result["stopping_word"] == word
    assert result["text"] == full[: full.index(word)]


def test_server_defaults_do_not_leak_in(ctx):
    """llama-cpp-python's server defaults to repeat_penalty 1.1; llama.rn's default 1.0 is sent explicitly."""
    plan = plan_completion({"prompt": "x"}, ctx._core.facts, False, None)
    assert plan.body["repeat_penalty"] == 1.0 and plan.body["top_k"] == 40 and plan.body["min_p"] == 0.05
    assert plan.body["max_tokens"] is None  # n_predict -1; llama-cpp-python's own default would be 16 tokens
    assert "stop" not in plan.body  # matched on the client, so stopping_word is known


# -- bad input never reaches (and never kills) the server ---------------------
def test_ids_outside_the_vocabulary_are_refused_before_sending(ctx):
    """llama-cpp-python's server aborts on such an id (std::out_of_range): it must never see one."""
    with pytest.raises(InvalidParamsError, match=r"tokens\[0\]"):
        ctx.detokenize([49152])
    with pytest.raises(InvalidParamsError, match="logit_bias"):
        ctx.completion({"prompt": PROMPT, "logit_bias": [[10**6, -1.0]]})
    _alive(ctx)


def test_grammars_are_checked_before_sending(ctx):
    with pytest.raises(GrammarError, match="line 1"):
        ctx.completion({"prompt": PROMPT, "grammar": 'root ::= "a'})
    with pytest.raises(GrammarError, match="no-such-token"):  # both of these abort llama-cpp-python's server
        ctx.completion({"prompt": PROMPT, "grammar": "root ::= <|no-such-token-here|>"})
    with pytest.raises(UnsupportedFeatureError, match="aborts on them"):
        ctx.completion({"prompt": PROMPT, "grammar": "root ::= <|im_end|>"})
    _alive(ctx)


def test_grammar_tokens_are_checked_where_the_server_takes_them():
    vocab = {"<|im_end|>": [2], "<|nope|>": [27, 91, 77]}
    facts = _facts("llama-server", n_vocab=100)
    plan = plan_completion({"prompt": "x", "grammar": "root ::= <|im_end|> | <[7]>"}, facts, False, vocab.__getitem__)
    assert plan.body["grammar"] == "root ::= <|im_end|> | <[7]>"
    with pytest.raises(GrammarError, match="not one token"):
        plan_completion({"prompt": "x", "grammar": "root ::= <|nope|>"}, facts, False, vocab.__getitem__)
    with pytest.raises(GrammarError, match="outside the vocabulary"):
        plan_completion({"prompt": "x", "grammar": "root ::= <[100]>"}, facts, False, vocab.__getitem__)


def test_a_prompt_longer_than_the_server_context_is_context_full(ctx):
    with pytest.raises(ContextFullError, match="maximum context length is 1024"):
        ctx.completion({"prompt": "word " * 1500, "n_predict": 4})
    _alive(ctx)


def test_missing_features_warn_or_raise_when_strict(ctx, server):
    with pytest.warns(LlamaCompatWarning, match="typical_p"):
        ctx.completion({"prompt": PROMPT, "n_predict": 1, "typical_p": 0.5})
    with init_llama(server.params(strict=True)) as strict:
        with pytest.raises(UnsupportedFeatureError, match="typical_p"):
            strict.completion({"prompt": PROMPT, "n_predict": 1, "typical_p": 0.5})
    for call in (lambda: ctx.bench(8, 4), lambda: ctx.save_session("/tmp/x.session"),
                 lambda: ctx.get_formatted_chat([{"role": "user", "content": "x"}])):
        with pytest.raises(UnsupportedFeatureError):
            call()


def test_unknown_model_name_is_a_model_load_error(server):
    with pytest.raises(ModelLoadError, match="does not serve 'gpt-9'.*serves"):
        init_llama(server.params(model="gpt-9"))


# -- faults against the real server -------------------------------------------
def test_wrong_api_key_is_an_authentication_error(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(AuthenticationError, match="401.*api_key"):
        init_llama(server.params(api_key="wrong-key"))
    with pytest.raises(AuthenticationError):
        init_llama({**server.params(), "api_key": None})


def test_no_server_is_backend_unavailable(server):
    port = server.port + 1 if server.port < 65535 else server.port - 1
    started = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="no OpenAI-compatible server"):
        init_llama({"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0})
    assert time.perf_counter() - started < 5


def test_server_killed_mid_stream():
    private = LlamaCppPythonServer()
    try:
        ctx = init_llama(private.params(max_retries=0))
        got_token = threading.Event()
        box = {}

        def run():
            try:
                ctx.completion({"prompt": "Tell me a long story.", "n_predict": -1}, lambda _e: got_token.set())
            except Exception as err:  # noqa: BLE001 - inspected below
                box["error"] = err

        worker = threading.Thread(target=run)
        worker.start()
        assert got_token.wait(60)
        private.kill()
        worker.join(30)
        assert isinstance(box.get("error"), BackendUnavailableError), box
        with pytest.raises(BackendUnavailableError):  # the context is usable: it says the server is gone
            ctx.completion({"prompt": PROMPT, "n_predict": 1})
        ctx.release()
    finally:
        private.stop()


def test_a_frozen_server_times_out_and_the_context_recovers():
    private = LlamaCppPythonServer()
    try:
        ctx = init_llama(private.params(timeout=1.5))
        got_token = threading.Event()

        def freeze(_event):
            if not got_token.is_set():
                got_token.set()
                private.pause()

        with pytest.raises(RequestTimeoutError, match="read timeout"):
            # SmolLM2's end tokens (0, 2) banned: an early end let the whole reply reach the socket before the pause
            ctx.completion({"prompt": "Tell me a long story.", "n_predict": 2000,
                            "logit_bias": [[0, False], [2, False]]}, freeze)
        private.resume()
        _alive(ctx)
        ctx.release()
    finally:
        private.stop()


def test_503_is_retried_then_succeeds(server):
    proxy = FaultProxy(server.port, busy=2)
    try:
        with init_llama({**server.params(), "base_url": proxy.base_url, "max_retries": 2}) as ctx:
            assert proxy.connections == 3  # two 503s, then through
            _alive(ctx)
    finally:
        proxy.close()
    proxy = FaultProxy(server.port, busy=10)
    try:
        with pytest.raises(BackendUnavailableError, match="503.*server busy"):
            init_llama({**server.params(), "base_url": proxy.base_url, "max_retries": 1})
        assert proxy.connections == 2
    finally:
        proxy.close()


def test_the_async_context_keeps_the_event_loop_running_during_a_slow_reply(server):
    """tokenize, detokenize and get_formatted_chat are network round trips here: they must not block the loop."""
    proxy = FaultProxy(server.port, busy=0)

    async def main() -> tuple[int, str]:
        actx = await init_llama_async({**server.params(), "base_url": proxy.base_url})
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        proxy.delay = 0.5  # each reply half a second late: about a second for the two calls
        try:
            tokens = (await actx.tokenize("Hello there"))["tokens"]
            text = await actx.detokenize(tokens)
        finally:
            proxy.delay = 0.0
            ticker.cancel()
            await actx.release()
        return ticks, text

    try:
        ticks, text = asyncio.run(main())
    finally:
        proxy.close()
    assert text == "Hello there"
    assert ticks >= 10, f"the event loop ran {ticks} times in about a second of waiting for the server"


# -- retry policy and error mapping (MockTransport) ---------------------------
def _session(handler, retries: int = 2) -> HttpSession:
    return HttpSession("http://test", None, timeout=5, connect_timeout=5, max_retries=retries,
                       max_connections=2, transport=httpx2.MockTransport(handler))


@pytest.mark.parametrize("status,tries", [(400, 1), (404, 1), (422, 1), (500, 1), (429, 3), (503, 3)])
def test_only_429_and_503_are_retried(status, tries, monkeypatch):
    monkeypatch.setattr("llamacompat.openai.http._BACKOFF_S", 0.0)
    calls = []

    def handler(request):
        calls.append(request)
        return httpx2.Response(status, json={"error": {"message": "nope"}})

    with pytest.raises(Exception) as caught:
        _session(handler).get("/v1/models")
    assert len(calls) == tries and "nope" in str(caught.value)


@pytest.mark.parametrize("status,body,error", [
    (401, {"error": {"message": "Invalid API Key"}}, AuthenticationError),
    (404, {"error": {"message": "The model `x` does not exist", "code": "model_not_found"}}, ModelLoadError),
    (404, {"detail": "Not Found"}, UnsupportedFeatureError),
    (400, {"error": {"message": "This model's maximum context length is 8 tokens", "code": "context_length_exceeded"}},
     ContextFullError),
    (400, {"error": {"message": "the request exceeds the available context size", "type": "exceed_context_size_error"}},
     ContextFullError),
    (400, {"error": {"message": "bad temperature"}}, InvalidParamsError),
    (501, {"error": {"message": "not implemented"}}, UnsupportedFeatureError),
    (503, {"error": {"message": "loading"}}, BackendUnavailableError),
])
def test_http_errors_map_to_the_hierarchy(status, body, error):
    mapped = http_error(status, json.dumps(body), "POST /v1/completions")
    assert type(mapped) is error and str(status) in mapped.detail


# -- other dialects: request bodies and chat deltas ---------------------------
def _facts(dialect: str, **kw) -> ServerFacts:
    return ServerFacts("m", DIALECTS[dialect], n_vocab=kw.pop("n_vocab", 100), **kw)


def test_llama_server_body_carries_every_sampling_param():
    plan = plan_completion({"prompt": "x", "dry_multiplier": 0.8, "ignore_eos": True, "xtc_probability": 0.3,
                            "n_predict": -1}, _facts("llama-server"), True, None)
    body = plan.body
    assert body["dry_multiplier"] == 0.8 and body["ignore_eos"] is True and body["xtc_probability"] == 0.3
    assert body["repeat_penalty"] == 1.0 and body["repeat_last_n"] == 64 and body["cache_prompt"] is True
    assert "dry_penalty_last_n" not in body  # -1 is its default, but its range check refuses it
    assert body["max_tokens"] == -1


def test_vllm_body_and_missing_grammar():
    plan = plan_completion({"prompt": "x", "top_k": 0, "penalty_repeat": 1.2, "json_schema": {"type": "integer"}},
                           _facts("vllm"), True, None)
    assert plan.body["top_k"] == -1 and plan.body["repetition_penalty"] == 1.2
    assert plan.body["response_format"]["json_schema"]["schema"] == {"type": "integer"}
    assert "max_tokens" not in plan.body
    with pytest.raises(UnsupportedFeatureError, match="refused"):
        plan_completion({"prompt": "x", "grammar": 'root ::= "a"'}, _facts("vllm"), False, None)


def test_generic_openai_warns_about_extensions():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_completion({"prompt": "x", "top_k": 5, "min_p": 0.1, "seed": 3}, _facts("openai"), False, None)
    said = " ".join(str(w.message) for w in caught)
    assert "top_k" in said and "min_p" in said
    assert "top_k" not in plan.body and plan.body["seed"] == 3 and plan.body["temperature"] == 0.8
    # "penalties" is half there: the OpenAI frequency penalty is sent silently, repeat_penalty is not taken
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = plan_completion({"prompt": "x", "penalty_freq": 0.5}, _facts("openai"), True, None)
    assert plan.body["frequency_penalty"] == 0.5
    with pytest.raises(UnsupportedFeatureError, match="penalty_repeat"):
        plan_completion({"prompt": "x", "penalty_repeat": 1.2}, _facts("openai"), True, None)


def _sse(*chunks) -> bytes:
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


def _mock_context(stream: bytes) -> LlamaContext:
    def handler(request):
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=stream)

    params = P.validate({"backend": "openai"}, P.CONTEXT_FIELDS, "init_llama", extra=OPENAI_FIELDS)
    return LlamaContext(OpenAICore(_session(handler), _facts("llama-server"), params))


def test_llama_server_requests_carry_the_contexts_lora_adapters():
    """Every adapter the server loaded is named in each request, at this context's scale or 0; nothing global."""
    adapters = [{"id": 0, "path": "/srv/a.gguf", "scale": 1.0}, {"id": 1, "path": "/srv/b.gguf", "scale": 0.0}]
    seen: list[tuple[str, str, object]] = []

    def handler(request):
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        if request.url.path == "/lora-adapters":
            return httpx2.Response(200, json=adapters)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=_sse({"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}))

    params = P.validate({"backend": "openai"}, P.CONTEXT_FIELDS, "init_llama", extra=OPENAI_FIELDS)
    core = OpenAICore(_session(handler), _facts("llama-server"), params)
    core.probe_lora()

    def sent() -> object:
        ctx.completion({"prompt": "x", "n_predict": 1})
        body = [body for method, path, body in seen if path == "/v1/completions"][-1]
        assert body["cache_prompt"] is False  # its prompt cache mixes LoRA settings (test_llama_server)
        return body["lora"]

    with LlamaContext(core) as ctx:
        assert ctx.capabilities["features"]["lora"] == "native"
        assert ctx.get_loaded_lora_adapters() == [{"path": "/srv/a.gguf", "scaled": 1.0}]  # the server's own setting
        assert sent() == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
        ctx.apply_lora_adapters([{"path": "b.gguf", "scaled": 0.5}])  # not a file here: the one adapter of that name
        assert sent() == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.5}]
        with pytest.raises(InvalidParamsError, match="did not load the LoRA adapter 'c.gguf'.*start it with --lora c.gguf"):
            ctx.apply_lora_adapters([{"path": "b.gguf"}, {"path": "c.gguf"}])
        assert ctx.get_loaded_lora_adapters() == [{"path": "b.gguf", "scaled": 0.5}]
        ctx.remove_lora_adapters()
        assert ctx.get_loaded_lora_adapters() == [] and sent() == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
        adapters.append({"id": 2, "path": "/other/b.gguf", "scale": 1.0})  # the server restarted with one more
        with pytest.raises(InvalidParamsError, match="'b.gguf' is ambiguous.*'/srv/b.gguf', '/other/b.gguf'"):
            ctx.apply_lora_adapters([{"path": "b.gguf"}])
        ctx.apply_lora_adapters([{"path": "/other/b.gguf", "scaled": 2.0}])  # listed again at each apply
        assert sent() == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}, {"id": 2, "scale": 2.0}]
    assert all(method == "GET" for method, path, _ in seen if path == "/lora-adapters")


def test_lora_on_a_server_without_adapter_endpoints_is_refused():
    params = P.validate({"backend": "openai"}, P.CONTEXT_FIELDS, "init_llama", extra=OPENAI_FIELDS)
    for dialect in ("vllm", "llama-server"):  # a llama-server without GET /lora-adapters (404) too
        core = OpenAICore(_session(lambda request: httpx2.Response(404)), _facts(dialect), params)
        core.probe_lora()
        assert core.capabilities["features"]["lora"] == "missing" and core.get_loaded_lora_adapters() == []
    for call in (lambda: core.apply_lora_adapters([{"path": "a.gguf"}]), core.remove_lora_adapters):
        with pytest.raises(UnsupportedFeatureError, match="takes no LoRA adapters over its API"):
            call()
    with pytest.warns(LlamaCompatWarning, match="'lora' / 'lora_list' ignored"):  # init params: as other params
        core.apply_lora_adapters([{"path": "a.gguf"}], "init_llama")
    with pytest.raises(InvalidParamsError, match="must be a list"):  # checked as everywhere first
        core.apply_lora_adapters("a.gguf")


def test_chat_deltas_become_llama_rn_fields():
    stream = _sse(
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Think"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "ing."}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                                             "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {"choices": [], "usage": {"prompt_tokens": 30, "completion_tokens": 12},
         "timings": {"cache_n": 10, "prompt_ms": 5.0, "predicted_ms": 20.0}},
    )
    with _mock_context(stream) as ctx:
        events = []
        result = ctx.completion({"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                 "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]},
                                events.append)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "id": "call_1"}
    assert result["tool_calls"] == [call] and result["reasoning_content"] == "Thinking."
    assert events[-1]["tool_calls"] == [call] and events[0]["reasoning_content"] == "Think"
    assert result["stopped_eos"] and result["tokens_predicted"] == 12 and result["tokens_evaluated"] == 30
    assert result["timings"]["cache_n"] == 10 and result["timings"]["prompt_n"] == 20
    assert result["timings"]["predicted_per_second"] == pytest.approx(12 / 20.0 * 1000)


def test_an_error_inside_the_stream_is_raised():
    stream = _sse({"choices": [{"index": 0, "text": "Hi"}]},
                  {"error": {"code": 500, "message": "decode failed", "type": "server_error"}})
    with _mock_context(stream) as ctx:
        with pytest.raises(Exception, match="decode failed"):
            ctx.completion({"prompt": "x"})
        assert not ctx.released


def test_key_comes_from_the_environment(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    with init_llama({"backend": "openai", "base_url": server.base_url}) as ctx:
        _alive(ctx)
