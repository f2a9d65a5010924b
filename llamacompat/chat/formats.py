"""Tool-call formats: how a template asks for calls, the grammar that forces one, and the parser.

A format is picked from the template text, as llama.cpp picks its handlers:

- ``hermes``: Hermes 2 Pro / Qwen 2.5 ``<tool_call>{"name", "arguments"}</tool_call>``;
- ``llama3``: Llama 3.1-3.3 JSON ``{"name", "parameters"}`` (optionally after ``<|python_tag|>``);
- ``mistral``: Mistral Nemo ``[TOOL_CALLS][{"name", "arguments", "id"}]``;
- ``generic``: any template that does not describe tools itself (SmolLM2's
  ChatML, for one). The tools go into the system message, and the whole reply
  is JSON, ``{"tool_call": {...}}`` or ``{"response": "..."}``, always under a
  grammar, which is what makes small models call tools reliably (llama.cpp's
  former generic handler did the same).

Each parser returns ``(content, tool_calls)`` for a whole reply or, with
``partial``, for the prefix streamed so far: marker prefixes are held back and
a call appears as soon as its name is known, with its arguments so far.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import UnsupportedFeatureError
from ..grammars.schema import convert_json_schema_to_grammar
from ..grammars.triggers import Trigger
from ..text_stream import find_stop
from .messages import joined_text
from .partial_json import MISSING, parse_partial
from .template import Caps

__all__ = ["ToolFormat", "FORMATS", "pick_format", "held_back"]

_decoder = json.JSONDecoder()


def held_back(text: str, marker: str) -> str:
    """``text`` (without ``marker``) minus a trailing prefix of it, which may still become the marker.

    The engine's stop-string hold-back does the same for stop strings.
    """
    _, _, hold = find_stop(text, (marker,))
    return text[: len(text) - hold]


def _arguments(value: Any) -> str:
    # llama.cpp hands arguments back as compact JSON text.
    return json.dumps(value if value is not MISSING else {}, ensure_ascii=False, separators=(",", ":"))


def _call(obj: Any, args_key: str = "arguments") -> dict[str, Any] | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        parsed = parse_partial(args)
        args = parsed if isinstance(parsed, dict) else args
    call: dict[str, Any] = {"type": "function", "function": {"name": obj["name"], "arguments": _arguments(args)}}
    if isinstance(obj.get("id"), str):
        call["id"] = obj["id"]
    return call


def _value(text: str, partial: bool) -> tuple[Any, int]:
    """The JSON value at the start of ``text`` and where it ends (``len(text)`` if unfinished)."""
    stripped = text.lstrip()
    offset = len(text) - len(stripped)
    try:
        value, end = _decoder.raw_decode(stripped)
        return value, offset + end
    except ValueError:
        return (parse_partial(stripped) if partial else MISSING), len(text)


def _closed_object(parameters: Any) -> Any:
    """Arguments hold the declared parameters only, unless the schema asks for more (as llama.cpp's grammars do)."""
    if isinstance(parameters, dict) and "properties" in parameters and "additionalProperties" not in parameters:
        return {**parameters, "additionalProperties": False}
    return parameters or {}


def _call_schema(tools: list[dict[str, Any]], args_key: str, with_id: bool = False) -> dict[str, Any]:
    branches = []
    for tool in tools:
        function = tool["function"]
        properties: dict[str, Any] = {"name": {"const": function["name"]}, args_key: _closed_object(function.get("parameters"))}
        required = ["name", args_key]
        if with_id:
            properties["id"] = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}
            required.append("id")
        branches.append({"type": "object", "properties": properties, "required": required, "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


class ToolFormat:
    """One way of writing tool calls; subclasses fill in the markers, grammar and parser."""

    name = "content"
    chat_format = 0
    trigger = ""  # the text that starts a call, for lazy grammars and streaming hold-back
    stops: tuple[str, ...] = ()
    #: where a call starts, for tool_choice "auto": the lazy grammar constrains from there (llama.cpp's triggers)
    triggers: tuple[Trigger, ...] = ()

    def detect(self, source: str, caps: Caps) -> bool:
        return False

    def prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], choice: str, parallel: bool,
                caps: Caps) -> list[dict[str, Any]]:
        return messages

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        return ""

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """The grammar of a call from its trigger on (tool_choice "auto")."""
        return self.grammar(tools, "required", parallel)

    def parse(self, text: str, partial: bool) -> tuple[str, list[dict[str, Any]]]:
        return text, []

    @staticmethod
    def _embed(schema: dict[str, Any], root: str) -> str:
        return root + "\n" + convert_json_schema_to_grammar(schema, ["name"], root_name="tool-call")


class Hermes(ToolFormat):
    name, chat_format, trigger = "hermes", 2, "<tool_call>"
    triggers = (Trigger("word", "<tool_call>"),)

    def detect(self, source: str, caps: Caps) -> bool:
        return "<tool_call>" in source and "<function=" not in source

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        block = '"<tool_call>\\n" tool-call "\\n</tool_call>"'
        root = f"root ::= {block} (\"\\n\" {block})*" if parallel else f"root ::= {block}"
        return self._embed(_call_schema(tools, "arguments"), root)

    def parse(self, text: str, partial: bool) -> tuple[str, list[dict[str, Any]]]:
        calls: list[dict[str, Any]] = []
        content, rest = text.partition(self.trigger)[::2] if self.trigger in text else (text, None)
        while rest is not None:
            value, end = _value(rest, partial)
            call = _call(value)
            if call is not None:
                calls.append(call)
            after = rest[end:].lstrip()
            if after.startswith("</tool_call>"):
                after = after[len("</tool_call>"):]
            rest = after.partition(self.trigger)[2] if self.trigger in after else None
        if partial and not calls:
            content = held_back(content, self.trigger)
        return (content.rstrip() if calls else content), calls


