"""Lazy grammars through completion, on llama_cpp and mlx: free text until the trigger, the grammar from it on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from llamacompat import init_llama
from llamacompat.errors import InvalidParamsError, UnsupportedFeatureError

PROMPT = "The capital of France is"
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}}, "required": ["city"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city", "parameters": WEATHER}}]


@pytest.fixture(scope="module", params=["llama_cpp", "mlx"])
def backend_ctx(request):
    context = init_llama({"backend": request.param, "n_ctx": 512, "n_threads": 2})
    yield context
    context.release()


def _trigger_word(ctx) -> tuple[str, str]:
    """A word of the greedy reply that ends a token, and the reply's text before it."""
    result = ctx.completion({"prompt": PROMPT, "n_predict": 8, "temperature": 0, "n_probs": 1})
    pieces = [p["content"] for p in result["completion_probabilities"]]
    for i in range(2, len(pieces)):
        word = pieces[i].strip()
        before = "".join(pieces[:i]) + pieces[i][: len(pieces[i]) - len(pieces[i].lstrip())]
        if word.isalpha() and word not in before:
            return word, before
    pytest.fail(f"no usable word in {pieces!r}")


def test_free_text_until_the_trigger_then_the_grammar(backend_ctx):
    word, before = _trigger_word(backend_ctx)
    result = backend_ctx.completion({
        "prompt": PROMPT, "n_predict": 24, "temperature": 0,
        "grammar": f'root ::= "{word}" " [" [0-9]{{3}} "]"', "grammar_lazy": True,
        "grammar_triggers": [{"type": 1, "value": word, "token": -1}],
    })
    assert result["text"].startswith(before + word)  # the free part is the greedy text, unconstrained
    assert re.fullmatch(re.escape(before + word) + r" \[[0-9]{3}\]", result["text"]), result["text"]
    assert result["stopped_eos"]  # the grammar completed: the end of generation follows


def test_a_trigger_that_never_appears_leaves_the_text_free(backend_ctx):
    plain = backend_ctx.completion({"prompt": PROMPT, "n_predict": 10, "temperature": 0})
    lazy = backend_ctx.completion({"prompt": PROMPT, "n_predict": 10, "temperature": 0, "grammar": 'root ::= "x"',
                                   "grammar_lazy": True, "grammar_triggers": [{"type": "word", "value": "<never>"}]})
    assert lazy["text"] == plain["text"]


def test_lazy_params_are_checked(backend_ctx):
    with pytest.raises(InvalidParamsError, match="needs 'grammar_triggers'"):
        backend_ctx.completion({"prompt": PROMPT, "grammar": 'root ::= "x"', "grammar_lazy": True})
    with pytest.raises(InvalidParamsError, match="needs a 'grammar'"):
        backend_ctx.completion({"prompt": PROMPT, "grammar_lazy": True, "grammar_triggers": [{"type": 1, "value": "a"}]})
    with pytest.raises(InvalidParamsError, match="'type' must be 0"):
        backend_ctx.completion({"prompt": PROMPT, "grammar": 'root ::= "x"', "grammar_lazy": True,
                                "grammar_triggers": [{"type": 9, "value": "a"}]})


def test_auto_tool_calls_are_schema_valid_once_they_start(ctx):
    template = (TEMPLATES / "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja").read_text()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    formatted = ctx.get_formatted_chat(messages, template, {"tools": TOOLS, "tool_choice": "auto"})
    assert formatted["grammar_lazy"] is True
    assert formatted["grammar_triggers"] == [{"type": 1, "value": "<tool_call>", "token": -1}]
    assert formatted["grammar"].startswith('root ::= "<tool_call>\\n"')
    # Push SmolLM2 (which knows no tools) to open a call; from "<tool_call>" on the grammar writes it.
    bias = [[token, 8.0] for token in ctx.tokenize("<tool_call>")["tokens"]]
    result = ctx.completion({"messages": messages, "chat_template": template, "tools": TOOLS, "tool_choice": "auto",
                             "temperature": 0, "n_predict": 80, "logit_bias": bias})
    assert result["text"].startswith("<tool_call>\n{") and result["text"].endswith("</tool_call>"), result["text"]
    (call,) = result["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    # Without a trigger in the reply, auto mode is plain text.
    plain = ctx.completion({"messages": messages, "chat_template": template, "tools": TOOLS, "tool_choice": "auto",
                            "temperature": 0, "n_predict": 12})
    assert "tool_calls" not in plain and plain["content"]


def test_llama_cpps_own_engine_is_selectable_but_not_lazily(ctx):
    native = ctx.completion({"prompt": "Is water wet?", "grammar": 'root ::= " yes" | " no"', "temperature": 0,
                             "grammar_engine": "llama_cpp"})
    guided = ctx.completion({"prompt": "Is water wet?", "grammar": 'root ::= " yes" | " no"', "temperature": 0})
    assert native["text"] == guided["text"] and native["text"] in (" yes", " no")
    with pytest.raises(UnsupportedFeatureError, match="lazy grammars run on grammar_engine"):
        ctx.completion({"prompt": PROMPT, "grammar": 'root ::= "x"', "grammar_engine": "llama_cpp", "grammar_lazy": True,
                        "grammar_triggers": [{"type": 1, "value": "x"}]})


def test_forced_tokens_are_evaluated_together_and_the_text_is_the_same(ctx):
    """Fast-forward skips sampling where the grammar allows one continuation; the result still obeys it."""
    grammar = 'root ::= "{\\"answer\\": \\"" [a-z]{1,8} "\\", \\"confidence\\": " [0-9] "}"'
    result = ctx.completion({"prompt": "Reply in JSON:", "grammar": grammar, "temperature": 0, "n_predict": 40})
    assert re.fullmatch(r'\{"answer": "[a-z]{1,8}", "confidence": [0-9]\}', result["text"]), result["text"]
    guide = ctx._core.adapter.last_guide
    assert guide.forced_tokens >= 3  # the opening and the "confidence" key were forced, not sampled
    assert result["tokens_predicted"] > guide.forced_tokens
    # With n_probs every position keeps its logits: nothing is skipped, the text is the same.
    probed = ctx.completion({"prompt": "Reply in JSON:", "grammar": grammar, "temperature": 0, "n_predict": 40, "n_probs": 2})
    assert ctx._core.adapter.last_guide.forced_tokens == 0
    assert probed["text"] == result["text"]
