"""llama.rn's surface as a ported app meets it (issue 28): its error texts, its keys, ``now``, and the
context's and get_formatted_chat's extra fields; on the real model, and through a live bridge server."""

from __future__ import annotations

import datetime
import os
import pickle
import warnings

import llama_cpp
import pytest

from llamacompat import init_llama, set_context_limit
from llamacompat import params as P
from llamacompat.cli import main
from llamacompat.errors import (
    ContextFullError,
    ContextLimitError,
    EmbeddingDisabledError,
    InvalidParamsError,
    LlamaCompatWarning,
    LlamaError,
    ModelLoadError,
    UnsupportedFeatureError,
    error_from_code,
)
from llamacompat.local import chat_templates

from .bridge_helpers import Served

TEMPLATES = os.path.join(os.path.dirname(__file__), "data", "chat_templates")
LONG = "The quick brown fox jumps over the lazy dog. " * 40  # about 400 tokens


# -- item 4: llama.rn's error texts ------------------------------------------------------------------------
def _caught(call) -> LlamaError:
    with pytest.raises(LlamaError) as info:
        call()
    return info.value


def test_errors_say_llama_rn_text_and_keep_the_detail(ctx, tmp_path):
    small = init_llama({"n_ctx": 64, "n_threads": 2})
    try:
        full = _caught(lambda: small.completion({"prompt": LONG, "n_predict": 2}))
    finally:
        small.release()
    assert isinstance(full, ContextFullError) and str(full) == "Context is full"
    assert "n_ctx is 64" in full.detail and full.detail in repr(full) and full.message == full.detail
    assert full.code == "context_full"
    empty = _caught(lambda: ctx.completion({"prompt": ""}))
    assert isinstance(empty, InvalidParamsError) and str(empty) == "Prompt is required" and "'messages'" in empty.detail
    disabled = _caught(lambda: ctx.embedding("hi"))
    assert isinstance(disabled, EmbeddingDisabledError) and str(disabled) == "Embedding is not enabled"
    assert "'embedding': True" in disabled.detail
    missing = _caught(lambda: init_llama({"model": str(tmp_path / "none.gguf")}))
    assert isinstance(missing, ModelLoadError) and str(missing) == "Failed to load model" and "none.gguf" in missing.detail
    grammar = _caught(lambda: ctx.completion({"prompt": "Hi", "grammar": 'root ::= "a'}))
    assert str(grammar) == "Failed to initialize sampling" and "line 1" in grammar.detail
    set_context_limit(1)
    try:
        limit = _caught(lambda: init_llama({"n_ctx": 64, "n_threads": 2}))
    finally:
        set_context_limit(-1)
    assert isinstance(limit, ContextLimitError) and str(limit) == "Context limit reached"
    # a message of ours with no llama.rn text is its own str; one that merely starts like a text is not cut
    bad = _caught(lambda: ctx.completion({"prompt": "Hi", "top_p": 2}))
    assert str(bad) == bad.detail and "top_p" in str(bad)
    assert str(ModelLoadError("Failed to load modelling kit")) == "Failed to load modelling kit"
    # the wire format (code, full message) and pickling give the same str and detail back
    for err in (full, empty, grammar):
        again = error_from_code(err.code, err.message)
        assert isinstance(err, type(again)) and (again.code, str(again), again.detail) == (err.code, str(err), err.detail)
    for err in (full, empty):
        copy = pickle.loads(pickle.dumps(err))
        assert (str(copy), copy.detail) == (str(err), err.detail)


def test_a_bridge_client_gets_the_same_text_and_detail(tmp_path):
    server = Served(str(tmp_path))
    try:
        assert server.started, server.log()
        with init_llama({"backend": "bridge", "socket": server.socket}) as remote:
            err = _caught(lambda: remote.completion({"prompt": ""}))
            assert str(err) == "Prompt is required" and "'messages'" in err.detail
            err = _caught(lambda: remote.embedding("hi"))
            assert isinstance(err, EmbeddingDisabledError) and str(err) == "Embedding is not enabled"
            assert "'embedding': True" in err.detail
    finally:
        server.stop()