class Llama3(ToolFormat):
    name, chat_format, trigger = "llama3", 3, "<|python_tag|>"
    stops = ("<|eom_id|>",)
    # A reply that opens with {"name" is a call (llama.cpp's pattern); so is the built-in tools' python tag.
    triggers = (Trigger("word", "<|python_tag|>"), Trigger("pattern_full", r'\s*(\{\s*"name")[\s\S]*'))

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        return self._embed(_call_schema(tools, "parameters"), 'root ::= ("<|python_tag|>" [ \\n]*)? tool-call')

    def detect(self, source: str, caps: Caps) -> bool:
        return "<|start_header_id|>" in source and ("<|python_tag|>" in source or "ipython" in source)

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        return self._embed(_call_schema(tools, "parameters"), "root ::= tool-call")

    def parse(self, text: str, partial: bool) -> tuple[str, list[dict[str, Any]]]:
        body = text.lstrip()
        if body.startswith(self.trigger):
            body = body[len(self.trigger):].lstrip()
        if not body.startswith("{"):
            return (held_back(text, self.trigger) if partial else text), []
        value, end = _value(body, partial)
        call = _call(value, "parameters")
        if call is None:  # JSON, but not a call: it is the answer
            return ("" if partial and end == len(body) else text), []
        return body[end:].strip(), [call]


class Mistral(ToolFormat):
    name, chat_format, trigger = "mistral", 4, "[TOOL_CALLS]"
    triggers = (Trigger("word", "[TOOL_CALLS]"),)

    def detect(self, source: str, caps: Caps) -> bool:
        return "[TOOL_CALLS]" in source

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        more = ' ("," tool-call)*' if parallel else ""
        return self._embed(_call_schema(tools, "arguments", with_id=True), f'root ::= "[TOOL_CALLS][" tool-call{more} "]"')

    def parse(self, text: str, partial: bool) -> tuple[str, list[dict[str, Any]]]:
        if self.trigger not in text:
            return (held_back(text, self.trigger) if partial else text), []
        content, rest = text.split(self.trigger, 1)
        value, _ = _value(rest, partial)
        items = value if isinstance(value, list) else [value]
        return content.rstrip(), [call for call in map(_call, items) if call is not None]


class Generic(ToolFormat):
    name, chat_format = "generic", 1

    def detect(self, source: str, caps: Caps) -> bool:
        return not caps.tools

    @staticmethod
    def _reply_schema(tools: list[dict[str, Any]], choice: str, parallel: bool) -> dict[str, Any]:
        call = _call_schema(tools, "arguments")
        if parallel:
            calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1}},
                     "required": ["tool_calls"], "additionalProperties": False}
        else:
            calls = {"type": "object", "properties": {"tool_call": call}, "required": ["tool_call"],
                     "additionalProperties": False}
        if choice == "required":
            return calls
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [calls, answer]}

    def prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], choice: str, parallel: bool,
                caps: Caps) -> list[dict[str, Any]]:
        key = '"tool_calls": [{"name": <tool name>, "arguments": {...}}, ...]' if parallel else \
            '"tool_call": {"name": <tool name>, "arguments": {...}}'
        instructions = (
            "You can call these tools:\n" + json.dumps(tools, ensure_ascii=False, indent=2)
            + "\n\nReply with one JSON object: {" + key + "} to call "
            + ("tools" if parallel else "a tool")
            + ("." if choice == "required" else ', or {"response": "<your answer>"} to answer the user.')
        )
        shaped = list(messages)
        if shaped and shaped[0]["role"] == "system":
            shaped[0] = {**shaped[0], "content": f"{joined_text(shaped[0]['content'])}\n\n{instructions}"}
        else:
            shaped.insert(0, {"role": "system", "content": instructions})
        return shaped

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        return convert_json_schema_to_grammar(self._reply_schema(tools, choice, parallel), ["tool_call", "tool_calls", "name"])

    def parse(self, text: str, partial: bool) -> tuple[str, list[dict[str, Any]]]:
        if not text.lstrip().startswith("{"):
            return text, []  # the model answered in plain text
        value, _ = _value(text, partial)
        if not isinstance(value, dict):
            return ("" if partial else text), []
        if "tool_call" in value:
            call = _call(value["tool_call"])
            return "", [call] if call else []
        if isinstance(value.get("tool_calls"), list):
            return "", [call for call in map(_call, value["tool_calls"]) if call is not None]
        response = value.get("response", "")
        return (response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)), []


CONTENT = ToolFormat()
FORMATS: tuple[ToolFormat, ...] = (Hermes(), Llama3(), Mistral(), Generic())


def pick_format(source: str, caps: Caps) -> ToolFormat:
    """The tool format of a template; templates with their own unknown tool syntax are refused."""
    for candidate in FORMATS:
        if candidate.detect(source, caps):
            return candidate
    raise UnsupportedFeatureError(
        "tools: this chat template describes tools in a format llamacompat does not parse yet "
        f"(supported: {', '.join(f.name for f in FORMATS)}); pass chat_template='hermes' or a template without tools")

