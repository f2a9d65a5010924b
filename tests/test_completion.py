"""completion(): result shape, chat, sampling parameters, probabilities, grammar — on the real model."""

from __future__ import annotations

import math

import pytest

from llamacompat import GrammarError, InvalidParamsError

from .conftest import GREEDY

RESULT_TYPES = {
    "text": str, "chat_format": int, "completion_probabilities": list, "tokens_predicted": int,
    "tokens_evaluated": int, "tokens_cached": int, "draft_tokens": int, "draft_tokens_accepted": int,
    "truncated": bool, "context_full": bool, "interrupted": bool, "stopped_eos": bool,
    "stopped_word": bool, "stopped_limit": bool, "stopping_word": str, "timings": dict,
}
TIMING_KEYS = {"cache_n": int, "prompt_n": int, "prompt_ms": float, "prompt_per_token_ms": float,
               "prompt_per_second": float, "predicted_n": int, "predicted_ms": float,
               "predicted_per_token_ms": float, "predicted_per_second": float}

CAPITAL = [{"role": "user", "content": "Name the capital of France."}]


def test_result_has_every_llama_rn_field_with_the_right_type(ctx):
    result = ctx.completion({"prompt": "Once upon a time", "n_predict": 8})
    for key, kind in RESULT_TYPES.items():
        assert isinstance(result[key], kind), (key, result[key])
    assert set(result["timings"]) == set(TIMING_KEYS)
    for key, kind in TIMING_KEYS.items():
        assert isinstance(result["timings"][key], kind), key
    t = result["timings"]
    assert t["predicted_n"] == result["tokens_predicted"]
    assert t["predicted_per_second"] == pytest.approx(t["predicted_n"] / t["predicted_ms"] * 1000)
    assert t["prompt_per_token_ms"] == pytest.approx(t["prompt_ms"] / t["prompt_n"])
    assert result["tokens_cached"] == result["tokens_evaluated"] + result["tokens_predicted"] - 1
    assert result["content"] == result["text"]


def test_chat_messages_use_the_models_template_and_answer_paris(ctx):
    events = []
    result = ctx.completion({"messages": CAPITAL, "n_predict": 24, **GREEDY}, events.append)
    assert "Paris" in result["text"]
    assert result["stopped_eos"] is True  # <|im_end|> ends the turn and is not in the text
    assert "<|im_end|>" not in result["text"]
    assert "".join(e["token"] for e in events) == result["text"]


def test_formatted_chat_matches_llama_cpp_builtin_chatml(ctx):
    """With a system message, SmolLM2's template is plain ChatML: compare with llama.cpp's renderer."""
    import ctypes

    import llama_cpp as lc

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ours = ctx.get_formatted_chat(messages)["prompt"]
    chat = (lc.llama_chat_message * 2)(*(lc.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages))
    buf = ctypes.create_string_buffer(4096)
    n = lc.llama_chat_apply_template(b"chatml", chat, 2, True, buf, len(buf))
    assert ours == buf.raw[:n].decode()


def test_greedy_is_deterministic_and_seeded_sampling_reproducible(ctx):
    a = ctx.completion({"messages": CAPITAL, "n_predict": 16, **GREEDY})["text"]
    b = ctx.completion({"messages": CAPITAL, "n_predict": 16, **GREEDY})["text"]
    assert a == b
    sampled = {"prompt": "My favourite animal is", "n_predict": 16, "temperature": 1.0, "seed": 1234}
    assert ctx.completion(sampled)["text"] == ctx.completion(sampled)["text"]


def test_top_k_1_equals_greedy(ctx):
    greedy = ctx.completion({"prompt": "The ocean is", "n_predict": 12, **GREEDY})["text"]
    top1 = ctx.completion({"prompt": "The ocean is", "n_predict": 12, "temperature": 1.5, "top_k": 1,
                           "top_p": 1.0, "min_p": 0.0})["text"]
    assert top1 == greedy


def test_logit_bias_false_bans_a_token(ctx):
    base = {"prompt": "The ocean is", "n_predict": 1, **GREEDY}
    first = ctx.completion(base)["text"]
    token = ctx.tokenize(first)["tokens"][0]
    banned = ctx.completion({**base, "logit_bias": [[token, False]]})["text"]
    assert banned != first
    forced = ctx.completion({**base, "logit_bias": [["zebra", 100.0]]})["text"]
    zebra_pieces = {ctx.detokenize([t]) for t in ctx.tokenize("zebra")["tokens"]}
    assert forced in zebra_pieces and first not in zebra_pieces  # a string biases each of its tokens


def test_ignore_eos_generates_past_the_end_of_turn(ctx):
    normal = ctx.completion({"messages": CAPITAL, "n_predict": 64, **GREEDY})
    assert normal["stopped_eos"] is True
    n = normal["tokens_predicted"] + 5
    forced = ctx.completion({"messages": CAPITAL, "n_predict": n, "ignore_eos": True, **GREEDY})
    assert forced["stopped_eos"] is False and forced["tokens_predicted"] == n


def test_penalties_change_greedy_output(ctx):
    prompt = {"prompt": "one, two, one, two, one, two,", "n_predict": 12, **GREEDY}
    plain = ctx.completion(prompt)["text"]
    penalised = ctx.completion({**prompt, "penalty_repeat": 2.0, "penalty_last_n": 64})["text"]
    assert plain != penalised
    assert ctx.completion({**prompt, "penalty_freq": 1.5, "penalty_present": 1.5})["text"] != plain


