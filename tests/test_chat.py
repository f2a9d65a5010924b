"""Chat: template errors, message checks, reply parsing (tools, reasoning) and real chat completions."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llamacompat import InvalidParamsError, TemplateError, UnsupportedFeatureError
from llamacompat.chat import ChatOptions, ReplyParser, TemplateTokens, format_chat
from llamacompat.chat.formats import FORMATS
from llamacompat.chat.partial_json import MISSING, parse_partial
from llamacompat.chat.reasoning import split_reasoning
from llamacompat.grammars.recognise import accepts

GREEDY = {"temperature": 0, "seed": 1}
FORMAT = {f.name: f for f in FORMATS}
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": WEATHER_ARGS}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def _format(template, messages=USER, **options):
    return format_chat(template, messages, TemplateTokens(), ChatOptions(**options))


# -- template errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("template, expected", [
    ("{% for m in messages %}\n{{ m.content }\n{% endfor %}", "line 2: syntax error"),
    ("{{ 'a' }}\n{{ raise_exception('Only user turns, please') }}", "line 2: the template refused the messages: Only user turns"),
    ("{{ 'ok' }}\n\n{{ messages[0].content + 5 }}", "line 3: TypeError"),
    ("{% for m in messages %}{{ m.nope.deeper }}{% endfor %}", "line 1"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("chatm1", "did you mean 'chatml'"),
])
def test_template_errors_name_the_line_and_carry_no_jinja_traceback(template, expected):
    with pytest.raises(TemplateError) as info:
        _format(template)
    assert expected in info.value.detail
    error = info.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)


def test_a_template_error_leaves_the_context_usable(ctx):
    with pytest.raises(TemplateError, match="line 1"):
        ctx.completion({"messages": USER, "chat_template": "{{ raise_exception('no') }}"})
    assert ctx.completion({"messages": USER, "n_predict": 2})["tokens_predicted"] == 2


# -- messages and tools -------------------------------------------------------------------------
@pytest.mark.parametrize("messages, where", [
    ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0]"),
    ([{"role": "assistant", "tool_calls": "get_weather"}], "messages[0].tool_calls"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], "messages[0].tool_calls[0].function.name"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}],
     "messages[0].tool_calls[0].function.arguments"),
    ([{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}], "messages[0].tool_calls[0].type"),
    ([{"role": "user", "content": "hi", "tool_calls": [{"function": {"name": "f"}}]}], "only assistant messages"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "b", "tool_call_id": 7}], "messages[1].tool_call_id"),
    ([{"role": "user", "content": "a", "name": ["x"]}], "messages[0].name"),
    ([{"role": "user", "content": "a"}, "b"], "messages[1]: must be a dict"),
    ([], "non-empty list"),
])
def test_malformed_messages_say_which_message_and_field(messages, where):
    with pytest.raises(InvalidParamsError) as info:
        _format("chatml", messages)
    assert where in info.value.detail


def test_media_parts_become_markers_and_malformed_ones_say_where():
    with pytest.raises(InvalidParamsError, match=r"messages\[0\].content\[1\].image_url"):
        _format("chatml", [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}])
    chat = _format("chatml", [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///a.png"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]}])
    assert chat.prompt.count("<__media__>") == 2
    assert chat.media_paths == ["file:///a.png", "data:audio/wav;base64,UklGRg=="]
    with pytest.raises(UnsupportedFeatureError, match="^Unsupported audio format: flac$"):
        _format("chatml", [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "x", "format": "flac"}}]}])


@pytest.mark.parametrize("options, expected", [
    ({"tools": {"get_weather": {}}}, "'tools' must be a list"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "declared twice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": "required"}, "needs at least one tool"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "'auto', 'none' or 'required'"),
    ({"tools": [WEATHER], "jinja": False}, "Jinja template path"),
])
def test_bad_tool_options_are_refused(options, expected):
    with pytest.raises((InvalidParamsError, UnsupportedFeatureError)) as info:
        _format("chatml", **options)
    assert expected in info.value.detail


def test_tools_with_a_grammar_or_a_plain_prompt_are_refused(ctx):
    with pytest.raises(InvalidParamsError, match="cannot combine"):
        ctx.completion({"messages": USER, "tools": [WEATHER], "grammar": "json"})
    with pytest.raises(InvalidParamsError, match="'tools' need 'messages'"):
        ctx.completion({"prompt": "x", "tools": [WEATHER]})
    with pytest.raises(InvalidParamsError, match="reasoning_format"):
        ctx.completion({"prompt": "x", "reasoning_format": "verbose"})


def test_a_template_with_an_unknown_tool_syntax_is_refused():
    template = "{% for t in tools %}<fn>{{ t.function.name }}</fn>{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    with pytest.raises(UnsupportedFeatureError, match="format llamacompat does not parse"):
        _format(template, tools=[WEATHER])


def test_formats_are_picked_from_the_template():
    assert _format("hermes", tools=[WEATHER]).tool_format.name == "hermes"
    assert _format("chatml", tools=[WEATHER]).tool_format.name == "generic"
    assert _format("chatml", tools=[WEATHER], tool_choice="none").tool_format.name == "content"
    required = _format("hermes", tools=[WEATHER], tool_choice="required")
    assert required.grammar.startswith('root ::= "<tool_call>\\n" tool-call')
    auto = _format("hermes", tools=[WEATHER])  # auto: the same grammar, lazily, from the call marker on
    assert auto.grammar == required.grammar and auto.grammar_lazy
    assert [t.as_dict() for t in auto.grammar_triggers] == [{"type": 1, "value": "<tool_call>", "token": -1}]
    assert not required.grammar_lazy and not required.grammar_triggers


def test_generic_format_tells_the_model_about_tools_and_keeps_earlier_calls():
    call = {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    messages = USER + [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = _format("chatml", messages, tools=[WEATHER]).prompt
    assert prompt.startswith("<|im_start|>system\nYou can call these tools:\n[")
    assert '"name": "get_weather"' in prompt and '{"response": "<your answer>"}' in prompt
    assert '<|im_start|>assistant\n{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}<|im_end|>' in prompt
    assert "<|im_start|>tool\nsunny<|im_end|>" in prompt


# -- reply parsing --------------------------------------------------------------------------------
def _calls(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed]


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris"})]),
    ("hermes", '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {"x": 1}}\n'
     "</tool_call>", "", [("a", {}), ("b", {"x": 1})]),
    ("hermes", "No tools needed: 4.", "No tools needed: 4.", []),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ("llama3", '{"answer": 4}', '{"answer": 4}', []),
    ("mistral", 'Sure[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abcdefghi"}]', "Sure",
     [("get_weather", {"city": "Rome"})]),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}', "", [("get_weather", {"city": "Paris"})]),
    ("generic", '{"tool_calls": [{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]}', "", [("a", {}), ("b", {})]),
    ("generic", '{"response": "It is sunny."}', "It is sunny.", []),
    ("generic", "plain words", "plain words", []),
])
def test_each_format_parses_its_tool_calls(name, text, content, calls):
    parsed_content, parsed_calls = FORMAT[name].parse(text, partial=False)
    assert parsed_content == content
    assert _calls(parsed_calls) == calls


def test_mistral_call_ids_are_kept_and_others_get_one_stable_id():
    parser = ReplyParser(FORMAT["mistral"], "none")
    out = parser('[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "abcdefghi"}]', False)
    assert out["tool_calls"][0]["id"] == "abcdefghi"
    parser = ReplyParser(FORMAT["generic"], "none")
    first = parser('{"tool_call": {"name": "f", "arguments": {"a": 1', True)["tool_calls"][0]["id"]
    assert parser('{"tool_call": {"name": "f", "arguments": {"a": 1}}}', False)["tool_calls"][0]["id"] == first


@pytest.mark.parametrize("name, text", [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}\n</tool_call>'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}, "id": "abcdefghi"}]'),
    ("generic", '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": [1, 2]}}'),
])
def test_streamed_prefixes_never_show_marker_fragments_and_end_at_the_final_parse(name, text):
    parser = ReplyParser(FORMAT[name], "none")
    final = parser(text, False)
    for end in range(1, len(text)):
        partial = parser(text[:end], True)
        content = partial.get("content", "")
        assert final.get("content", "").startswith(content.rstrip()), (end, content)
        assert "<tool_" not in content and "[TOOL" not in content and not content.startswith("{")
        for call in partial.get("tool_calls", []):
            assert call["function"]["name"] in "get_weather" and isinstance(json.loads(call["function"]["arguments"]), dict)
    assert _calls(final["tool_calls"]) == [("get_weather", {"city": "Paris", "days": [1, 2]})]


@pytest.mark.parametrize("text, partial", [
    ('{"a": [1, {"b": "x\\u00e9y', True), ('{"a": tr', True), ('[1, 2', True), ('{"k": "v"} trailing', False),
])
def test_partial_json_closes_what_is_open(text, partial):
    value = parse_partial(text)
    assert value is not MISSING
    assert json.loads(json.dumps(value)) == value
    assert parse_partial("   ") is MISSING


@pytest.mark.parametrize("mode, text, partial, forced, reasoning, content", [
    ("none", "<think>hmm</think>Paris", False, False, "", "<think>hmm</think>Paris"),
    ("auto", "<think>\nhmm\n</think>\n\nParis", False, False, "hmm", "Paris"),
    ("deepseek", "hmm</think>Paris", False, True, "hmm", "Paris"),
    ("deepseek-legacy", "<think>hmm</think>Paris", False, False, "hmm", "<think>hmm</think>Paris"),
    ("auto", "<thi", True, False, "", ""),
    ("auto", "<think>still going</thi", True, False, "still going", ""),
    ("auto", "Paris, no thinking", False, False, "", "Paris, no thinking"),
    ("auto", "never closed", False, True, "never closed", ""),
])
def test_reasoning_is_split_like_llama_cpp(mode, text, partial, forced, reasoning, content):
    assert split_reasoning(text, mode, partial, forced) == (reasoning, content)


def test_a_generation_prompt_that_opens_thinking_is_detected():
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}<think>\n{% endif %}"
    chat = _format(template, reasoning_format="auto")
    assert chat.thinking_forced_open and chat.generation_prompt == "<think>\n"
    result = chat.as_result()
    assert result["thinking_start_tag"] == "<think>" and result["thinking_end_tag"] == "</think>"


# -- on the real model --------------------------------------------------------------------------
def test_get_formatted_chat_has_llama_rn_shape(ctx):
    result = ctx.get_formatted_chat(USER, None, {"tools": [WEATHER], "tool_choice": "required"})
    for key in ("type", "prompt", "chat_format", "grammar", "grammar_lazy", "grammar_triggers", "preserved_tokens",
                "additional_stops", "generation_prompt", "thinking_forced_open", "has_media", "media_paths"):
        assert key in result, key
    assert result["type"] == "jinja" and result["chat_format"] == 2 and "tool_call" in result["grammar"]  # llama.rn: peg-native
    assert ctx.get_formatted_chat(USER, "chatml", {"jinja": False})["type"] == "llama-chat"
    schema = ctx.get_formatted_chat(USER, None, {"json_schema": WEATHER_ARGS})
    assert schema["grammar"].startswith("root ::=")


def test_chat_answers_which_city_is_the_capital_of_france(ctx):
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "Which city is the capital of France?"}]
    result = ctx.completion({"messages": messages, "n_predict": 24, **GREEDY})
    assert "Paris" in result["content"] and result["chat_format"] == 2  # every Jinja chat: peg-native, as llama.rn


def test_tool_call_round_trip_with_tool_choice_required(ctx):
    events = []
    first = ctx.completion({"messages": USER, "tools": [WEATHER], "tool_choice": "required", "n_predict": 96, **GREEDY},
                           events.append)
    assert first["stopped_eos"] and "content" not in first
    (call,) = first["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather" and call["id"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER_ARGS)
    assert "Paris" in arguments["city"]
    # Streaming carried cumulative partial calls, ending with the final one.
    streamed = [e["tool_calls"] for e in events if "tool_calls" in e]
    assert streamed and streamed[-1] == first["tool_calls"]
    assert all(calls[0]["id"] == call["id"] for calls in streamed)

    history = USER + [{"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "tool_call_id": call["id"],
                       "content": json.dumps({"city": "Paris", "sky": "sunny", "temperature_c": 18})}]
    answer = ctx.completion({"messages": history, "tools": [WEATHER], "tool_choice": "none", "n_predict": 48, **GREEDY})
    assert "tool_calls" not in answer
    assert "sunny" in answer["content"].lower() or "18" in answer["content"]


@pytest.mark.parametrize("template, wrap", [
    ("chatml", '{{"tool_call": {{"name": "get_weather", "arguments": {}}}}}'),
    ("hermes", '<tool_call>\n{{"name": "get_weather", "arguments": {}}}\n</tool_call>'),
])
def test_required_call_grammars_hold_only_the_declared_arguments(template, wrap):
    grammar = _format(template, tools=[WEATHER], tool_choice="required").grammar
    assert accepts(grammar, wrap.format('{"city": "Paris"}'))
    assert not accepts(grammar, wrap.format('{"city": "Paris", "type": "string"}'))
    assert not accepts(grammar, wrap.format("{}"))  # 'city' is required
    assert not accepts(grammar, wrap.format('{"city": "Paris"}').replace("get_weather", "get_time"))


def test_hermes_template_with_required_tool_choice_forces_a_tagged_call(ctx):
    result = ctx.completion({"messages": USER, "chat_template": "hermes", "tools": [WEATHER], "tool_choice": "required",
                             "n_predict": 96, **GREEDY})
    assert result["text"].startswith("<tool_call>\n") and result["chat_format"] == 2
    (call,) = result["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER_ARGS)


def test_forced_open_thinking_goes_to_reasoning_content(ctx):
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    params = {"messages": USER, "chat_template": template, "n_predict": 12, **GREEDY}
    plain = ctx.completion(params)
    thought = ctx.completion({**params, "reasoning_format": "auto"})
    assert thought["text"] == plain["text"]
    if "</think>" not in plain["text"]:
        assert thought["reasoning_content"] == plain["text"].strip() and "content" not in thought
    assert plain["content"] == plain["text"] and "reasoning_content" not in plain


def test_an_interrupted_chat_has_no_parsed_fields(ctx):
    def stop_after_first(event):
        ctx.stop_completion()

    result = ctx.completion({"messages": USER, "tools": [WEATHER], "n_predict": 32, **GREEDY}, stop_after_first)
    assert result["interrupted"] and not {"content", "tool_calls", "reasoning_content"} & set(result)
