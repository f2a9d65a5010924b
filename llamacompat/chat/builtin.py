"""Built-in chat templates by name, and llama.cpp's legacy template detection.

Each built-in is a Jinja template written to render exactly what llama.cpp's
``llama_chat_apply_template`` renders for the same name (the tests compare them
byte for byte), so a name means the same prompt on the Jinja path and on the
legacy path (``jinja: false``). ``hermes`` (alias ``qwen2``) is ChatML with
Qwen 2.5 / Hermes style tools, which llama.cpp has no legacy name for.
"""

from __future__ import annotations

import difflib

from ..errors import TemplateError

__all__ = ["BUILTIN_TEMPLATES", "template_source", "legacy_name"]


def _each(body: str, generation: str = "") -> str:
    """A loop over messages with ``body`` (Jinja), then ``generation`` text when asked for."""
    tail = "{%- if add_generation_prompt -%}{{ '" + generation + "' }}{%- endif -%}" if generation else ""
    return "{%- for message in messages -%}" + body + "{%- endfor -%}" + tail


def _llama2(system: bool, bos_inside: bool, strip: bool) -> str:
    content = "message['content'] | trim" if strip else "message['content']"
    system_text = ("'<<SYS>>\\n' + " + content + " + '\\n<</SYS>>\\n\\n'") if system else (content + " + '\\n'")
    reopen = "<s>[INST] " if bos_inside else "[INST] "
    return (
        "{%- set ns = namespace(inside=true) -%}{{ '[INST] ' }}"
        + _each(
            "{%- if not ns.inside -%}{{ '" + reopen + "' }}{%- set ns.inside = true -%}{%- endif -%}"
            "{%- if message['role'] == 'system' -%}{{ " + system_text + " }}"
            "{%- elif message['role'] == 'user' -%}{{ " + content + " + ' [/INST]' }}"
            "{%- else -%}{{ " + content + " + '</s>' }}{%- set ns.inside = false -%}{%- endif -%}"
        )
    )


def _mistral(leading: str, trailing: str, trim_assistant: bool) -> str:
    answer = "message['content'] | trim" if trim_assistant else "message['content']"
    return "{%- set ns = namespace(inside=false) -%}" + _each(
        "{%- if not ns.inside -%}{{ '" + leading + "[INST]" + trailing + "' }}{%- set ns.inside = true -%}{%- endif -%}"
        "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
        "{%- elif message['role'] == 'user' -%}{{ message['content'] + '" + leading + "[/INST]' }}"
        "{%- else -%}{{ '" + trailing + "' + " + answer + " + '</s>' }}{%- set ns.inside = false -%}{%- endif -%}"
    )


def _mistral_v7(space: str) -> str:
    return _each(
        "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]" + space + "' + message['content'] + '[/SYSTEM_PROMPT]' }}"
        "{%- elif message['role'] == 'user' -%}{{ '[INST]" + space + "' + message['content'] + '[/INST]' }}"
        "{%- else -%}{{ '" + space + "' + message['content'] + '</s>' }}{%- endif -%}"
    )


_GEMMA = "{%- set ns = namespace(system='') -%}" + _each(
    "{%- if message['role'] == 'system' -%}{%- set ns.system = ns.system + (message['content'] | trim) -%}"
    "{%- else -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\\n\\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ (message['content'] | trim) + '<end_of_turn>\\n' }}{%- endif -%}",
    "<start_of_turn>model\\n",
)