@pytest.mark.parametrize("extra", [
    {"mirostat": 1}, {"mirostat": 2, "mirostat_tau": 3.0, "mirostat_eta": 0.2}, {"typical_p": 0.5},
    {"xtc_probability": 0.5, "xtc_threshold": 0.1}, {"top_n_sigma": 1.0}, {"dry_multiplier": 0.8},
    {"min_p": 0.2, "top_p": 0.5, "top_k": 5},
])
def test_every_sampler_setting_runs_and_is_seed_reproducible(ctx, extra):
    params = {"prompt": "Tell me a story:", "n_predict": 10, "temperature": 0.9, "seed": 7, "ignore_eos": True, **extra}
    first = ctx.completion(params)
    assert first["tokens_predicted"] == 10
    assert ctx.completion(params)["text"] == first["text"]


def test_n_probs_reports_the_model_distribution(ctx):
    events = []
    result = ctx.completion({"prompt": "The sky is", "n_predict": 4, "n_probs": 5, **GREEDY}, events.append)
    probs = result["completion_probabilities"]
    assert len(probs) == 4
    assert [p for e in events for p in e["completion_probabilities"]] == probs
    for entry in probs:
        values = [p["prob"] for p in entry["probs"]]
        assert len(values) == 5 and values == sorted(values, reverse=True)
        assert 0 < sum(values) <= 1 + 1e-6
        assert entry["probs"][0]["tok_str"] == entry["content"]  # greedy picks the most probable
    assert ctx.completion({"prompt": "The sky is", "n_predict": 2})["completion_probabilities"] == []


def test_grammar_constrains_output(ctx):
    result = ctx.completion({"prompt": "Is water wet? Answer:", "n_predict": 8,
                             "grammar": 'root ::= " yes" | " no"', **GREEDY})
    assert result["text"] in (" yes", " no")
    digits = ctx.completion({"prompt": "My phone number is", "n_predict": 12,
                             "grammar": "root ::= [0-9]{3} \"-\" [0-9]{4}", **GREEDY})["text"]
    assert len(digits) == 8 and digits[3] == "-" and (digits[:3] + digits[4:]).isdigit()


@pytest.mark.parametrize("grammar", ['root ::= "a', "root ::= foo", "root ::= [a-", "nothing here"])
def test_malformed_grammar_fails_before_generation_and_context_survives(ctx, grammar):
    events = []
    with pytest.raises(GrammarError, match="Failed to initialize sampling"):
        ctx.completion({"prompt": "Hi", "n_predict": 5, "grammar": grammar}, events.append)
    assert events == []
    assert ctx.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2


def test_stream_yields_the_same_events_as_the_callback(ctx):
    params = {"prompt": "Water boils at", "n_predict": 10, **GREEDY}
    events = []
    result = ctx.completion(params, events.append)
    stream = ctx.stream(params)
    streamed = list(stream)
    assert streamed == events
    assert stream.result["text"] == result["text"]


def test_abandoned_stream_frees_the_context_on_close(ctx):
    stream = ctx.stream({"prompt": "Count: 1, 2,", "n_predict": 50})
    next(stream)
    stream.close()
    assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_probabilities_and_text_survive_multibyte_characters(ctx):
    result = ctx.completion({"prompt": "Translate to Japanese: cat =", "n_predict": 12, **GREEDY})
    assert "\ufffd" not in result["text"]


@pytest.mark.parametrize("params, message", [
    ({"prompt": "x", "temprature": 0}, "did you mean 'temperature'"),
    ({"prompt": "x", "n_predict": "ten"}, "'n_predict' must be int"),
    ({"prompt": "x", "top_p": 3}, "'top_p' must be between 0 and 1"),
    ({"prompt": "x", "n_predict": True}, "'n_predict' must be int"),
    ({"prompt": "x", "stop": "END"}, "'stop' must be list"),
    ({"prompt": "x", "stop": [""]}, "non-empty strings"),
    ({"prompt": "x", "seed": -5}, "'seed' must be"),
    ({"prompt": "x", "logit_bias": [[1]]}, "logit_bias[0] must be [token, bias]"),
    ({"prompt": "x", "logit_bias": [[10**9, 1.0]]}, "outside the vocabulary"),
    ({"prompt": ""}, "Prompt is required"),
    ({}, "Prompt is required"),
    ({"prompt": "x", "messages": CAPITAL}, "not both"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "needs 'content'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
])
def test_bad_params_raise_invalid_params_and_context_survives(ctx, params, message):
    with pytest.raises(InvalidParamsError) as info:
        ctx.completion(params)
    assert message in info.value.detail
    assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_media_without_a_projector_get_llama_rns_error_and_the_context_goes_on(ctx):
    from llamacompat.errors import MultimodalNotEnabledError

    with pytest.raises(MultimodalNotEnabledError) as caught:
        ctx.completion({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]})
    assert str(caught.value) == "Multimodal support not enabled. Call initMultimodal first."
    assert ctx.completion({"prompt": "Hi", "n_predict": 1})["tokens_predicted"] == 1


def test_text_parts_are_joined_like_llama_rn(ctx):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name the capital"}, {"type": "text", "text": "of France."}]}]
    prompt = ctx.get_formatted_chat(parts)["prompt"]
    assert "Name the capital\nof France." in prompt


def test_probabilities_are_finite(ctx):
    result = ctx.completion({"prompt": "2 + 2 =", "n_predict": 2, "n_probs": 3, "temperature": 0.7, "seed": 3})
    assert all(math.isfinite(p["prob"]) for e in result["completion_probabilities"] for p in e["probs"])
