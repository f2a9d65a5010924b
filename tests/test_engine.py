"""The generation loop's stop-string scanner, then its behaviour on the real backend."""

from __future__ import annotations

import threading

import pytest

from llamacompat.text_stream import find_stop

from .conftest import GREEDY, run_in_background


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello world", ("wor",), (6, "wor", 0)),
        ("hello wo", ("world",), (8, None, 2)),  # "wo" may start "world": hold it
        ("hello", ("xyz",), (5, None, 0)),
        ("a STOP b END", ("END", "STOP"), (2, "STOP", 0)),  # the earliest match wins
        ("abcab", ("abd", "bc"), (1, "bc", 0)),
        ("xxab", ("abc", "b!"), (4, None, 2)),  # the longest partial prefix is held
    ],
)
def test_find_stop(text, stops, expected):
    assert find_stop(text, stops) == expected


def _greedy_text(ctx, prompt, n=24):
    return ctx.completion({"prompt": prompt, "n_predict": n, **GREEDY})


PROMPT = "The three primary colors are"


def test_stop_string_is_removed_and_reported(ctx):
    full = _greedy_text(ctx, PROMPT)["text"]
    stop = full[len(full) // 2: len(full) // 2 + 4]
    assert stop.strip(), f"pick a visible stop string from {full!r}"
    events = []
    result = ctx.completion({"prompt": PROMPT, "n_predict": 24, "stop": [stop], **GREEDY}, events.append)
    assert result["text"] == full[: full.index(stop)]
    assert result["stopped_word"] is True and result["stopping_word"] == stop
    assert result["stopped_limit"] is False and result["stopped_eos"] is False
    streamed = "".join(e["token"] for e in events)
    assert streamed == result["text"] and stop not in streamed


def test_stop_string_split_across_tokens_never_leaks(ctx):
    pieces = []
    full = ctx.completion({"prompt": PROMPT, "n_predict": 24, **GREEDY}, lambda e: pieces.append(e["token"]))["text"]
    # a stop string made of the end of one token and the start of the next
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1].strip()) >= 2)
    boundary = sum(len(p) for p in pieces[: i + 1])
    stop = full[boundary - 2: boundary + 2]
    events = []
    result = ctx.completion({"prompt": PROMPT, "n_predict": 24, "stop": [stop], **GREEDY}, events.append)
    assert result["text"] == full[: full.index(stop)] and result["stopping_word"] == stop
    streamed = "".join(e["token"] for e in events)
    assert streamed == result["text"] and stop not in streamed


def test_partial_stop_that_never_completes_is_released(ctx):
    full = _greedy_text(ctx, PROMPT, 12)["text"]
    last_char = full[-1]
    stop = last_char + "\u2603"  # starts like the text's last character, never completes
    events = []
    result = ctx.completion({"prompt": PROMPT, "n_predict": 12, "stop": [stop], **GREEDY}, events.append)
    assert result["text"] == full and result["stopped_limit"] is True
    assert "".join(e["token"] for e in events) == full


def test_n_predict_is_exact(ctx):
    for n in (1, 7):
        result = ctx.completion({"prompt": PROMPT, "n_predict": n, "ignore_eos": True, **GREEDY})
        assert result["tokens_predicted"] == n and result["stopped_limit"] is True
        assert result["timings"]["predicted_n"] == n


def test_n_predict_zero_only_evaluates_the_prompt(fresh_ctx):
    result = fresh_ctx.completion({"prompt": PROMPT, "n_predict": 0})
    assert result["text"] == "" and result["tokens_predicted"] == 0
    assert result["tokens_evaluated"] == len(fresh_ctx.tokenize(PROMPT)["tokens"]) + 0
    assert result["timings"]["prompt_n"] == result["tokens_evaluated"]
    assert fresh_ctx.completion({"prompt": PROMPT, "n_predict": 1})["timings"]["cache_n"] > 0


def test_prefix_cache_is_reused_between_calls(fresh_ctx):
    first = fresh_ctx.completion({"prompt": PROMPT, "n_predict": 4, **GREEDY})
    second = fresh_ctx.completion({"prompt": PROMPT + " red,", "n_predict": 4, **GREEDY})
    assert first["timings"]["cache_n"] == 0
    assert second["timings"]["cache_n"] >= first["tokens_evaluated"] - 1
    assert second["timings"]["prompt_n"] == second["tokens_evaluated"] - second["timings"]["cache_n"]


