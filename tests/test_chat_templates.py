"""Chat templates: llamacompat's prompts are byte-identical to llama.cpp's.

Two references: llama-cpp-python's Jinja formatter for real model templates
(tests/data/chat_templates), given the messages as llama.cpp's Jinja path
shapes them, and llama.cpp's own ``llama_chat_apply_template`` for the built-in
names.
"""

from __future__ import annotations

import ctypes
import datetime
import json
from pathlib import Path

import jinja2
import llama_cpp
import pytest
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from llamacompat.chat import BUILTIN_TEMPLATES, ChatOptions, TemplateTokens, format_chat
from llamacompat.chat.template import template_caps
from llamacompat.errors import TemplateError

DATA = Path(__file__).parent / "data" / "chat_templates"
NOW = datetime.datetime(2026, 11, 22, 9, 30)

# template file -> (bos, eos) of its model; add_bos where the model's tokenizer adds one.
MODELS = {
    "meta-llama-Llama-3.1-8B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", True),
    "meta-llama-Llama-3.2-3B-Instruct": ("<|begin_of_text|>", "<|eot_id|>", True),
    "Qwen-Qwen2.5-7B-Instruct": ("", "<|im_end|>", False),
    "Qwen-Qwen3-0.6B": ("", "<|im_end|>", False),
    "mistralai-Mistral-Nemo-Instruct-2407": ("<s>", "</s>", True),
    "google-gemma-2-2b-it": ("<bos>", "<eos>", True),
    "microsoft-Phi-3.5-mini-instruct": ("<s>", "<|endoftext|>", True),
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("<|begin_of_text|>", "<|im_end|>", True),
    "ibm-granite-granite-3.3-2B-Instruct": ("<|end_of_text|>", "<|end_of_text|>", False),
    # the tool-call / reasoning families of llama.cpp's common/chat (its models/templates copies)
    "ByteDance-Seed-OSS": ("<seed:bos>", "<seed:eos>", False),
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use": ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", True),
    "deepseek-ai-DeepSeek-V3.1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", True),
    "glm_4_5": ("", "<|endoftext|>", False),
    "GLM-4.6": ("", "<|endoftext|>", False),
    "llama-cpp-lfm2": ("<|startoftext|>", "<|im_end|>", True),
    "meetkai-functionary-medium-v3.1": ("<|begin_of_text|>", "<|eot_id|>", True),
    "meetkai-functionary-medium-v3.2": ("<|begin_of_text|>", "<|eot_id|>", True),
    "mistralai-Mistral-Small-3.1-24B-Instruct-2503": ("<s>", "</s>", True),
    "moonshotai-Kimi-K2": ("", "<|im_end|>", False),
    "moonshotai-Kimi-K2-Thinking": ("", "<|im_end|>", False),
    "NVIDIA-Nemotron-Nano-v2": ("<s>", "<SPECIAL_12>", False),
    "Qwen3-Coder": ("", "<|im_end|>", False),
    "unsloth-MiniMax-M2": ("", "[e~[", False),
    "openai-gpt-oss-120b": ("<|startoftext|>", "<|return|>", False),
    "gemma4": ("<bos>", "<eos>", True),
    "google-gemma-4-31B-it-interleaved": ("<bos>", "<eos>", True),
    "google-gemma-4-31B-it": ("<bos>", "<eos>", True),
}
# Templates that get tool-call arguments as objects (llama.cpp's workaround::func_args_not_string, by the
# template's caps): they write the arguments out as JSON themselves or take the object apart key by key.
OBJECT_ARGUMENTS = {
    "Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct", "meta-llama-Llama-3.2-3B-Instruct",
    "mistralai-Mistral-Nemo-Instruct-2407", "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use", "ByteDance-Seed-OSS",
    "CohereForAI-c4ai-command-r7b-12-2024-tool_use", "glm_4_5", "GLM-4.6", "llama-cpp-lfm2",
    "mistralai-Mistral-Small-3.1-24B-Instruct-2503", "moonshotai-Kimi-K2-Thinking", "NVIDIA-Nemotron-Nano-v2", "Qwen3-Coder",
    "unsloth-MiniMax-M2", "openai-gpt-oss-120b", "gemma4", "google-gemma-4-31B-it-interleaved", "google-gemma-4-31B-it",
}
# Gemma 4's first templates read tool results from the model turn's 'tool_responses': llama.cpp folds a call turn
# and its results into one message for them (the official template reads 'tool' messages itself).
GEMMA4_FOLDED = {"gemma4", "google-gemma-4-31B-it-interleaved"}