# ChatML with Hermes 2 Pro / Qwen 2.5 style tools: a <tools> list in the system
# turn, calls as <tool_call> JSON, results as <tool_response> in a user turn.
_HERMES = (
    "{%- if tools -%}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' -%}{{ messages[0]['content'] + '\\n\\n' }}{%- endif -%}"
    "{{ '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\\n' + (tool | tojson) }}{%- endfor -%}"
    "{{ '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": <args-json-object>}"
    "\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' -%}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' or (message['role'] == 'assistant' and not message.tool_calls) -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|im_start|>assistant' }}"
    "{%- if message['content'] -%}{{ '\\n' + message['content'] }}{%- endif -%}"
    "{%- for call in message.tool_calls -%}"
    "{{ '\\n<tool_call>\\n{\"name\": \"' + call.function.name + '\", \"arguments\": ' }}"
    "{%- if call.function.arguments is string -%}{{ call.function.arguments }}"
    "{%- else -%}{{ call.function.arguments | tojson }}{%- endif -%}{{ '}\\n</tool_call>' }}"
    "{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- elif message['role'] == 'system' and not loop.first -%}"
    "{{ '<|im_start|>system\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _each("{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}",
                    "<|im_start|>assistant\\n"),
    "llama2": _llama2(system=False, bos_inside=False, strip=False),
    "llama2-sys": _llama2(system=True, bos_inside=False, strip=False),
    "llama2-sys-bos": _llama2(system=True, bos_inside=True, strip=False),
    "llama2-sys-strip": _llama2(system=True, bos_inside=False, strip=True),
    "llama3": _each("{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim)"
                    " + '<|eot_id|>' }}", "<|start_header_id|>assistant<|end_header_id|>\\n\\n"),
    "mistral-v1": _mistral(" ", " ", trim_assistant=False),
    "mistral-v3": _mistral("", " ", trim_assistant=True),
    "mistral-v3-tekken": _mistral("", "", trim_assistant=False),
    "mistral-v7": _mistral_v7(" "),
    "mistral-v7-tekken": _mistral_v7(""),
    "phi3": _each("{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}", "<|assistant|>\\n"),
    "phi4": _each("{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}",
                  "<|im_start|>assistant<|im_sep|>"),
    "zephyr": _each("{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}", "<|assistant|>\\n"),
    "gemma": _GEMMA,
    "hermes": _HERMES,
}
# llama.cpp reads a name it does not know that starts with "mistral" as a
# [INST] template without the v1/v3/v7 markers, which is llama2's format.
_ALIASES = {"mistral": "llama2", "qwen2": "hermes"}


def _looks_like_jinja(text: str) -> bool:
    return "{{" in text or "{%" in text


def template_source(template: str) -> str:
    """Jinja source for ``template``, a built-in name or Jinja source itself."""
    name = _ALIASES.get(template, template)
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if _looks_like_jinja(template):
        return template
    names = sorted([*BUILTIN_TEMPLATES, *_ALIASES])
    close = difflib.get_close_matches(template, names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise TemplateError(f"chat_template {template!r} is neither Jinja source nor a built-in name "
                        f"({', '.join(names)}){hint}")


# Markers llama.cpp's llm_chat_detect_template looks for, in its order, limited
# to the formats built in here.
def legacy_name(template: str) -> str:
    """The built-in that llama.cpp's legacy path would pick for ``template`` (a name or Jinja source)."""
    name = _ALIASES.get(template, template)
    if name in BUILTIN_TEMPLATES and name != "hermes":
        return name
    has = template.__contains__
    if has("<|im_start|>"):
        return "phi4" if has("<|im_sep|>") else "chatml"
    if template.startswith("mistral") or has("[INST]"):
        if has("[SYSTEM_PROMPT]"):
            return "mistral-v7"
        if has("' [INST] ' + system_message") or has("[AVAILABLE_TOOLS]"):
            if has(" [INST]"):
                return "mistral-v1"
            return "mistral-v3-tekken" if has('"[INST]"') else "mistral-v3"
        if has("content.strip()"):
            return "llama2-sys-strip"
        if has("bos_token + '[INST]"):
            return "llama2-sys-bos"
        return "llama2-sys" if has("<<SYS>>") else "llama2"
    if has("<|assistant|>") and has("<|end|>"):
        return "phi3"
    if has("<|user|>") and has("<|endoftext|>") and not has("<|assistant|>"):
        return "zephyr"
    if has("<start_of_turn>"):
        return "gemma"
    if has("<|start_header_id|>") and has("<|end_header_id|>"):
        return "llama3"
    raise TemplateError("this custom template is not supported by the legacy formatter (jinja: false); "
                        "pass jinja: true, or a built-in chat_template name")
