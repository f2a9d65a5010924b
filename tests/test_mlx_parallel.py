"""Parallel mode on mlx: requests decoded together by mlx-lm's BatchGenerator (adapters/mlx/batch.py), on the
packaged model through MLX's CPU build."""

from __future__ import annotations

import json
import threading
import time

import pytest

pytest.importorskip("mlx_lm")

from llamacompat import init_llama  # noqa: E402
from llamacompat.errors import ContextFullError, GenerationError, GrammarError  # noqa: E402

PROMPTS = ["The capital of France is", "List three colours:", "Once upon a time", "2 + 2 ="]


@pytest.fixture(scope="module")
def mctx():
    """An mlx context with room for 4 slots of 512 tokens; parallel mode off between tests."""
    context = init_llama({"backend": "mlx", "model": "smollm2", "n_ctx": 2048, "n_parallel": 4})
    yield context
    context.release()


@pytest.fixture
def par(mctx):
    mctx.parallel.enable({"n_parallel": 4})
    yield mctx
    mctx.parallel.disable()


def greedy(prompt: str, n: int = 8, **extra) -> dict:
    return {"prompt": prompt, "n_predict": n, "temperature": 0, **extra}


def test_parallel_mode_is_native_on_mlx(mctx):
    assert mctx.capabilities["features"]["parallel"] == "native"


def test_greedy_results_equal_one_by_one_and_come_from_shared_steps(mctx):
    alone = [mctx.completion(greedy(p)) for p in PROMPTS]
    mctx.parallel.enable({"n_parallel": 4})
    try:
        handles = [mctx.parallel.completion(greedy(p)) for p in PROMPTS]
        together = [h.promise.result(300) for h in handles]
        batch = mctx.parallel._pool.slots.batch  # the MlxBatch counts its decoding steps
    finally:
        mctx.parallel.disable()
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert [r["tokens_cached"] for r in together] == [r["tokens_cached"] for r in alone]
    generated = sum(r["tokens_predicted"] for r in together)
    assert batch.steps < generated * 0.6, (batch.steps, generated)  # one by one would take one step a token


def test_each_stream_carries_only_its_own_text(par):
    events: dict[int, list[str]] = {}
    lock = threading.Lock()

    def on_token(request_id, data):
        with lock:
            events.setdefault(request_id, []).append(data["token"])

    handles = [par.parallel.completion(greedy(p, 10), on_token) for p in PROMPTS]
    texts = set()
    for h in handles:
        result = h.promise.result(300)
        assert "".join(events[h.request_id]) == result["text"]
        texts.add(result["text"])
    assert len(texts) == len(PROMPTS)


def test_stopping_one_request_leaves_the_others_running(par):
    long = par.parallel.completion(greedy("Count from one to a thousand:", 400, ignore_eos=True))
    short = [par.parallel.completion(greedy(p, 6)) for p in PROMPTS[:2]]
    while par.parallel.get_status()["active_slots"] < 3:
        time.sleep(0.01)
    long.stop()
    stopped = long.promise.result(120)
    assert stopped["interrupted"] and stopped["tokens_predicted"] < 400
    for h in short:
        done = h.promise.result(120)
        assert not done["interrupted"] and done["tokens_predicted"] == 6


def test_a_stop_string_ends_its_request_with_a_consistent_cache(par):
    stopped = par.parallel.completion(greedy(PROMPTS[0], 12, stop=["."]))
    other = par.parallel.completion(greedy(PROMPTS[1], 6))
    result = stopped.promise.result(120)
    assert result["stopped_word"] and "." not in result["text"]
    # n_past is the prompt and the tokens evaluated before the last one handed out
    assert result["tokens_cached"] == result["tokens_evaluated"] + result["tokens_predicted"] - 1
    assert other.promise.result(120)["tokens_predicted"] == 6


def test_a_failing_request_fails_alone(par):
    too_long = par.parallel.completion({"prompt": "word " * 600, "n_predict": 4})  # a slot holds 2048 / 4 = 512
    bad_grammar = par.parallel.completion(greedy("x", grammar="root ::= ("))
    good = par.parallel.completion(greedy(PROMPTS[0], 6))
    with pytest.raises(ContextFullError):
        too_long.promise.result(120)
    with pytest.raises(GrammarError):
        bad_grammar.promise.result(120)
    assert good.promise.result(120)["tokens_predicted"] == 6