SYSTEM = {"role": "system", "content": "You are terse. Ünïcödé is fine: ✓"}
TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Name the capital of France."},
]
CONVERSATIONS = {
    "single": [{"role": "user", "content": "Which city is the capital of France?"}],
    "system": [SYSTEM, *TURNS],
    "multi-turn": TURNS,
    "parts": [{"role": "user", "content": [{"type": "text", "text": "First line"}, {"type": "text", "text": "second"}]}],
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
TOOL_TURNS = [
    SYSTEM,
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call12345", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": '{"sky": "sunny"}'},
]


def _source(name: str) -> str:
    return (DATA / f"{name}.jinja").read_text(encoding="utf-8")


def _as_llama_cpp_shapes(name: str, messages: list[dict], source: str) -> list[dict]:
    """The messages as llama.cpp's Jinja path hands them over, written out by hand per case."""
    out = []
    for m in messages:
        m = dict(m)
        if isinstance(m["content"], list):
            m["content"] = "\n".join(p["text"] for p in m["content"])
        if "tool_calls" in m and name in OBJECT_ARGUMENTS:
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                               for c in m["tool_calls"]]
        if m["role"] == "tool" and name in GEMMA4_FOLDED:  # TOOL_TURNS' one call and its result, by hand
            out[-1] = {"role": "assistant", "tool_calls": out[-1]["tool_calls"],
                       "tool_responses": [{"name": "get_weather", "response": json.loads(m["content"])}]}
            continue
        out.append(m)
    if name == "google-gemma-2-2b-it" and out[0]["role"] == "system":  # no system role: merged into the next turn
        system = out.pop(0)
        out[0] = {**out[0], "content": system["content"] + "\n" + out[0]["content"]}
    return out


def _reference(name: str, messages: list[dict], tools: list[dict] | None = None, generation: bool = True) -> str:
    bos, eos, add_bos = MODELS[name]
    source = _source(name)
    formatter = Jinja2ChatFormatter(source, eos_token=eos, bos_token=bos, add_generation_prompt=generation)
    formatter.strftime_now = NOW.strftime  # its clock is today's; ours is pinned to NOW, as the comparison needs
    # llama.cpp leaves 'tools' undefined without tools; the formatter would pass None.
    extra = {"tools": tools or jinja2.Undefined(name="tools")}
    prompt = formatter(messages=_as_llama_cpp_shapes(name, messages, source), enable_thinking=True,
                       datetime=NOW.strftime("%b %d %Y"), date_string=NOW.strftime("%d %b %Y"), **extra).prompt
    return prompt[len(bos):] if add_bos and bos and prompt.startswith(bos) else prompt


def _ours(name: str, messages: list[dict], tools: list[dict] | None = None, generation: bool = True,
          tool_choice: str = "none") -> str:
    bos, eos, add_bos = MODELS[name]
    options = ChatOptions(tools=tools, tool_choice=tool_choice if tools else "auto", add_generation_prompt=generation, now=NOW)
    return format_chat(_source(name), messages, TemplateTokens(bos, eos, add_bos), options).prompt


def test_there_are_at_least_eight_templates():
    assert len(MODELS) >= 8 and all((DATA / f"{name}.jinja").exists() for name in MODELS)


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_prompt_is_byte_identical_to_llama_cpp_python(name, conversation):
    messages = CONVERSATIONS[conversation]
    ours = _ours(name, messages)
    assert ours == _reference(name, messages)
    assert "Name the capital" in ours or "capital of France" in ours or "second" in ours