def test_context_full_during_generation():
    from llamacompat import init_llama

    with init_llama({"n_ctx": 32}) as small:
        result = small.completion({"prompt": PROMPT, "n_predict": 100, "ignore_eos": True, **GREEDY})
    n_prompt = result["tokens_evaluated"]
    assert result["context_full"] is True and result["stopped_limit"] is False
    assert result["tokens_predicted"] == 32 - n_prompt + 1  # the last token is sampled from a full cache


def test_stop_flag_set_before_start_does_not_leak_into_next_call(ctx):
    ctx.stop_completion()  # nothing running: must not interrupt the next completion
    result = ctx.completion({"prompt": PROMPT, "n_predict": 3, **GREEDY})
    assert result["interrupted"] is False and result["tokens_predicted"] == 3


def test_callback_error_propagates_and_context_stays_usable(ctx):
    def boom(_event):
        raise KeyError("from callback")

    with pytest.raises(KeyError):
        ctx.completion({"prompt": PROMPT, "n_predict": 5}, boom)
    assert ctx.completion({"prompt": PROMPT, "n_predict": 2})["tokens_predicted"] == 2


def test_interrupt_from_thread_is_fast(fresh_ctx):
    import time

    worker, box = run_in_background(fresh_ctx, {"prompt": PROMPT, "n_predict": -1, "ignore_eos": True})
    time.sleep(0.3)
    asked = time.perf_counter()
    fresh_ctx.stop_completion()
    worker.join(10)
    assert box["result"]["interrupted"] is True
    assert box["done"] - asked < 0.2, f"stop took {(box['done'] - asked) * 1000:.0f} ms"
    assert "content" not in box["result"] and box["result"]["text"]


def test_interrupt_during_prompt_evaluation(fresh_ctx):
    import time

    prompt = "word " * 900  # seconds of prompt evaluation on 2 cores
    box = {}
    worker = threading.Thread(target=lambda: box.update(r=fresh_ctx.completion({"prompt": prompt, "n_predict": 5})))
    worker.start()
    time.sleep(0.15)
    asked = time.perf_counter()
    fresh_ctx.stop_completion()
    worker.join(10)
    elapsed = time.perf_counter() - asked
    result = box["r"]
    assert result["interrupted"] is True and result["tokens_predicted"] == 0
    assert result["timings"]["prompt_n"] < result["tokens_evaluated"]
    assert elapsed < 0.2, f"prompt abort took {elapsed * 1000:.0f} ms"
    # the KV cache holds only what was fully evaluated: the next call is correct and complete
    after = fresh_ctx.completion({"prompt": PROMPT, "n_predict": 3, **GREEDY})
    assert after["tokens_predicted"] == 3 and not after["interrupted"]


def test_interrupted_prompt_keeps_the_cache_consistent():
    """Stop in the middle of a multi-batch prompt that extends a cached prefix; later answers stay exact."""
    import time

    from llamacompat import init_llama

    prompt_a = "alpha " * 300 + "gamma " * 300
    prompt_b = "alpha " * 300 + "beta " * 300
    with init_llama({"n_ctx": 1024, "n_batch": 32, "n_threads": 2}) as ctx:
        expected = ctx.completion({"prompt": prompt_a, "n_predict": 4, **GREEDY})
        box = {}
        worker = threading.Thread(target=lambda: box.update(r=ctx.completion({"prompt": prompt_b, "n_predict": 4})))
        worker.start()
        # stop once the new part has begun (a fixed sleep raced the first batch on a slow 2-core CI machine)
        beta = ctx.tokenize(" beta")["tokens"][-1]
        cached = ctx._core.adapter._tokens  # the adapter's record of its KV cache, grown batch by batch
        deadline = time.monotonic() + 30
        while cached.count(beta) < 32 and time.monotonic() < deadline:
            time.sleep(0.002)
        ctx.stop_completion()
        worker.join(10)
        interrupted = box["r"]
        assert interrupted["interrupted"] is True and interrupted["tokens_predicted"] == 0
        assert 0 < interrupted["timings"]["prompt_n"] < 300  # stopped part-way through the new part
        again = ctx.completion({"prompt": prompt_a, "n_predict": 4, **GREEDY})
        assert again["timings"]["cache_n"] >= 300  # the shared prefix survived the abort
        assert again["text"] == expected["text"]
        # and equals a cold start (same n_batch: other batch splits change float rounding at near ties)
        with init_llama({"n_ctx": 1024, "n_batch": 32, "n_threads": 2}) as fresh:
            assert fresh.completion({"prompt": prompt_a, "n_predict": 4, **GREEDY})["text"] == expected["text"]
