"""Generation checks: result shape, timings, streaming, limits, stop strings, determinism, interruption."""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping

from ..types import TokenData
from .kit import GREEDY, Kit, check, no_eos, run_in_background

PROMPT = "The three primary colours are"
# A story already under way: it runs past 64 tokens greedily even where ignore_eos is missing.
LONG = "Here is a long story about a dragon who learns to bake bread.\n\nOnce upon a time,"

_RESULT_TYPES: dict[str, type | tuple[type, ...]] = {
    "text": str, "chat_format": int, "completion_probabilities": list, "tokens_predicted": int,
    "tokens_evaluated": int, "tokens_cached": int, "draft_tokens": int, "draft_tokens_accepted": int,
    "truncated": bool, "context_full": bool, "interrupted": bool, "stopped_eos": bool, "stopped_word": bool,
    "stopped_limit": bool, "stopping_word": str, "timings": dict,
}
_TIMING_INTS = ("cache_n", "prompt_n", "predicted_n")
_TIMING_FLOATS = ("prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_ms",
                  "predicted_per_token_ms", "predicted_per_second")


def _is(value: Any, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not an int here."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind)


def _assert_probabilities(entries: Any, n_probs: int, where: str) -> None:
    assert isinstance(entries, list), f"{where}: completion_probabilities is not a list"
    for entry in entries:
        assert set(entry) == {"content", "probs"} and isinstance(entry["content"], str), f"{where}: bad entry {entry!r}"
        probs = entry["probs"]
        assert isinstance(probs, list) and len(probs) == n_probs, f"{where}: expected {n_probs} probs, got {probs!r}"
        for item in probs:
            assert isinstance(item.get("tok_str"), str), f"{where}: tok_str is not a string in {item!r}"
            prob = item.get("prob")
            assert isinstance(prob, float) and 0.0 <= prob <= 1.0, f"{where}: prob is not a float in [0, 1]: {item!r}"
        values = [item["prob"] for item in probs]
        assert values == sorted(values, reverse=True), f"{where}: probs are not sorted, most likely first"


def assert_result_shape(result: Mapping[str, Any]) -> None:
    """Every NativeCompletionResult field present with llama.rn's type."""
    for key, kind in _RESULT_TYPES.items():
        assert key in result, f"result lacks '{key}'"
        assert _is(result[key], kind), f"result['{key}'] is {type(result[key]).__name__}, expected {kind}"
    timings = result["timings"]
    for key in _TIMING_INTS:
        assert _is(timings.get(key), int), f"timings['{key}'] missing or not an int"
    for key in _TIMING_FLOATS:
        assert _is(timings.get(key), (int, float)), f"timings['{key}'] missing or not a number"
    if result["text"] and not result["interrupted"]:
        assert result.get("content") == result["text"], "'content' must equal 'text' when it is non-empty"
    else:
        assert "content" not in result, "'content' must be absent when empty or interrupted"


@check("every result and TokenData field is present with llama.rn's type")
def check_result_shape(kit: Kit) -> None:
    """With ``n_probs`` where the backend has it (the capability check covers its refusal elsewhere)."""
    events: list[TokenData] = []
    probs = kit.supports("n_probs")
    request = {"prompt": PROMPT, "n_predict": 8, **({"n_probs": 3} if probs else {}), **GREEDY}
    result = kit.context().completion(request, events.append)
    assert_result_shape(result)
    if probs:
        _assert_probabilities(result["completion_probabilities"], 3, "result")
        if not result["stopped_eos"]:
            assert len(result["completion_probabilities"]) == result["tokens_predicted"], "one probability entry per token"
    assert events, "the callback got no TokenData"
    for event in events:
        assert isinstance(event.get("token"), str) and event["token"], f"TokenData without a token: {event!r}"
        if probs:
            _assert_probabilities(event.get("completion_probabilities"), 3, "TokenData")
        else:
            assert "completion_probabilities" not in event, "TokenData carries probabilities nobody asked for"
    plain = kit.context().completion({"prompt": PROMPT, "n_predict": 2, **GREEDY})
    assert plain["completion_probabilities"] == [], "completion_probabilities must be [] when n_probs is 0"


@check("timings agree with the token counts")
def check_timings(kit: Kit) -> None:
    ctx = kit.context()
    ctx.completion({"prompt": "Unrelated warm-up text.", "n_predict": 1, **GREEDY})
    result = ctx.completion({"prompt": PROMPT, "n_predict": 6, **GREEDY})
    t: Mapping[str, Any] = result["timings"]  # read by names held in variables below
    n_prompt = len(ctx.tokenize(PROMPT)["tokens"])
    assert t["predicted_n"] == result["tokens_predicted"], "predicted_n != tokens_predicted"
    assert t["cache_n"] + t["prompt_n"] == result["tokens_evaluated"], "cache_n + prompt_n != tokens_evaluated"
    assert result["tokens_evaluated"] >= n_prompt, "tokens_evaluated is less than the prompt's tokens"
    assert 0 <= t["cache_n"] < n_prompt and t["prompt_n"] >= 1, f"a new prompt cannot come mostly from the cache: {t}"
    for n, ms, per_second, per_token in (("prompt_n", "prompt_ms", "prompt_per_second", "prompt_per_token_ms"),
                                         ("predicted_n", "predicted_ms", "predicted_per_second", "predicted_per_token_ms")):
        assert t[ms] > 0, f"{ms} must be positive"
        assert math.isclose(t[per_second], t[n] / t[ms] * 1000, rel_tol=1e-6), f"{per_second} != {n} / {ms} * 1000"
        assert math.isclose(t[per_token], t[ms] / t[n], rel_tol=1e-6), f"{per_token} != {ms} / {n}"
    assert result["tokens_cached"] <= result["tokens_evaluated"] + result["tokens_predicted"]


@check("streamed tokens add up to the text; stream() yields what the callback gets")
def check_streaming(kit: Kit) -> None:
    ctx = kit.context()
    request = {"prompt": LONG, "n_predict": 24, **no_eos(ctx), **GREEDY}
    events: list[TokenData] = []
    result = ctx.completion(request, events.append)
    assert "".join(e["token"] for e in events) == result["text"], "callback tokens do not add up to 'text'"
    stream = ctx.stream(request)
    streamed = list(stream)
    assert [e["token"] for e in streamed] == [e["token"] for e in events], "stream() differs from the callback"
    assert stream.result is not None and stream.result["text"] == result["text"], "stream.result differs"


@check("n_predict is honoured exactly; tokens_cached leaves out the last token; n_predict 0 evaluates the prompt only")
def check_n_predict(kit: Kit) -> None:
    ctx = kit.context()
    limited = []
    for n in (1, 7):
        result = ctx.completion({"prompt": LONG, "n_predict": n, **no_eos(ctx), **GREEDY})
        assert result["tokens_predicted"] == n, f"n_predict {n} gave {result['tokens_predicted']} tokens"
        assert result["stopped_limit"] is True and not result["stopped_eos"], "stopped_limit must be set"
        limited.append(result)
    ctx.completion({"prompt": "Something else entirely.", "n_predict": 1, **GREEDY})
    zero = ctx.completion({"prompt": PROMPT, "n_predict": 0})
    assert zero["tokens_predicted"] == 0 and zero["text"] == "", "n_predict 0 must generate nothing"
    if not kit.supports("prefix_cache"):  # a server that does not report its cache: nothing more to see
        return
    for result in limited:  # llama.rn's rule (adapters.base.Adapter.n_past): the last sampled token is not evaluated
        expected = result["tokens_evaluated"] + result["tokens_predicted"] - 1
        assert result["tokens_cached"] == expected, (
            f"n_predict {result['tokens_predicted']}: tokens_cached is {result['tokens_cached']}, expected tokens_evaluated "
            f"+ tokens_predicted - 1 = {expected} (the last sampled token is not in the cache until it is evaluated)"
        )
    n_prompt = len(ctx.tokenize(PROMPT)["tokens"])
    assert zero["tokens_cached"] == zero["tokens_evaluated"] >= n_prompt, (
        f"n_predict 0 must leave the prompt evaluated in the cache ({zero['tokens_cached']} of {zero['tokens_evaluated']})"
    )


def _boundary_stop(pieces: list[str]) -> tuple[str, int] | None:
    """A stop string that spans two streamed tokens in the second half of the text (so a sampler that is not
    greedy cannot reach it again by chance), with where it first occurs in the joined text."""
    text, offset = "".join(pieces), 0
    for i, (left, right) in enumerate(itertools.pairwise(pieces)):
        offset += len(left)
        if i >= len(pieces) // 2 and len(left.strip()) >= 2 and len(right.strip()) >= 2:
            stop = left[-2:] + right[:2]
            if text.find(stop) == offset - 2:
                return stop, offset - 2
    return None


@check("stop strings end generation, are cut from text and never leak into the stream")
def check_stop_strings(kit: Kit) -> None:
    ctx = kit.context()
    request = {"prompt": LONG, "n_predict": 48, **no_eos(ctx), **GREEDY}
    events: list[TokenData] = []
    full = ctx.completion(request, events.append)
    found = _boundary_stop([e["token"] for e in events])
    assert found is not None, f"no two streamed tokens to split a stop string across in {full['text']!r}"
    stop, at = found
    streamed: list[str] = []
    result = ctx.completion({**request, "stop": ["\x00never", stop]}, lambda e: streamed.append(e["token"]))
    assert result["text"] == full["text"][:at], f"text {result['text']!r} is not the text before {stop!r}"
    assert result["stopped_word"] is True and result["stopping_word"] == stop, "stopped_word/stopping_word not set"
    assert not result["stopped_limit"] and not result["stopped_eos"]
    assert "".join(streamed) == result["text"] and stop not in "".join(streamed), "the stop string leaked into the stream"
    assert result["tokens_predicted"] < full["tokens_predicted"], "generation did not end at the stop string"


@check("greedy decoding is deterministic; a fixed seed reproduces a sampled text (where seeds exist)")
def check_determinism(kit: Kit) -> None:
    ctx = kit.context()
    # no EOS (where the backend can): two empty answers would agree whatever the sampler did
    greedy = [ctx.completion({"prompt": LONG, "n_predict": 24, **no_eos(ctx), **GREEDY})["text"] for _ in range(2)]
    assert greedy[0] == greedy[1], f"greedy differs between calls: {greedy!r}"
    if not kit.supports("seed"):  # a sampled text cannot be reproduced; the capability check covers the refusal
        return
    sampled = {"prompt": LONG, "n_predict": 24, **no_eos(ctx), "temperature": 1.0, "top_k": 0, "top_p": 1.0,
               "min_p": 0.0}
    seeded = [ctx.completion({**sampled, "seed": 1234})["text"] for _ in range(2)]
    assert seeded[0] == seeded[1], f"seed 1234 gave two different texts: {seeded!r}"
    others = {ctx.completion({**sampled, "seed": seed})["text"] for seed in (1, 2, 3)}
    assert len(others | {seeded[0]}) > 1, "four different seeds gave the same text: the seed is not used"


@check("a cached prefix is reused and never changes the answer")
def check_prefix_reuse(kit: Kit) -> None:
    """Where the backend does not report its cache (``prefix_cache`` missing), only the answers are compared."""
    ctx = kit.context()
    shared = "A list of fruit: apple, pear, plum, cherry, banana, mango,"
    ctx.completion({"prompt": shared + " grape, kiwi", "n_predict": 4, **GREEDY})
    reused = ctx.completion({"prompt": shared + " lemon, lime,", "n_predict": 12, **GREEDY})
    if kit.supports("prefix_cache"):
        assert reused["timings"]["cache_n"] > 0, "the shared prefix was not reused"
    with kit.new() as fresh:
        expected = fresh.completion({"prompt": shared + " lemon, lime,", "n_predict": 12, **GREEDY})
    assert reused["text"] == expected["text"], f"reuse changed the answer: {reused['text']!r} vs {expected['text']!r}"


@check("stop_completion() from another thread ends it with interrupted: True, no exception")
def check_stop_completion(kit: Kit) -> None:
    with kit.new() as ctx:
        worker, box = run_in_background(ctx, {"prompt": LONG, "n_predict": -1, **no_eos(ctx)})
        ctx.stop_completion()
        worker.join(60)
        assert not worker.is_alive(), "the completion did not stop within 60 s"
        assert "error" not in box, f"stop_completion made the completion raise {box.get('error')!r}"
        result = box["result"]
        assert result["interrupted"] is True and "content" not in result, "interrupted must be True, content absent"
        after = ctx.completion({"prompt": PROMPT, "n_predict": 3, **GREEDY})
        assert after["interrupted"] is False and after["tokens_predicted"] == 3, "the next completion was affected"