@pytest.mark.parametrize("name", sorted(MODELS))
def test_without_generation_prompt_too(name):
    assert _ours(name, CONVERSATIONS["system"], generation=False) == _reference(name, CONVERSATIONS["system"], generation=False)


TOOL_TEMPLATES = ["Qwen-Qwen2.5-7B-Instruct", "Qwen-Qwen3-0.6B", "meta-llama-Llama-3.1-8B-Instruct",
                  "meta-llama-Llama-3.2-3B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407",
                  "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use"]


@pytest.mark.parametrize("name", TOOL_TEMPLATES)
def test_tools_calls_and_results_render_as_llama_cpp(name):
    ours = _ours(name, TOOL_TURNS, tools=[WEATHER])
    assert ours == _reference(name, TOOL_TURNS, tools=[WEATHER])
    assert "get_weather" in ours and "sunny" in ours


# The families' templates that describe tools or write calls: the same prompt whether tools are only described
# (tool_choice "none") or a call is asked for (the forcing grammar does not change the prompt of these families).
FAMILY_TOOL_TEMPLATES = ["ByteDance-Seed-OSS", "CohereForAI-c4ai-command-r7b-12-2024-tool_use",
                         "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "deepseek-ai-DeepSeek-V3.1", "glm_4_5", "GLM-4.6",
                         "ibm-granite-granite-3.3-2B-Instruct", "llama-cpp-lfm2", "meetkai-functionary-medium-v3.1",
                         "meetkai-functionary-medium-v3.2", "mistralai-Mistral-Small-3.1-24B-Instruct-2503",
                         "moonshotai-Kimi-K2-Thinking", "NVIDIA-Nemotron-Nano-v2", "Qwen3-Coder", "unsloth-MiniMax-M2",
                         "openai-gpt-oss-120b", "gemma4", "google-gemma-4-31B-it-interleaved", "google-gemma-4-31B-it"]


@pytest.mark.parametrize("tool_choice", ["none", "required"])
@pytest.mark.parametrize("name", FAMILY_TOOL_TEMPLATES)
def test_each_familys_template_renders_tools_calls_and_results_as_llama_cpp(name, tool_choice):
    ours = _ours(name, TOOL_TURNS, tools=[WEATHER], tool_choice=tool_choice)
    assert ours == _reference(name, TOOL_TURNS, tools=[WEATHER])
    assert "get_weather" in ours and "sunny" in ours


def test_a_template_that_drops_calls_gets_them_as_they_are_unless_the_generic_format_writes_them():
    """Kimi K2's first template describes tools but writes no calls: llama.cpp hands the turn over unchanged (an
    empty assistant turn), not as generic JSON; Phi 3.5 (no tools in its template) gets the generic JSON when calling."""
    ours = _ours("moonshotai-Kimi-K2", TOOL_TURNS, tools=[WEATHER])
    assert ours == _reference("moonshotai-Kimi-K2", TOOL_TURNS, tools=[WEATHER])
    assert "<|im_assistant|>assistant<|im_middle|><|im_end|>" in ours
    generic = _ours("microsoft-Phi-3.5-mini-instruct", TOOL_TURNS, tools=[WEATHER], tool_choice="required")
    assert '{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}' in generic


def test_template_caps_find_object_arguments_and_call_ids():
    for name in MODELS:
        assert template_caps(_source(name)).object_arguments == (name in OBJECT_ARGUMENTS), name
    # writes each call by its id only: still a template that renders calls
    assert template_caps(_source("moonshotai-Kimi-K2-Thinking")).tool_calls
    assert not template_caps(_source("moonshotai-Kimi-K2")).tool_calls


def test_template_caps_match_what_the_templates_do():
    caps = {name: template_caps(_source(name)) for name in MODELS}
    assert not caps["google-gemma-2-2b-it"].system_role
    assert all(c.system_role for n, c in caps.items() if n != "google-gemma-2-2b-it")
    for name in TOOL_TEMPLATES:
        assert caps[name].tools and caps[name].tool_calls and caps[name].object_arguments, name
    assert not caps["microsoft-Phi-3.5-mini-instruct"].tools


