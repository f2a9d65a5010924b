"""Parallel mode on llama_cpp: real batching of several sequences in one context (llamacompat.parallel and
adapters/llama_cpp_batch), on the packaged model."""

from __future__ import annotations

import json
import threading
import time

import pytest

from llamacompat import init_llama
from llamacompat.errors import (
    ContextBusyError,
    ContextFullError,
    GrammarError,
    InvalidParamsError,
    ParallelModeError,
    RequestCancelledError,
)

PROMPTS = ["The capital of France is", "List three colours:", "Once upon a time", "2 + 2 ="]


@pytest.fixture(scope="module")
def pctx():
    """A context with room for 4 slots of 512 tokens; parallel mode off between tests."""
    context = init_llama({"model": "smollm2", "n_ctx": 2048, "n_parallel": 4, "n_threads": 2})
    yield context
    context.release()


@pytest.fixture
def par(pctx):
    pctx.parallel.enable({"n_parallel": 4})
    yield pctx
    pctx.parallel.disable()


def greedy(prompt: str, n: int = 12, **extra) -> dict:
    return {"prompt": prompt, "n_predict": n, "temperature": 0, **extra}


def test_parallel_greedy_results_equal_one_by_one_and_come_from_shared_steps(pctx):
    alone = [pctx.completion(greedy(p)) for p in PROMPTS]
    pctx.parallel.enable({"n_parallel": 4})
    try:
        handles = [pctx.parallel.completion(greedy(p)) for p in PROMPTS]
        together = [h.promise.result(120) for h in handles]
        batch = pctx.parallel._pool.slots.batch  # the BatchEngine counts its decodes
    finally:
        pctx.parallel.disable()
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert len({h.request_id for h in handles}) == 4
    generated = sum(r["tokens_predicted"] for r in together)
    # 4 requests x 12 tokens one by one would be 48+ decodes; batched they share steps
    assert batch.steps < generated * 0.6, (batch.steps, generated)


def test_each_stream_carries_only_its_own_text(par):
    events: dict[int, list[str]] = {}
    lock = threading.Lock()

    def on_token(request_id, data):
        with lock:
            events.setdefault(request_id, []).append(data["token"])

    handles = [par.parallel.completion(greedy(p, 16), on_token) for p in PROMPTS]
    for h in handles:
        result = h.promise.result(120)
        assert "".join(events[h.request_id]) == result["text"]
        assert result["accumulated_text"] == result["text"] or result["text"] == ""


def test_stopping_one_request_leaves_the_others_running(par):
    long = par.parallel.completion(greedy("Count from one to a thousand:", 400, ignore_eos=True))
    short = [par.parallel.completion(greedy(p, 8)) for p in PROMPTS[:2]]
    while par.parallel.get_status()["active_slots"] < 3:
        time.sleep(0.01)
    long.stop()
    stopped = long.promise.result(60)
    assert stopped["interrupted"] and stopped["tokens_predicted"] < 400
    for h in short:
        done = h.promise.result(60)
        assert not done["interrupted"] and done["tokens_predicted"] == 8


def test_a_failing_request_fails_alone(par):
    too_long = par.parallel.completion({"prompt": "word " * 600, "n_predict": 4})  # a slot holds 2048 / 4 = 512
    bad_grammar = par.parallel.completion(greedy("x", grammar="root ::= ("))
    good = par.parallel.completion(greedy(PROMPTS[0], 6))
    with pytest.raises(ContextFullError):
        too_long.promise.result(60)
    with pytest.raises(GrammarError):
        bad_grammar.promise.result(60)
    assert good.promise.result(60)["tokens_predicted"] == 6


def test_every_request_follows_its_own_schema(par):
    schemas = [{"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
                "additionalProperties": False},
               {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}]
    handles = [par.parallel.completion({"prompt": "JSON please:", "n_predict": 40, "temperature": 0.7, "seed": i,
                                        "json_schema": schema}) for i, schema in enumerate(schemas)]
    plain = par.parallel.completion(greedy(PROMPTS[2], 10))
    obj, arr = (json.loads(h.promise.result(120)["text"]) for h in handles)
    assert set(obj) == {"name"} and isinstance(obj["name"], str)
    assert isinstance(arr, list) and 2 <= len(arr) <= 3 and all(isinstance(v, int) for v in arr)
    assert plain.promise.result(60)["tokens_predicted"] == 10


def test_probabilities_belong_to_their_request(par):
    a = par.parallel.completion(greedy(PROMPTS[0], 5, n_probs=3))
    b = par.parallel.completion(greedy(PROMPTS[1], 5, n_probs=3))
    for h in (a, b):
        result = h.promise.result(60)
        probs = result["completion_probabilities"]
        assert len(probs) == 5
        # greedy: the drawn token is the most probable one at its position
        assert "".join(p["content"] for p in probs) == result["text"]
        assert all(p["probs"][0]["tok_str"] == p["content"] for p in probs if p["content"])


def test_a_slot_reuses_the_prefix_it_holds(par):
    prefix = "You are a helpful assistant. Answer briefly and clearly. Question: "
    first = par.parallel.completion(greedy(prefix + "what is red?", 4)).promise.result(60)
    second = par.parallel.completion(greedy(prefix + "what is blue?", 4)).promise.result(60)
    assert first["timings"]["cache_n"] == 0
    assert second["timings"]["cache_n"] >= len(prefix) // 6  # the shared prefix came from that slot's cache