def test_the_cli_prints_the_detail(capsys, tmp_path):
    assert main(["complete", "x", "--model", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err
    assert "llamacompat: error [model_load_error]: Failed to load model" in err and "none.gguf" in err


# -- item 1: every llama.rn key is accepted; what has no effect says so --------------------------------------
def _warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if w.category is LlamaCompatWarning]


def test_llama_rn_init_keys_without_an_effect_warn_and_strict_refuses():
    keys = {name: 1 for name in P.CONTEXT_IGNORED} | {"cpu_mask": "0-1", "speculative": {"enabled": True}}
    said = _warnings(lambda: init_llama({"n_ctx": 64, "n_threads": 2, **keys}).release())
    for name, reason in P.CONTEXT_IGNORED.items():
        assert f"init_llama: '{name}' is ignored ({reason})" in said, name
    assert len(P.CONTEXT_IGNORED) == 16 and not any("unknown" in text for text in said)
    assert _warnings(lambda: init_llama({"n_ctx": 64, "n_threads": 2, "speculative": False}).release()) == []
    with pytest.raises(UnsupportedFeatureError, match="'state_cache_budget_mb' is ignored"):
        init_llama({"n_ctx": 64, "strict": True, "state_cache_budget_mb": 160})
    with pytest.raises(InvalidParamsError, match="unknown parameter 'spec_draft_n_maxx'; did you mean 'spec_draft_n_max'"):
        init_llama({"n_ctx": 64, "spec_draft_n_maxx": 4})
    asset = _warnings(lambda: init_llama({"n_ctx": 64, "n_threads": 2, "is_model_asset": True}).release())
    assert len(asset) == 1 and "'model' is used as given" in asset[0]


def test_llama_rn_completion_keys_without_an_effect_warn_and_strict_refuses(ctx):
    keys = {"generation_prompt": "<|im_start|>assistant\n", "chat_parser": "{}", "embedding": True, "speaker": "alice", "spec_type": "mtp",
            "spec_draft_n_max": 4, "spec_draft_n_min": 1, "spec_draft_p_min": 0.5, "spec_draft_p_split": 0.1,
            "speculative": True}
    said = _warnings(lambda: ctx.completion({"prompt": "Hi", "n_predict": 2, **keys}))
    assert said == [f"completion: '{name}' is ignored ({P.COMPLETION_IGNORED[name]})" for name in keys]
    quiet = {"speculative": False, "thinking_budget_tokens": -1, "embedding": False, "spec_draft_n_max": 0}
    assert _warnings(lambda: ctx.completion({"prompt": "Hi", "n_predict": 2, **quiet})) == []
    strict = init_llama({"n_ctx": 256, "n_threads": 2, "strict": True})
    try:
        with pytest.raises(UnsupportedFeatureError, match="'speaker' is ignored"):
            strict.completion({"prompt": "Hi", "n_predict": 2, "speaker": "alice"})
        assert strict.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2
    finally:
        strict.release()
    with pytest.raises(InvalidParamsError, match="did you mean 'prefill_text'"):
        ctx.completion({"prompt": "Hi", "prefil_text": "x"})


def test_devices_no_gpu_devices_and_n_cpu_moe_reach_llama_cpp():
    base = {"n_ctx": 256, "n_threads": 2}
    request = {"prompt": "The capital of France is", "n_predict": 6, "temperature": 0}
    with init_llama(base) as plain:
        expected = plain.completion(request)["text"]
    # SmolLM2 has no experts: n_cpu_moe's overrides match no tensor, and the model loads and runs as before
    with init_llama({**base, "devices": ["CPU"], "no_gpu_devices": True, "n_cpu_moe": 4}) as placed:
        assert placed.devices == ["CPU"] and placed.gpu is False
        assert placed.completion(request)["text"] == expected
    with pytest.raises(InvalidParamsError, match="no backend device named 'HTP0'.*CPU"):
        init_llama({**base, "devices": ["HTP0"]})
    with pytest.raises(InvalidParamsError, match="n_cpu_moe"):
        init_llama({**base, "n_cpu_moe": -1})


def test_a_completion_runs_with_its_own_n_threads_and_gives_them_back(fresh_ctx):
    adapter = fresh_ctx._core.adapter
    seen = []
    result = fresh_ctx.completion({"prompt": "Hi", "n_predict": 3, "n_threads": 1},
                                  lambda _event: seen.append(llama_cpp.llama_n_threads(adapter._ctx)))
    assert result["tokens_predicted"] == 3 and seen and set(seen) == {1}
    assert llama_cpp.llama_n_threads(adapter._ctx) == 2  # the context's own, back after the completion
    with pytest.raises(InvalidParamsError, match="n_threads"):
        fresh_ctx.completion({"prompt": "Hi", "n_threads": 100000})


# -- item 2: now ---------------------------------------------------------------------------------------------
CLOCK = "{{ strftime_now('%Y-%m-%d %H:%M:%S') }}{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("now", [31_536_000, 31_536_000.9, "31536000", " 31536000 seconds"])
def test_now_is_seconds_since_the_epoch_as_a_number_or_a_string(ctx, now):
    prompt = ctx.get_formatted_chat([{"role": "user", "content": "!"}], CLOCK, {"now": now})["prompt"]
    assert prompt == datetime.datetime.fromtimestamp(31_536_000).strftime("%Y-%m-%d %H:%M:%S") + "!"


def test_now_that_is_not_a_number_means_the_current_time(ctx):
    prompt = ctx.get_formatted_chat([{"role": "user", "content": "!"}], CLOCK, {"now": "soon"})["prompt"]
    assert prompt.startswith(str(datetime.datetime.now().year))
    with pytest.raises(InvalidParamsError, match="now"):
        ctx.get_formatted_chat([{"role": "user", "content": "!"}], CLOCK, {"now": -5})


# -- item 5: the rest of the surface ---------------------------------------------------------------------------
MESSAGES = [{"role": "user", "content": "Name the capital of France."}]
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_chat_template_alias_applies_when_chat_template_is_missing(ctx):
    request = {"messages": MESSAGES, "n_predict": 4, "temperature": 0}
    aliased = ctx.completion({**request, "chatTemplate": CLOCK})
    direct = ctx.completion({**request, "chat_template": CLOCK})
    own = ctx.completion(request)
    assert aliased["tokens_evaluated"] == direct["tokens_evaluated"] != own["tokens_evaluated"]
    both = ctx.completion({**request, "chat_template": "chatml", "chatTemplate": CLOCK})  # chat_template wins
    assert both["tokens_evaluated"] == ctx.completion({**request, "chat_template": "chatml"})["tokens_evaluated"]


def test_context_attributes_and_template_caps(ctx, tmp_path):
    assert ctx.android_lib is None and ctx.system_info.startswith("CPU :") and "AVX" in ctx.system_info
    assert ctx.is_jinja_supported() is True and ctx.is_llama_chat_supported() is True
    jinja = ctx.model["chat_templates"]["jinja"]
    assert jinja["tool_use"] is False and "tool_use_caps" not in jinja
    assert jinja["default_caps"]["parallel_tool_calls"] is False  # SmolLM2's template renders no tool calls
    hermes = open(os.path.join(TEMPLATES, "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja")).read()
    templates = chat_templates("{{ messages[0]['content'] }}", hermes)  # a model with a separate tool-use template
    assert templates["jinja"]["tool_use"] is True and templates["jinja"]["default_caps"]["tool_calls"] is False
    assert templates["jinja"]["tool_use_caps"] == {"tools": True, "tool_calls": True, "parallel_tool_calls": True,
                                                   "system_role": True}
    server = Served(str(tmp_path))
    try:
        assert server.started, server.log()
        with init_llama({"backend": "bridge", "socket": server.socket}) as remote:
            assert remote.system_info == ctx.system_info and remote.android_lib is None
            assert remote.is_jinja_supported() is True
    finally:
        server.stop()


def test_get_formatted_chat_force_pure_content(ctx):
    hermes = open(os.path.join(TEMPLATES, "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja")).read()
    params = {"tools": WEATHER, "reasoning_format": "deepseek"}
    parsed = ctx.get_formatted_chat(MESSAGES, hermes, params)
    pure = ctx.get_formatted_chat(MESSAGES, hermes, {**params, "force_pure_content": True})
    assert parsed["chat_format"] != 0 and parsed["grammar"]
    assert pure["prompt"] == parsed["prompt"] and "get_weather" in pure["prompt"]  # the template still shows tools
    # llama.cpp answers force_pure_content with its PEG_NATIVE format (2) and a content-only parser
    assert pure["chat_format"] == 2 and pure["grammar"] == "" and pure["preserved_tokens"] == []
    assert "thinking_start_tag" not in pure and pure["has_media"] is False
    assert pure["generation_prompt"] == parsed["generation_prompt"] == "<|im_start|>assistant\n"


def test_prefill_text_is_where_the_parsed_reply_starts(ctx):
    request = {"messages": MESSAGES, "n_predict": 6, "temperature": 0}
    plain = ctx.completion(request)
    prefilled = ctx.completion({**request, "prefill_text": "Sure! "})
    assert prefilled["text"] == plain["text"]  # llama.rn: the prompt is the caller's; text is what was generated
    assert prefilled["content"] == "Sure! " + prefilled["text"]
    streamed = []
    ctx.completion({**request, "prefill_text": "Sure! "}, streamed.append)
    assert all(event["content"].startswith("Sure! ") for event in streamed)


def test_a_thinking_budget_closes_the_reasoning_after_that_many_tokens(ctx):
    """llama.cpp's reasoning budget: after thinking_budget_tokens inside the template's thinking block, the budget
    message and the end tag are generated instead, and the reply goes on after them."""
    r1 = open(os.path.join(TEMPLATES, "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja")).read()  # opens <think>
    request = {"messages": MESSAGES, "chat_template": r1, "reasoning_format": "deepseek", "temperature": 0}
    first_four = ctx.completion({**request, "n_predict": 4})["text"]
    budgeted = ctx.completion({**request, "n_predict": 24, "thinking_budget_tokens": 4,
                               "thinking_budget_message": " Out of time."})
    assert budgeted["text"].startswith(first_four + " Out of time.</think>")
    assert budgeted["reasoning_content"] == (first_four + " Out of time.").strip()
    assert "</think>" not in budgeted.get("content", "") and budgeted["tokens_predicted"] == 24
    at_once = ctx.completion({**request, "n_predict": 12, "thinking_budget_tokens": 0})
    assert at_once["text"].startswith("</think>")
    # a template without a forced-open block: the model never writes <think>, so the budget never acts
    plain = {"messages": MESSAGES, "n_predict": 12, "temperature": 0}
    assert ctx.completion({**plain, "thinking_budget_tokens": 2})["text"] == ctx.completion(plain)["text"]


def test_a_thinking_budget_warns_where_it_cannot_act(ctx):
    said = _warnings(lambda: ctx.completion({"prompt": "Hi", "n_predict": 2, "thinking_budget_tokens": 3}))
    assert said == ["completion: 'thinking_budget_tokens' needs 'messages' (the chat template names the thinking "
                    "tags; ignored)"]