def test_the_date_reaches_templates_that_print_it():
    prompt = _ours("meta-llama-Llama-3.1-8B-Instruct", CONVERSATIONS["single"], tools=[WEATHER])
    assert "Today Date: 22 Nov 2026" in prompt


def test_enable_thinking_false_reaches_the_template():
    options = ChatOptions(enable_thinking=False, now=NOW)
    prompt = format_chat(_source("Qwen-Qwen3-0.6B"), CONVERSATIONS["single"], TemplateTokens("", "<|im_end|>"), options).prompt
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# -- built-in names against llama.cpp's llama_chat_apply_template ---------------------------------
def _llama_cpp_legacy(name: str, messages: list[dict], add_ass: bool) -> str:
    array = (llama_cpp.llama_chat_message * len(messages))(
        *(llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages))
    size = 1 << 16
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_chat_apply_template(name.encode(), array, len(messages), add_ass, buf, size)
    assert 0 < n < size, f"llama.cpp does not know {name!r}"
    return buf.raw[:n].decode()


LEGACY_CASES = {
    "system": [{"role": "system", "content": "  Be brief.  "}, *TURNS],
    "multi-turn": TURNS + [{"role": "assistant", "content": " Paris. "}, {"role": "user", "content": "Thanks"}],
    "single": [{"role": "user", "content": "Hi"}],
}
LEGACY_NAMES = sorted(set(BUILTIN_TEMPLATES) - {"hermes"}) + ["mistral"]


@pytest.mark.parametrize("add_ass", [True, False])
@pytest.mark.parametrize("case", sorted(LEGACY_CASES))
@pytest.mark.parametrize("name", LEGACY_NAMES)
def test_builtin_names_render_exactly_as_llama_cpp(name, case, add_ass):
    messages = LEGACY_CASES[case]
    expected = _llama_cpp_legacy(name, messages, add_ass)
    for jinja in (True, False):
        options = ChatOptions(add_generation_prompt=add_ass, jinja=jinja, now=NOW)
        assert format_chat(name, messages, TemplateTokens(), options).prompt == expected, (name, jinja)


def test_the_hermes_builtin_matches_qwen_2_5_when_a_system_message_is_given():
    qwen = _source("Qwen-Qwen2.5-7B-Instruct")
    for tools in (None, [WEATHER]):
        options = ChatOptions(tools=tools, tool_choice="none", now=NOW)
        tokens = TemplateTokens("", "<|im_end|>")
        assert format_chat("hermes", TOOL_TURNS, tokens, options).prompt == format_chat(qwen, TOOL_TURNS, tokens, options).prompt


# What llama.cpp's legacy detection picks for each model template; None: a format not built in here.
LEGACY_PICKS = {
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "chatml", "Qwen-Qwen2.5-7B-Instruct": "chatml",
    "Qwen-Qwen3-0.6B": "chatml", "google-gemma-2-2b-it": "gemma", "meta-llama-Llama-3.1-8B-Instruct": "llama3",
    "meta-llama-Llama-3.2-3B-Instruct": "llama3", "microsoft-Phi-3.5-mini-instruct": "phi3",
    "mistralai-Mistral-Nemo-Instruct-2407": "mistral-v3-tekken",
    "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B": None, "ibm-granite-granite-3.3-2B-Instruct": None,
}


@pytest.mark.parametrize("name", sorted(LEGACY_PICKS))
def test_legacy_path_renders_what_llama_cpp_renders_for_the_model_template(name):
    """jinja: false renders the built-in that llama_chat_apply_template(model template) uses."""
    source = _source(name)
    messages = LEGACY_CASES["system"]
    reference = _llama_cpp_legacy(source, messages, True)
    options = ChatOptions(jinja=False, now=NOW)
    if LEGACY_PICKS[name] is None:
        with pytest.raises(TemplateError, match="not supported by the legacy formatter"):
            format_chat(source, messages, TemplateTokens(), options)
        return
    assert format_chat(source, messages, TemplateTokens(), options).prompt == reference
    assert reference == _llama_cpp_legacy(LEGACY_PICKS[name], messages, True)