def test_status_reports_slots_queue_and_states(par):
    seen: list[dict] = []
    subscription = par.parallel.subscribe_to_status(seen.append)
    handles = [par.parallel.completion(greedy(p, 30, ignore_eos=True)) for p in PROMPTS + PROMPTS[:2]]
    status = par.parallel.get_status()
    assert status["n_parallel"] == 4 and status["active_slots"] + status["queued_requests"] <= 6
    for h in handles:
        h.promise.result(120)
    subscription.remove()
    states = {r["state"] for s in seen for r in s["requests"]}
    assert {"queued", "generating", "done"} <= states
    assert states <= {"queued", "processing_prompt", "generating", "done"}
    final = par.parallel.get_status()
    assert final["active_slots"] == 0 and final["queued_requests"] == 0
    done = [r for s in seen for r in s["requests"] if r["state"] == "done"]
    assert all(r["tokens_generated"] == 30 and r["prompt_length"] > 0 for r in done)


def test_plain_calls_while_parallel_mode_is_on(par):
    result = par.completion(greedy(PROMPTS[0], 4))
    assert result["tokens_predicted"] == 4
    with pytest.raises(ParallelModeError, match="Session save is not supported while parallel mode is enabled"):
        par.save_session("/tmp/never-written.bin")
    with pytest.raises(ContextBusyError):
        par.clear_cache()
    with pytest.raises(ParallelModeError):
        par.stream(greedy(PROMPTS[0]))


def test_disable_settles_every_promise_and_plain_mode_works_after(pctx):
    pctx.parallel.enable({"n_parallel": 2})
    running = [pctx.parallel.completion(greedy(p, 500, ignore_eos=True)) for p in PROMPTS]
    embedding = pctx.parallel.embedding("queued last")
    while sum(r["tokens_generated"] > 0 for r in pctx.parallel.get_status()["requests"]) < 2:
        time.sleep(0.01)
    assert pctx.parallel.disable()
    results = [h.promise.result(0) for h in running]  # settled before disable returned
    assert all(r["interrupted"] for r in results)
    assert sum(r["tokens_predicted"] == 0 for r in results) == 2  # the two that waited never ran
    with pytest.raises((RequestCancelledError, Exception)):
        embedding.promise.result(0)
    after = pctx.completion(greedy(PROMPTS[0], 4))
    assert after["tokens_predicted"] == 4 and not after["interrupted"]
    with pytest.raises(ParallelModeError, match="Parallel mode not enabled"):
        pctx.parallel.completion(greedy("x"))


def test_release_with_requests_in_flight_settles_them(model_path):
    ctx = init_llama({"model": model_path, "n_ctx": 1024, "n_parallel": 2, "n_threads": 2})
    ctx.parallel.enable({"n_parallel": 2})
    handles = [ctx.parallel.completion(greedy(p, 300, ignore_eos=True)) for p in PROMPTS[:3]]
    time.sleep(0.2)
    ctx.release()
    for h in handles:
        result = h.promise.result(0)
        assert result["interrupted"] and result["context_released"]


def test_stop_ends_a_long_prompt_between_chunks(model_path):
    ctx = init_llama({"model": model_path, "n_ctx": 8192, "n_parallel": 2, "n_batch": 64, "n_threads": 2})
    try:
        ctx.parallel.enable({"n_parallel": 2, "n_batch": 64})
        handle = ctx.parallel.completion({"prompt": "many words here " * 900, "n_predict": 4})
        while ctx.parallel.get_status()["active_slots"] < 1:
            time.sleep(0.005)
        time.sleep(0.1)
        handle.stop()
        result = handle.promise.result(30)
        assert result["interrupted"] and result["tokens_predicted"] == 0
        assert 0 < result["timings"]["prompt_n"] < 3000  # part of the prompt was evaluated, not all of it
    finally:
        ctx.release()


def test_enable_checks_its_config(pctx):
    with pytest.raises(InvalidParamsError, match="reinitialize the context with n_parallel >= 5"):
        pctx.parallel.enable({"n_parallel": 5})
    with pytest.raises(InvalidParamsError, match="n_batch"):
        pctx.parallel.enable({"n_batch": 0})
    with pytest.raises(InvalidParamsError, match="unknown keys"):
        pctx.parallel.enable({"slots": 2})
    assert not pctx.parallel.enabled


def test_parallel_embeddings_equal_plain_ones(model_path):
    ctx = init_llama({"model": model_path, "n_ctx": 1024, "n_parallel": 2, "embedding": True, "n_threads": 2})
    try:
        plain = ctx.embedding("a red apple")["embedding"]
        ctx.parallel.enable({"n_parallel": 2})
        generating = ctx.parallel.completion(greedy(PROMPTS[0], 30, ignore_eos=True))
        handle = ctx.parallel.embedding("a red apple")
        ranked = ctx.parallel.rerank("fruit", ["a red apple", "a steel bridge"]).promise.result(60)
        assert handle.promise.result(60)["embedding"] == pytest.approx(plain, abs=1e-4)
        assert ranked[0]["document"] == "a red apple"
        assert generating.promise.result(60)["tokens_predicted"] == 30
    finally:
        ctx.release()


def test_a_callback_that_raises_fails_its_own_request(par):
    def explode(_request_id, _data):
        raise RuntimeError("callback broke")

    bad = par.parallel.completion(greedy(PROMPTS[0], 50, ignore_eos=True), explode)
    good = par.parallel.completion(greedy(PROMPTS[1], 8))
    with pytest.raises(RuntimeError, match="callback broke"):
        bad.promise.result(60)
    assert good.promise.result(60)["tokens_predicted"] == 8