def test_every_request_follows_its_own_grammar(par):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
    arr = par.parallel.completion({"prompt": "JSON please:", "n_predict": 30, "temperature": 0.7, "seed": 1,
                                   "json_schema": schema})
    yes_no = par.parallel.completion(greedy("Is the sky blue?", 4, grammar='root ::= "yes" | "no"'))
    plain = par.parallel.completion(greedy(PROMPTS[2], 8))
    value = json.loads(arr.promise.result(300)["text"])
    assert isinstance(value, list) and 2 <= len(value) <= 3 and all(isinstance(v, int) for v in value)
    assert yes_no.promise.result(120)["text"] in ("yes", "no")
    assert plain.promise.result(120)["tokens_predicted"] == 8


def test_probabilities_belong_to_their_request(par):
    a = par.parallel.completion(greedy(PROMPTS[0], 4, n_probs=3))
    b = par.parallel.completion(greedy(PROMPTS[1], 4, n_probs=3))
    for h in (a, b):
        result = h.promise.result(120)
        probs = result["completion_probabilities"]
        assert len(probs) == 4
        assert "".join(p["content"] for p in probs) == result["text"]
        # greedy: the drawn token is the most probable one at its position
        assert all(p["probs"][0]["tok_str"] == p["content"] for p in probs if p["content"])


def test_a_seed_reproduces_its_request_whatever_runs_beside_it(par):
    sampled = {"prompt": PROMPTS[2], "n_predict": 8, "temperature": 1.0, "seed": 7}
    first = par.parallel.completion(sampled)
    noise = par.parallel.completion({**sampled, "seed": 8, "prompt": PROMPTS[3]})
    text = first.promise.result(120)["text"]
    noise.promise.result(120)
    assert par.parallel.completion(sampled).promise.result(120)["text"] == text  # now alone in the batch


def test_a_slot_reuses_the_prefix_it_holds(par):
    prefix = "You are a helpful assistant. Answer briefly and clearly. Question: "
    first = par.parallel.completion(greedy(prefix + "what is red?", 3)).promise.result(120)
    second = par.parallel.completion(greedy(prefix + "what is blue?", 3)).promise.result(120)
    assert first["timings"]["cache_n"] == 0
    assert second["timings"]["cache_n"] >= len(prefix) // 6


def test_stop_ends_a_long_prompt_between_chunks(model_path):
    with init_llama({"backend": "mlx", "model": model_path, "n_ctx": 8192, "n_parallel": 2, "n_batch": 32}) as ctx:
        ctx.parallel.enable({"n_parallel": 2, "n_batch": 32})
        long = ctx.parallel.completion({"prompt": "word " * 2000, "n_predict": 4})
        while ctx.parallel.get_status()["requests"][0]["state"] != "processing_prompt":
            time.sleep(0.01)
        long.stop()
        result = long.promise.result(60)
        assert result["interrupted"] and result["tokens_predicted"] == 0
        after = ctx.parallel.completion(greedy(PROMPTS[0], 4)).promise.result(120)  # the batch goes on
        assert after["tokens_predicted"] == 4


def test_a_failed_step_fails_its_batch_and_the_next_request_works(par, monkeypatch):
    batch = par.parallel._pool.slots.batch
    generator = batch._generator
    real = generator.next

    def fails_once():
        monkeypatch.setattr(generator, "next", real)
        raise RuntimeError("a failing kernel")

    monkeypatch.setattr(generator, "next", fails_once)
    with pytest.raises(GenerationError, match="failed while decoding the batch: a failing kernel"):
        par.parallel.completion(greedy(PROMPTS[0], 4)).promise.result(120)
    assert batch._generator is not generator  # a fresh generator serves what follows
    assert par.parallel.completion(greedy(PROMPTS[1], 4)).promise.result(120)["tokens_predicted"] == 4


def test_parallel_embeddings_equal_plain_ones(model_path):
    with init_llama({"backend": "mlx", "model": model_path, "n_ctx": 1024, "n_parallel": 2, "embedding": True}) as ctx:
        plain = ctx.embedding("The sky is blue.")["embedding"]
        ctx.parallel.enable({"n_parallel": 2})
        request = ctx.parallel.embedding("The sky is blue.", {})
        beside = ctx.parallel.completion(greedy(PROMPTS[0], 4))
        assert request.promise.result(120)["embedding"] == pytest.approx(plain, abs=1e-5)
        assert beside.promise.result(120)["tokens_predicted"] == 4
