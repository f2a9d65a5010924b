"""Every tool-call and reasoning format llama.cpp's common/chat parses: detection, parser, streaming, grammars, and
each end to end through completion on the real model (its forcing grammar writes the call, the parser reads it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llamacompat import init_llama
from llamacompat.chat import ChatOptions, ReplyParser, TemplateTokens, format_chat
from llamacompat.chat.formats import FORMATS, pick_format
from llamacompat.chat.template import Caps, template_caps
from llamacompat.errors import UnsupportedFeatureError
from llamacompat.grammars.recognise import accepts

FORMAT = {f.name: f for f in FORMATS}
ARGS = {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": ARGS}}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "seed": 1}

# format -> (what its templates contain, as llama.cpp detects them; a reply with one call)
CASES = {
    "qwen3-coder": ("<tool_call><function=<parameter=",
                    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
                    "</function>\n</tool_call>"),
    "glm-4.5": ("[gMASK]<sop><arg_key><arg_value>",
                "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
                "<arg_value>3</arg_value>\n</tool_call>"),
    "minimax-m2": ("]~!b[ ]~b]", '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
                                 '<parameter name="days">3</parameter>\n</invoke>\n</minimax:tool_call>'),
    "seed-oss": ("<seed:think>", "<seed:tool_call>\n<function=get_weather>\n<parameter=city>Paris</parameter>\n"
                                 "<parameter=days>3</parameter>\n</function>\n</seed:tool_call>"),
    "deepseek-r1": ("<｜tool▁calls▁begin｜>", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                                         '{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    "deepseek-v3.1": ("message['prefix'] is defined and message['prefix'] and thinking <｜tool▁calls▁begin｜>",
                      '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris", "days": 3}'
                      "<｜tool▁call▁end｜><｜tool▁calls▁end｜>"),
    "kimi-k2": ("<|tool_calls_section_begin|><|tool_call_begin|>",
                '<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>'
                '{"city": "Paris", "days": 3}<|tool_call_end|><|tool_calls_section_end|>'),
    "functionary-v3.1": ("<|start_header_id|><function=", '<function=get_weather>{"city": "Paris", "days": 3}</function>'),
    "functionary-v3.2": (">>>all", 'get_weather\n{"city": "Paris", "days": 3}'),
    "firefunction-v2": (" functools[", ' functools[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]'),
    "command-r7b": ("<|END_THINKING|><|START_ACTION|>",
                    '<|START_ACTION|>[{"tool_call_id": "0", "tool_name": "get_weather", "parameters": {"city": "Paris", "days": 3}}]'
                    "<|END_ACTION|>"),
    "granite": ("elif thinking <|tool_call|>", '<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]'),
    "nemotron-v2": ("<SPECIAL_10>", '<TOOLCALL>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]</TOOLCALL>'),
    "lfm2": ("List of tools: <|tool_list_start|>[ ]<|tool_list_end|>",
             '<|tool_call_start|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]<|tool_call_end|>'),
    "apertus": ("<|system_start|><|tools_prefix|>",
                '<|tools_prefix|>[{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]<|tools_suffix|>'),
    "magistral": ("[THINK][/THINK][TOOL_CALLS]",
                  '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}, "id": "abcdefghi"}]'),
    "mistral": ("[TOOL_CALLS]", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}, "id": "abcdefghi"}]'),
    "hermes": ("<tool_call>", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'),
    "gpt-oss": ("<|channel|>", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 3}'),
    "gemma4": ("'<|tool_call>call:'", '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'),
    "llama3": ("<|start_header_id|>ipython<|end_header_id|><|python_tag|>",
               '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}'),
}
# Formats whose reply may open with text before the call.
PROSE_FIRST = sorted(set(CASES) - {"functionary-v3.2", "llama3", "gpt-oss"})


def _template(markers: str) -> str:
    """A ChatML template that carries a model family's markers (in a comment), so llama.cpp's detection picks it."""
    return ("{# " + markers + " #}{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_every_family_of_the_issue_has_a_format():
    assert set(CASES) <= set(FORMAT)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_format_is_picked_from_the_template_text(name):
    assert pick_format(_template(CASES[name][0]), Caps(tools=True)).name == name


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_format_parses_its_call(name):
    content, calls = FORMAT[name].with_tools([WEATHER]).parse(CASES[name][1], partial=False)
    assert content == "" and _calls(calls) == [("get_weather", {"city": "Paris", "days": 3})]


@pytest.mark.parametrize("name", PROSE_FIRST)
def test_text_before_a_call_is_content(name):
    content, calls = FORMAT[name].with_tools([WEATHER]).parse("Let me check. " + CASES[name][1], partial=False)
    assert content == "Let me check." and len(calls) == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_streamed_prefixes_show_no_marker_fragments_and_keep_one_id(name):
    text = ("Let me check. " if name in PROSE_FIRST else "") + CASES[name][1]
    parser = ReplyParser(FORMAT[name].with_tools([WEATHER]), "none")
    ids = set()
    for end in range(1, len(text) + 1):
        out = parser(text[:end], end < len(text))
        content = out.get("content", "")
        assert "Let me check.".startswith(content.strip()), (end, content)
        for call in out.get("tool_calls", []):
            assert "get_weather".startswith(call["function"]["name"]), (end, call)
            assert isinstance(json.loads(call["function"]["arguments"]), dict)
            ids.add(call["id"])
    assert _calls(out["tool_calls"]) == [("get_weather", {"city": "Paris", "days": 3})]
    assert len(ids) == 1


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_forcing_grammar_holds_the_call_and_nothing_else(name):
    fmt = FORMAT[name].with_tools([WEATHER])
    grammar = fmt.grammar([WEATHER], "required", False)
    reply = CASES[name][1]
    assert accepts(grammar, reply)
    assert not accepts(grammar, reply.replace("get_weather", "get_time"))
    assert not accepts(grammar, "Paris is sunny.")


@pytest.mark.parametrize("name", sorted(set(CASES) - {"functionary-v3.2", "llama3"}))
def test_the_lazy_grammar_starts_at_its_trigger(name):
    fmt = FORMAT[name].with_tools([WEATHER])
    (trigger,) = fmt.triggers
    reply = CASES[name][1]
    assert trigger.kind == "word" and trigger.value in reply
    assert accepts(fmt.lazy_grammar([WEATHER], False), reply[reply.index(trigger.value):])


def test_two_calls_in_parallel():
    text = CASES["qwen3-coder"][1] + "\n" + CASES["qwen3-coder"][1].replace("Paris", "Rome")
    fmt = FORMAT["qwen3-coder"].with_tools([WEATHER])
    assert [args["city"] for _, args in _calls(fmt.parse(text, False)[1])] == ["Paris", "Rome"]
    assert accepts(fmt.grammar([WEATHER], "required", True), text)
    kimi = CASES["kimi-k2"][1].replace("<|tool_calls_section_end|>", "") + \
        '<|tool_call_begin|>functions.get_weather:1<|tool_call_argument_begin|>{"city": "Rome"}<|tool_call_end|><|tool_calls_section_end|>'
    calls = FORMAT["kimi-k2"].parse(kimi, False)[1]
    assert [c["id"] for c in calls] == ["functions.get_weather:0", "functions.get_weather:1"]


def test_xml_arguments_follow_the_declared_types():
    text = CASES["qwen3-coder"][1].replace("Paris", "42")
    (call,) = FORMAT["qwen3-coder"].with_tools([WEATHER]).parse(text, False)[1]
    assert json.loads(call["function"]["arguments"]) == {"city": "42", "days": 3}  # a string stays a string


def test_llama_3_1_builtin_tools_use_the_python_tag_call_syntax():
    search = {"type": "function", "function": {"name": "brave_search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}
    text = '<|python_tag|>brave_search.call(query="weather in Paris")'
    fmt = FORMAT["llama3"]
    assert _calls(fmt.parse(text, False)[1]) == [("brave_search", {"query": "weather in Paris"})]
    assert _calls(fmt.parse(text[:44], True)[1]) == [("brave_search", {"query": "weath"})]
    assert fmt.parse(text[:20], True) == ("", [])
    assert accepts(fmt.grammar([search, WEATHER], "required", False), text)
    assert accepts(fmt.grammar([search, WEATHER], "required", False), '{"name": "get_weather", "parameters": {"city": "Oslo"}}')


def test_functionary_v3_2_all_is_the_answer():
    fmt = FORMAT["functionary-v3.2"]
    assert fmt.parse("all\nIt is sunny.", False) == ("It is sunny.", [])
    content, calls = fmt.parse('all\nChecking.\n>>>get_weather\n{"city": "Paris"}', False)
    assert content == "Checking." and _calls(calls) == [("get_weather", {"city": "Paris"})]


def test_gemma4_values_are_read_as_llama_cpp_reads_them():
    fmt = FORMAT["gemma4"]
    text = ('<|tool_call>call:plan{note:<|"|>say "hi"\nthen {go}<|"|>, tags:[<|"|>a<|"|>,<|"|>b<|"|>],where:{lat:48.5,lon:-2e1},'
            "ok:true,none:null}<tool_call|>")
    (call,) = fmt.parse(text, False)[1]
    assert json.loads(call["function"]["arguments"]) == {
        "note": 'say "hi"\nthen {go}', "tags": ["a", "b"], "where": {"lat": 48.5, "lon": -20.0}, "ok": True, "none": None}
    # streamed: containers and strings show so far, a number waits until it cannot grow
    assert _calls(fmt.parse(text[:text.index("lat:48") + 5], True)[1]) == [("plan", {
        "note": 'say "hi"\nthen {go}', "tags": ["a", "b"], "where": {}})]


def test_gemma4_parallel_calls_and_text_around_them():
    fmt = FORMAT["gemma4"].with_tools([WEATHER])
    one = CASES["gemma4"][1]
    two = one + one.replace("Paris", "Rome")
    content, calls = fmt.parse("Checking. " + two, False)
    assert content == "Checking." and [args["city"] for _, args in _calls(calls)] == ["Paris", "Rome"]
    assert accepts(fmt.grammar([WEATHER], "required", True), two)
    assert not accepts(fmt.grammar([WEATHER], "required", False), two)
    # the argument grammar follows the schema: required keys, declared types, no other keys
    grammar = fmt.grammar([WEATHER], "required", False)
    assert accepts(grammar, '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>}<tool_call|>')
    assert not accepts(grammar, "<|tool_call>call:get_weather{days:3}<tool_call|>")
    assert not accepts(grammar, '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,days:<|"|>3<|"|>}<tool_call|>')
    assert not accepts(grammar, '<|tool_call>call:get_weather{city:<|"|>Oslo<|"|>,wind:1}<tool_call|>')


CALL_TURNS = [*USER, {"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}, {"role": "assistant", "content": "It is sunny."}]


def test_gemma4_older_templates_get_results_in_the_model_turn_and_the_next_turn_opened():
    """llama.cpp folds calls, results and the answer into one model turn for Gemma 4's first templates; the
    template then ends the prompt closed and llama.cpp's handler opens the model's next turn."""
    chat = format_chat(_real("gemma4"), CALL_TURNS, TemplateTokens("<bos>", "<eos>", True), ChatOptions())
    assert chat.prompt.endswith("<|turn>model\n<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>"
                                "<|tool_response>response:get_weather{value:<|\"|>sunny, 21 C<|\"|>}<tool_response|>"
                                "It is sunny.<turn|>\n<|turn>model\n")
    assert chat.generation_prompt == "<|turn>model\n" and chat.chat_format == 3
    official = format_chat(_real("google-gemma-4-31B-it"), CALL_TURNS, TemplateTokens("<bos>", "<eos>", True), ChatOptions())
    assert "response:get_weather{value:<|\"|>sunny, 21 C<|\"|>}" in official.prompt  # it reads the tool message itself


def test_gpt_oss_real_template_renders_the_reasoning_of_a_call_turn_as_its_analysis():
    turns = [*USER, {**CALL_TURNS[1], "reasoning_content": "look it up"},
             {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "sunny"}'}]
    prompt = format_chat(_real("openai-gpt-oss-120b"), turns, TemplateTokens(), ChatOptions(tools=[WEATHER])).prompt
    assert prompt.endswith("<|start|>assistant<|channel|>analysis<|message|>look it up<|end|><|start|>assistant "
                           'to=functions.get_weather<|channel|>commentary json<|message|>{"city": "Paris"}<|call|>'
                           '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>'
                           '"{\\"sky\\": \\"sunny\\"}"<|end|><|start|>assistant')


# -- reasoning markers of each family -----------------------------------------------------------------------
@pytest.mark.parametrize("markers, text", [
    ("<seed:think>", "<seed:think>hmm</seed:think>Paris"),
    ("[THINK][/THINK][TOOL_CALLS]", "[THINK]hmm[/THINK]Paris"),
    ("<|END_THINKING|><|START_ACTION|>", "<|START_THINKING|>hmm<|END_THINKING|>Paris"),
    ("<|system_start|><|tools_prefix|>", "<|inner_prefix|>hmm<|inner_suffix|>Paris"),
    ("<tool_call><function=<parameter=", "<think>hmm</think>Paris"),
    ("<|channel|>", "<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>final<|message|>Paris"),
    ("'<|tool_call>call:'", "<|channel>thought\nhmm<channel|>Paris"),
])
def test_reasoning_markers_of_each_family(markers, text):
    chat = format_chat(_template(markers), USER, TemplateTokens(), ChatOptions(reasoning_format="auto"))
    parser = chat.parser()
    assert parser(text, False) == {"reasoning_content": "hmm", "content": "Paris"}
    for end in range(1, len(text)):  # no marker piece ever shows
        out = parser(text[:end], True)
        assert "hmm".startswith(out.get("reasoning_content", "")) and "Paris".startswith(out.get("content", "")), (end, out)


def test_gpt_oss_without_reasoning_format_keeps_the_analysis_in_content():
    chat = format_chat(_template("<|channel|>"), USER, TemplateTokens(), ChatOptions())
    text = "<|channel|>analysis<|message|>hmm<|end|><|start|>assistant<|channel|>final<|message|>Paris"
    assert chat.parser()(text, False) == {"content": "<|channel|>analysis<|message|>hmm<|end|>Paris"}


# -- on the real model ---------------------------------------------------------------------------------------
# One city and one day count: the forcing grammar then leaves the model only the syntax of the format.
FIXED = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"days": {"type": "integer", "enum": [3]}}, "required": ["days"]}}}


@pytest.mark.parametrize("name", sorted(CASES))
def test_completion_writes_and_parses_each_format(ctx, name):
    events = []
    result = ctx.completion({"messages": USER, "chat_template": _template(CASES[name][0]), "tools": [FIXED],
                             "tool_choice": "required", "n_predict": 96, **GREEDY}, events.append)
    assert _calls(result["tool_calls"]) == [("get_weather", {"days": 3})], result["text"]
    assert result["chat_format"] == (3 if name == "gemma4" else 2) and "content" not in result  # llama.rn's PEG_GEMMA4
    streamed = [e["tool_calls"] for e in events if "tool_calls" in e]
    assert streamed and streamed[-1] == result["tool_calls"]
    assert {calls[0]["id"] for calls in streamed} == {result["tool_calls"][0]["id"]}


@pytest.mark.parametrize("markers, reply", [
    ("<seed:think>", "<seed:think>cold</seed:think>Paris"),
    ("<|channel|>", "<|channel|>analysis<|message|>cold<|end|><|start|>assistant<|channel|>final<|message|>Paris"),
    ("<|END_THINKING|><|START_ACTION|>", "<|START_THINKING|>cold<|END_THINKING|>Paris"),
    ("'<|tool_call>call:'", "<|channel>thought\ncold<channel|>Paris"),
])
def test_completion_splits_each_familys_reasoning(ctx, markers, reply):
    grammar = "root ::= " + json.dumps(reply)
    result = ctx.completion({"messages": USER, "chat_template": _template(markers), "grammar": grammar,
                             "reasoning_format": "auto", "n_predict": 64, **GREEDY})
    assert result["text"] == reply
    assert result["reasoning_content"] == "cold" and result["content"] == "Paris"


# -- the families' real templates (tests/data/chat_templates, llama.cpp's models/templates copies) ------------------
TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
# template -> the format llama.cpp's marker checks pick for it
REAL = {
    "ByteDance-Seed-OSS": "seed-oss",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": "command-r7b",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": "deepseek-r1",
    "deepseek-ai-DeepSeek-V3.1": "deepseek-v3.1",
    "fireworks-ai-llama-3-firefunction-v2": "firefunction-v2",
    "glm_4_5": "glm-4.5",
    "GLM-4.6": "glm-4.5",
    "ibm-granite-granite-3.3-2B-Instruct": "granite",
    "llama-cpp-lfm2": "lfm2",
    "meetkai-functionary-medium-v3.1": "functionary-v3.1",
    "meetkai-functionary-medium-v3.2": "functionary-v3.2",
    "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "mistralai-Mistral-Small-3.1-24B-Instruct-2503": "mistral",
    "moonshotai-Kimi-K2-Thinking": "kimi-k2",
    "NVIDIA-Nemotron-Nano-v2": "nemotron-v2",
    "Qwen3-Coder": "qwen3-coder",
    "unsloth-MiniMax-M2": "minimax-m2",
    "openai-gpt-oss-120b": "gpt-oss",
    "gemma4": "gemma4",
    "google-gemma-4-31B-it-interleaved": "gemma4",
    "google-gemma-4-31B-it": "gemma4",
}


def _real(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(REAL))
def test_the_format_is_picked_from_each_real_template(name):
    source = _real(name)
    assert pick_format(source, template_caps(source)).name == REAL[name]


def test_kimi_k2s_first_template_has_no_call_syntax_and_is_refused_for_calls():
    source = _real("moonshotai-Kimi-K2")  # describes tools, writes no calls (the Thinking template does)
    with pytest.raises(UnsupportedFeatureError, match="does not parse yet"):
        pick_format(source, template_caps(source))


# FireFunction's template needs a 'functions' variable that llama.rn 0.12.9 no longer passes: it cannot render.
RENDERABLE = sorted(set(REAL) - {"fireworks-ai-llama-3-firefunction-v2"})


# Command R7B's system preamble alone is about 1,400 SmolLM2 tokens: it gets a context of its own.
LONG = {"CohereForAI-c4ai-command-r7b-12-2024-tool_use"}


@pytest.fixture
def long_ctx():
    context = init_llama({"n_ctx": 2048, "n_threads": 2})
    yield context
    context.release()


@pytest.mark.parametrize("name", RENDERABLE)
def test_completion_with_each_real_template_writes_and_parses_its_format(request, name):
    context = request.getfixturevalue("long_ctx" if name in LONG else "ctx")
    events = []
    result = context.completion({"messages": USER, "chat_template": _real(name), "tools": [FIXED], "tool_choice": "required",
                             "n_predict": 96, **GREEDY}, events.append)
    assert _calls(result["tool_calls"]) == [("get_weather", {"days": 3})], result["text"]
    streamed = [e["tool_calls"] for e in events if "tool_calls" in e]
    assert streamed and streamed[-1] == result["tool_calls"]
    assert {calls[0]["id"] for calls in streamed} == {result["tool_calls"][0]["id"]}


def test_gpt_oss_templates_read_the_reasoning_as_thinking_and_keep_the_developer_role():
    """llama.cpp's GPT-OSS handler copies reasoning_content to 'thinking' (and drops the content of a call turn that
    has reasoning); every template but GPT-OSS's gets 'developer' as 'system'."""
    template = ("{# <|channel|> #}{% for m in messages %}[{{ m.role }}|{{ m.thinking | default('-') }}|"
                "{{ m.content | default('none') }}]{% endfor %}")
    messages = [{"role": "developer", "content": "Be brief."}, *USER,
                {"role": "assistant", "content": "", "reasoning_content": "look it up",
                 "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "assistant", "content": "Sunny.", "reasoning_content": "read it"}]
    prompt = format_chat(template, messages, TemplateTokens(), ChatOptions()).prompt
    assert prompt == ("[developer|-|Be brief.][user|-|What is the weather in Paris?][assistant|look it up|none]"
                      "[assistant|read it|Sunny.]")
    plain = format_chat(template.replace("<|channel|>", ""), messages, TemplateTokens(), ChatOptions()).prompt
    assert plain.startswith("[system|-|Be brief.]") and "[assistant|-|Sunny.]" in plain
