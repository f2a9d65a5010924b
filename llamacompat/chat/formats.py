"""Tool-call formats: how a template asks for calls, the grammar that forces one, and the parser.

A format is picked from the template text, as llama.cpp's ``common/chat`` picks
its handlers (the same marker tests, in the same order). Most formats share one
of three shapes, so each is a small description of one shape:

- ``JsonInTags``: JSON calls after a marker, ``{"name", "arguments"}`` one per tag
  or as an array (Hermes 2 Pro / Qwen 2.5, Mistral Nemo, Magistral, FireFunction v2,
  Command R7B, Granite, Nemotron v2, LFM2, Apertus);
- ``NamedJson``: a marker that names the function, then its JSON arguments
  (Functionary v3.1, DeepSeek R1, DeepSeek V3.1, Kimi K2);
- ``XmlCalls``: a named function with one tagged element per argument
  (Qwen3-Coder, Seed-OSS, MiniMax-M2, GLM 4.5).

Llama 3.x (JSON or ``<|python_tag|>name.call(k=v)``), Functionary v3.2
(``>>>recipient``), GPT-OSS (harmony channels), Gemma 4 (``<|tool_call>call:name{key:value}``, its own
value notation) and ``generic`` (any template that
does not describe tools: the whole reply is JSON under a grammar) have their own.

Each parser returns ``(content, tool_calls)`` for a whole reply or, with
``partial``, for the prefix streamed so far: marker prefixes are held back and
a call appears as soon as its name is known, with its arguments so far.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, Callable

from ..errors import UnsupportedFeatureError
from ..grammars.schema import convert_json_schema_to_grammar
from ..grammars.triggers import Trigger
from ..text_stream import find_stop
from .messages import joined_text
from .partial_json import MISSING, parse_partial
from .template import Caps

__all__ = ["ToolFormat", "FORMATS", "pick_format", "held_back", "CONTENT"]

_decoder = json.JSONDecoder()
Call = dict[str, Any]
THINK = ("<think>", "</think>")


def held_back(text: str, marker: str) -> str:
    """``text`` (without ``marker``) minus a trailing prefix of it, which may still become the marker.

    The engine's stop-string hold-back does the same for stop strings.
    """
    _, _, hold = find_stop(text, (marker,))
    return text[: len(text) - hold]


def _arguments(value: Any) -> str:
    # llama.cpp hands arguments back as compact JSON text.
    return json.dumps(value if value is not MISSING else {}, ensure_ascii=False, separators=(",", ":"))


def _make_call(name: str, args: Any, call_id: Any = None) -> Call:
    if isinstance(args, str):  # some models write the arguments as a JSON string
        parsed = parse_partial(args)
        args = parsed if isinstance(parsed, dict) else args
    call: Call = {"type": "function", "function": {"name": name, "arguments": _arguments(args)}}
    if isinstance(call_id, str) and call_id:
        call["id"] = call_id
    return call


def _call(obj: Any, args_key: str = "arguments", name_key: str = "name", id_key: str = "id") -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get(name_key), str) or not obj[name_key]:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return _make_call(obj[name_key], args, obj.get(id_key))


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


def _call_schema(tools: list[dict[str, Any]], args_key: str, name_key: str = "name",
                 id_schema: dict[str, Any] | None = None, id_key: str = "id") -> dict[str, Any]:
    branches = []
    for tool in tools:
        function = tool["function"]
        properties: dict[str, Any] = {name_key: {"const": function["name"]}, args_key: _closed_object(function.get("parameters"))}
        required = [name_key, args_key]
        if id_schema is not None:
            properties[id_key] = id_schema
            required.append(id_key)
        branches.append({"type": "object", "properties": properties, "required": required, "additionalProperties": False})
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def _lit(text: str) -> str:
    """A GBNF string literal."""
    return json.dumps(text, ensure_ascii=False)


def _merged(*grammars: str) -> str:
    """Several embedded grammars as one: the shared primitive rules (string, ws, ...) once."""
    seen: dict[str, str] = {}
    for grammar in grammars:
        for line in grammar.splitlines():
            name, sep, _ = line.partition(" ::= ")
            if sep and name not in seen:
                seen[name] = line
    return "\n".join(seen.values()) + "\n"


def _rule_name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", "-".join(parts)).strip("-")


def _schema_rule(schema: Any, *name: str) -> tuple[str, str]:
    """(rule name, grammar text) of a JSON schema, for embedding."""
    rule = _rule_name(*name)
    return rule, convert_json_schema_to_grammar(schema, root_name=rule)


def _call_alternatives(tools: list[dict[str, Any]], alternative: Callable[[str, str], str]) -> tuple[list[str], list[str]]:
    """One grammar alternative per tool, ``alternative(function name, its arguments' rule)``, and the grammars of
    those argument rules (to ``_merged`` in)."""
    alternatives, rules = [], []
    for tool in tools:
        function = tool["function"]
        rule, text = _schema_rule(_closed_object(function.get("parameters")), "args", function["name"])
        rules.append(text)
        alternatives.append(alternative(function["name"], rule))
    return alternatives, rules


def _split(text: str, marker: str, partial: bool) -> tuple[str, str | None]:
    """(content before ``marker``, the rest after it) or, without it, (content, None) with a half marker held back."""
    if marker in text:
        before, _, rest = text.partition(marker)
        return before, rest
    return (held_back(text, marker) if partial else text), None


class ToolFormat:
    """One way of writing tool calls; subclasses fill in the markers, grammar and parser."""

    name = "content"
    trigger = ""  # the text that starts a call, for lazy grammars and streaming hold-back
    stops: tuple[str, ...] = ()
    #: where a call starts, for tool_choice "auto": the lazy grammar constrains from there (llama.cpp's triggers)
    triggers: tuple[Trigger, ...] = ()
    #: the reasoning markers of the model family
    think: tuple[str, str] = THINK
    #: the special tokens the model writes around calls (llama.rn's preserved_tokens)
    preserved: tuple[str, ...] = ()
    #: picked without tools too: the reply itself has this format's structure (llama.cpp does the same)
    always = False
    #: call ids written in the call's marker (Kimi K2), so complete as soon as the call shows
    ids_in_marker = False
    tools: tuple[dict[str, Any], ...] = ()
    #: the messages as llama.cpp's handler for the family rewrites them (``_REWRITES``), with or without tools
    rewrite: Callable[[list[dict[str, Any]], str], list[dict[str, Any]]] | None = None

    def detect(self, source: str, caps: Caps) -> bool:
        return False

    def with_tools(self, tools: list[dict[str, Any]]) -> "ToolFormat":
        """This format bound to a request's tools (the XML formats read argument types from them)."""
        bound = copy.copy(self)
        bound.tools = tuple(tools)
        return bound

    def prepare(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], choice: str, parallel: bool,
                caps: Caps) -> list[dict[str, Any]]:
        return messages

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        return ""

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """The grammar of a call from its trigger on (tool_choice "auto")."""
        return self.grammar(tools, "required", parallel)

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        return text, []

    def reopen(self, prompt: str) -> str:
        """What the family's llama.cpp handler appends to a generation prompt the template left closed ('' here)."""
        return ""

    @staticmethod
    def _embed(schema: dict[str, Any], root: str, name_key: str = "name") -> str:
        return root + "\n" + convert_json_schema_to_grammar(schema, [name_key], root_name="tool-call")


def _markers(*needles: str, absent: tuple[str, ...] = ()) -> Callable[[str, Caps], bool]:
    return lambda source, caps: all(n in source for n in needles) and not any(n in source for n in absent)


class JsonInTags(ToolFormat):
    """JSON calls after ``start`` (and before ``end``): one object per tag, or all of them in one array."""

    def __init__(self, name: str, detect: Callable[[str, Caps], bool], start: str, end: str = "", *, array: bool = False,
                 name_key: str = "name", args_key: str = "arguments", id_key: str = "id",
                 id_schema: dict[str, Any] | None = None, think: tuple[str, str] = THINK, keep: int = 0,
                 separator: str = "\n", stops: tuple[str, ...] = (), order: tuple[str, ...] = ()) -> None:
        self.name, self._detect, self.start, self.end, self.array = name, detect, start, end, array
        self.order = order or (name_key,)
        self.name_key, self.args_key, self.id_key, self.id_schema = name_key, args_key, id_key, id_schema
        self.think, self.keep, self.separator, self.stops = think, keep, separator, stops
        self.trigger = start
        self.triggers = (Trigger("word", start),)
        self.preserved = tuple(m for m in (start.strip(), end) if m)

    def detect(self, source: str, caps: Caps) -> bool:
        return self._detect(source, caps)

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        end = f" {_lit(self.end)}" if self.end else ""
        if self.array:
            more = ' ("," ws tool-call)*' if parallel else ""
            block = f'{_lit(self.start[: len(self.start) - self.keep])} "[" ws tool-call{more} ws "]"{end}'
            root = f"root ::= {block}"
        else:
            block = f"{_lit(self.start + self.separator)} tool-call {_lit(self.separator)}{end}" if self.separator else \
                f"{_lit(self.start)} tool-call{end}"
            root = f"root ::= {block} (\"\\n\" {block})*" if parallel else f"root ::= {block}"
        schema = _call_schema(tools, self.args_key, self.name_key, self.id_schema, self.id_key)
        return root + "\n" + convert_json_schema_to_grammar(schema, list(self.order), root_name="tool-call")

    def _calls(self, value: Any) -> list[Call]:
        items = value if isinstance(value, list) else [value]
        calls = [_call(item, self.args_key, self.name_key, self.id_key) for item in items]
        return [call for call in calls if call is not None]

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        content, rest = _split(text, self.start, partial)
        calls: list[Call] = []
        tail = ""
        while rest is not None:
            if self.keep:  # the marker's last characters belong to the JSON (FireFunction's " functools[")
                rest = self.start[-self.keep:] + rest
            value, end = _value(rest, partial)
            calls += self._calls(value)
            after = rest[end:].lstrip()
            if self.end and after.startswith(self.end):
                after = after[len(self.end):]
            if self.start in after:
                tail_part, _, rest = after.partition(self.start)
                tail += tail_part
            else:
                rest, tail = None, tail + after
        if partial and not calls:
            content = held_back(content, self.start)
        tail = tail.strip()
        if partial:  # an end or next-start marker being written is no content
            tail = held_back(held_back(tail, self.end), self.start.strip()) if self.end else held_back(tail, self.start.strip())
        if calls:
            content = content.rstrip() + (("\n" if content.strip() else "") + tail if tail else "")
        return content, calls


def _pattern(template: str) -> str:
    """A regex for a marker template with ``{name}`` (and ``{index}``) holes."""
    out = ""
    for piece in re.split(r"(\{name\}|\{index\})", template):
        out += {"{name}": r"(?P<name>[^\s<>{}\"]+?)", "{index}": r"(?P<index>\d+)"}.get(piece, re.escape(piece))
    return out


def _gbnf(template: str, name: str) -> str:
    parts = []
    for piece in re.split(r"(\{name\}|\{index\})", template):
        if piece == "{name}":
            parts.append(_lit(name))
        elif piece == "{index}":
            parts.append("[0-9]{1,3}")
        elif piece:
            parts.append(_lit(piece))
    return " ".join(parts)


class NamedJson(ToolFormat):
    """Calls whose opening marker names the function (``open`` has a ``{name}`` hole), JSON arguments, then ``close``."""

    def __init__(self, name: str, detect: Callable[[str, Caps], bool], open: str, close: str, *, block: tuple[str, str] = ("", ""),
                 think: tuple[str, str] = THINK, id_from_marker: bool = False, separator: str = "",
                 stops: tuple[str, ...] = ()) -> None:
        self.name, self._detect, self.open, self.close, self.block = name, detect, open, close, block
        self.think, self.id_from_marker, self.separator, self.stops = think, id_from_marker, separator, stops
        self.ids_in_marker = id_from_marker
        self._regex = re.compile(_pattern(open))
        self.trigger = block[0] or open.split("{")[0]
        self.triggers = (Trigger("word", self.trigger),)
        self.preserved = tuple(m for m in (*block, open.split("{")[0], close) if m.strip())

    def detect(self, source: str, caps: Caps) -> bool:
        return self._detect(source, caps)

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        alternatives, rules = _call_alternatives(tools, lambda name, rule: f"{_gbnf(self.open, name)} {rule} {_lit(self.close)}")
        calls = "call ::= " + " | ".join(alternatives)
        sep = f" {_lit(self.separator)}" if self.separator else ""
        body = f"call (({sep or ' ws'}) call)*" if parallel else "call"
        block = f"{_lit(self.block[0])} {body} {_lit(self.block[1])}" if self.block[0] else body
        # the schema grammars' bounded ws (one newline, then up to 20 blanks): an unbounded one lets a model
        # fill its whole budget with newlines inside the arguments (seen with SmolLM2 and DeepSeek V3.1's template)
        return _merged(f"root ::= {block}\n{calls}\nws ::= \"\" | \" \" | \"\\n\" [ \\t]{{0,20}}", *rules)

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        content, rest = _split(text, self.trigger, partial)
        if rest is None:
            return content, []
        if not self.block[0]:
            rest = self.trigger + rest
        calls: list[Call] = []
        while True:
            match = self._regex.search(rest)
            if match is None:
                break
            value, end = _value(rest[match.end():], partial)
            call_id = match.group(0)[len(self.open.split("{")[0]):] if self.id_from_marker else None
            if self.id_from_marker and "index" in match.groupdict():
                call_id = f"functions.{match.group('name')}:{match.group('index')}"
            calls.append(_make_call(match.group("name"), value, call_id))
            rest = rest[match.end() + end:]
            if rest.lstrip().startswith(self.close.lstrip()):
                rest = rest.lstrip()[len(self.close.lstrip()):]
            elif value is MISSING or end >= len(rest) + end:  # still writing this call
                rest = ""
                break
        tail = rest.replace(self.block[1], "", 1).strip() if self.block[1] else rest.strip()
        if partial and tail and not calls:
            tail = ""
        if partial and tail:
            for marker in (self.open.split("{")[0], self.block[1], self.close.lstrip()):
                tail = held_back(tail, marker) if marker else tail
        return content.rstrip() + ("\n" + tail if tail and content.strip() else tail), calls


class XmlCalls(ToolFormat):
    """A named function with one tagged element per argument; ``{name}`` / ``{key}`` mark the holes.

    String arguments are raw text; other types are JSON, read with the declared schema (llama.cpp's rule).
    """

    def __init__(self, name: str, detect: Callable[[str, Caps], bool], *, scope: tuple[str, str], open: str, close: str,
                 key: str, value_end: str, think: tuple[str, str] = THINK, trim: bool = True) -> None:
        self.name, self._detect, self.scope, self.open, self.close = name, detect, scope, open, close
        self.key, self.value_end, self.think, self.trim = key, value_end, think, trim
        self.trigger = scope[0] or open.split("{")[0]
        self.triggers = (Trigger("word", self.trigger),)
        self._open = re.compile(_pattern(open).replace("(?P<name>[^\\s<>{}\\\"]+?)", r"(?P<name>[^\s<>\"]+)"))
        key_head, _, key_tail = key.partition("{key}")
        self._key = re.compile(r"\s*" + re.escape(key_head) + r"(?P<key>[^<>\"\n]+?)" + re.escape(key_tail))
        self.preserved = tuple(m for m in (*scope, open.split("{")[0], close) if m.strip())

    def detect(self, source: str, caps: Caps) -> bool:
        return self._detect(source, caps)

    def _types(self, function: str) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == function:
                return (tool["function"].get("parameters") or {}).get("properties") or {}
        return {}

    def _read(self, raw: str, schema: Any) -> Any:
        text = raw.strip() if self.trim else raw
        if isinstance(schema, dict) and schema.get("type") == "string":
            return text
        try:
            return json.loads(text)
        except ValueError:
            return text

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        rules, alternatives = [], []
        key_head, _, key_tail = self.key.partition("{key}")
        for tool in tools:
            function = tool["function"]
            parameters = function.get("parameters") or {}
            required = set(parameters.get("required") or [])
            parts = []
            for prop, schema in (parameters.get("properties") or {}).items():
                if isinstance(schema, dict) and schema.get("type") == "string":
                    value = "xml-text"
                else:
                    value, text = _schema_rule(schema, "arg", function["name"], prop)
                    rules.append(text)
                element = f'{_lit(key_head + prop + key_tail)} {value} {_lit(self.value_end)} "\\n"'
                parts.append(element if prop in required else f"({element})?")
            alternatives.append(" ".join([_gbnf(self.open, function["name"]), *parts, _lit(self.close)]))
        block = f"{_lit(self.scope[0] + chr(10))} call {_lit(chr(10) + self.scope[1])}" if self.scope[0] else "call"
        root = "root ::= block (\"\\n\" block)*" if parallel else "root ::= block"
        text_rule = 'xml-text ::= ([^<] | "<" [^/])*'
        return _merged(f"{root}\nblock ::= {block}\ncall ::= " + " | ".join(alternatives) + "\n" + text_rule, *rules)

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        content, rest = _split(text, self.trigger, partial)
        if rest is None:
            return content, []
        if not self.scope[0]:
            rest = self.trigger + rest
        calls: list[Call] = []
        while (match := self._open.search(rest)) is not None:
            name, rest = match.group("name"), rest[match.end():]
            types, args = self._types(name), {}
            while (key := self._key.match(rest)) is not None:
                value, found, after = rest[key.end():].partition(self.value_end)
                if not found:  # the value is still being written: strings show so far, the rest waits
                    if partial and (types.get(key.group("key")) or {}).get("type") == "string":
                        args[key.group("key")] = held_back(value, self.value_end).strip()
                    rest = ""
                    break
                args[key.group("key")] = self._read(value, types.get(key.group("key")))
                rest = after
            calls.append(_make_call(name, args))
            rest = rest.lstrip()
            if rest.startswith(self.close):
                rest = rest[len(self.close):]
        tail = rest.replace(self.scope[1], "", 1).strip() if self.scope[1] else rest.strip()
        if partial or not calls:
            tail = ""
        return content.rstrip() + ("\n" + tail if tail and content.strip() else tail), calls


class Llama3(ToolFormat):
    """Llama 3.1-3.3: a reply that is ``{"name", "parameters"}``, or ``<|python_tag|>name.call(k=v, ...)`` for built-in tools."""

    name, trigger = "llama3", "<|python_tag|>"
    stops = ("<|eom_id|>",)
    preserved = ("<|python_tag|>",)
    BUILTIN = ("brave_search", "wolfram_alpha", "code_interpreter")
    # A reply that opens with {"name" is a call (llama.cpp's pattern); so is the built-in tools' python tag.
    triggers = (Trigger("word", "<|python_tag|>"), Trigger("pattern_full", r'\s*(\{\s*"name")[\s\S]*'))
    _builtin = re.compile(r"\s*(\w+)\s*\.\s*call\(")
    _arg = re.compile(r"\s*(\w+)\s*=\s*")

    def detect(self, source: str, caps: Caps) -> bool:
        return "<|start_header_id|>" in source and ("<|python_tag|>" in source or "ipython" in source)

    def _builtin_grammar(self, tools: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        alternatives, rules = [], []
        for tool in tools:
            function = tool["function"]
            if function["name"] not in self.BUILTIN:
                continue
            args = []
            for prop, schema in ((function.get("parameters") or {}).get("properties") or {}).items():
                rule, text = _schema_rule(schema, "builtin", function["name"], prop)
                rules.append(text)
                args.append(f"{_lit(prop + '=')} {rule}")
            joined = ' ", " '.join(args)
            alternatives.append(f'"<|python_tag|>" {_lit(function["name"] + ".call(")} {joined} ")"')
        return alternatives, rules

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        return self._grammar(tools, "root ::= tool-call")

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        return self._grammar(tools, 'root ::= ("<|python_tag|>" [ \\n]*)? tool-call')

    def _grammar(self, tools: list[dict[str, Any]], root: str) -> str:
        plain = [t for t in tools if t["function"]["name"] not in self.BUILTIN]
        builtin, rules = self._builtin_grammar(tools)
        if not plain:
            return _merged("root ::= " + " | ".join(builtin), *rules)
        grammar = self._embed(_call_schema(plain, "parameters"), root)
        if builtin:
            grammar = grammar.replace(root.split("::= ")[1], "(" + root.split("::= ")[1] + ") | " + " | ".join(builtin), 1)
        return _merged(grammar, *rules)

    def _parse_builtin(self, body: str, partial: bool) -> Call | None:
        match = self._builtin.match(body)
        if match is None:
            return None
        rest, args = body[match.end():], {}
        while (arg := self._arg.match(rest)) is not None:
            value, end = _value(rest[arg.end():], partial)
            if value is MISSING:
                break
            args[arg.group(1)] = value
            rest = rest[arg.end() + end:].lstrip()
            if not rest.startswith(","):
                break
            rest = rest[1:]
        return _make_call(match.group(1), args)

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        body = text.lstrip()
        tagged = body.startswith(self.trigger)
        if tagged:
            body = body[len(self.trigger):].lstrip()
            builtin = self._parse_builtin(body, partial)
            if builtin is not None:
                return "", [builtin]
        if not body.startswith("{"):
            if tagged:
                return "", []
            return (held_back(text, self.trigger) if partial else text), []
        value, end = _value(body, partial)
        call = _call(value, "parameters")
        if call is None:  # JSON, but not a call: it is the answer
            return ("" if partial and end == len(body) else text), []
        return body[end:].strip(), [call]


class FunctionaryV32(ToolFormat):
    """Functionary v3.2: ``>>>recipient\\n`` segments (the first without ``>>>``); ``all`` is the answer, others are calls."""

    name, trigger = "functionary-v3.2", ">>>"
    always = True
    preserved = (">>>",)
    triggers = (Trigger("pattern_full", r"((?:[\s\S]*?>>>)?\w+\n\{)[\s\S]*"),)
    _segment = re.compile(r"(?:^|>>>)(\w+)\n")

    def detect(self, source: str, caps: Caps) -> bool:
        return ">>>all" in source

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        alternatives, rules = _call_alternatives(tools, lambda name, rule: f"{_lit(name + chr(10))} {rule}")
        more = ' (">>>" call)*' if parallel else ""
        return _merged(f"root ::= call{more}\ncall ::= " + " | ".join(alternatives), *rules)

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        grammar = self.grammar(tools, "required", parallel)
        return grammar.replace("root ::= call", 'root ::= ([^>] | ">" [^>] | ">>" [^>])* ">>>"? call', 1)

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        content, calls = "", []
        pieces = self._segment.split(text)
        if partial and len(pieces) == 1 and re.fullmatch(r"\w*", text):
            return "", []  # may still become a recipient line
        if pieces[0]:  # text before any recipient: plain content
            content += pieces[0]
        for recipient, body in zip(pieces[1::2], pieces[2::2], strict=True):
            if recipient == "all":
                content += body
                continue
            value, end = _value(body, partial)
            calls.append(_make_call(recipient, value))
        if partial:
            content = held_back(held_back(content, ">>>"), "all\n")
        return content.strip() if calls else content, calls


class GptOss(ToolFormat):
    """GPT-OSS harmony: ``<|channel|>analysis`` is the reasoning, ``final`` the answer, ``to=functions.X`` a call."""

    name, trigger = "gpt-oss", " to=functions."
    always = True
    think = ("<|channel|>analysis<|message|>", "<|end|>")
    stops = ("<|call|>",)
    preserved = ("<|channel|>", "<|constrain|>", "<|message|>", "<|start|>", "<|end|>")
    triggers = (Trigger("word", " to=functions."),)
    _header = re.compile(r"(?:<\|start\|>assistant)?(?P<header>[^<]*(?:<\|channel\|>[^<]*)?(?:<\|constrain\|>[^<]*)?)<\|message\|>")
    _recipient = re.compile(r"to=functions\.([^<\s]+)")

    def detect(self, source: str, caps: Caps) -> bool:
        return "<|channel|>" in source

    def _calls_grammar(self, tools: list[dict[str, Any]]) -> tuple[str, list[str]]:
        alternatives, rules = _call_alternatives(tools, lambda name, rule: f"{_lit(name)} header-tail {rule}")
        return " | ".join(alternatives), rules

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        calls, rules = self._calls_grammar(tools)
        return _merged('root ::= "<|channel|>commentary to=functions." call\ncall ::= ' + calls
                       + '\nheader-tail ::= " <|constrain|>json"? "<|message|>"', *rules)

    def lazy_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        calls, rules = self._calls_grammar(tools)
        return _merged('root ::= " to=functions." call\ncall ::= ' + calls
                       + '\nheader-tail ::= ("<|channel|>commentary")? " <|constrain|>json"? "<|message|>"', *rules)

    def split(self, text: str, partial: bool, reasoning: bool) -> tuple[str, str, list[Call]]:
        """(reasoning, content, calls) of a harmony reply."""
        thought, content, calls = "", "", []
        rest = text
        while rest:
            match = self._header.match(rest)
            if match is None:
                if partial or "<|message|>" not in rest:
                    break  # a header still being written (or stray text after the last message)
                rest = rest[rest.index("<|message|>"):]
                continue
            header, body = match.group("header"), rest[match.end():]
            end = min((i for i in (body.find("<|end|>"), body.find("<|call|>")) if i >= 0), default=-1)
            message, rest = (body, "") if end < 0 else (body[:end], body[end:].split(">", 1)[1])
            if end < 0 and partial:
                message = held_back(held_back(message, "<|end|>"), "<|call|>")
            recipient = self._recipient.search(header)
            if recipient:
                value, _ = _value(message, partial)
                calls.append(_make_call(recipient.group(1), value))
            elif "analysis" in header:
                if reasoning:
                    thought += message
                else:
                    content += rest and f"<|channel|>analysis<|message|>{message}<|end|>" or f"<|channel|>analysis<|message|>{message}"
            else:
                content += message
        return thought.strip(), content, calls

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        _, content, calls = self.split(text, partial, reasoning=False)
        return content, calls


_Q = '<|"|>'  # Gemma 4's string quote
_G4_SCALAR = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null")
_G4_KEY = re.compile(r"\s*([^:}]+):\s*")
_G4_RULES = "\n".join([
    'g4-value ::= g4-string | g4-dict | g4-array | g4-number | "true" | "false" | "null"',
    'g4-dict ::= "{" (g4-key g4-value ("," g4-key g4-value)*)? "}"',
    'g4-key ::= [^:{}<>,"]+ ":"',
    'g4-array ::= "[" (g4-value ("," g4-value)*)? "]"',
    'g4-number ::= "-"? [0-9]+ ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
    f'g4-string ::= {_lit(_Q)} ([^<] | "<" [^|])* {_lit(_Q)}',
])


def _g4_read(text: str, at: int, partial: bool) -> tuple[Any, int, bool]:
    """(value, end, finished) of the Gemma 4 value at ``text[at:]``, as llama.cpp's gemma4_to_json reads it: strings
    between ``<|"|>`` quotes, bare keys; an unfinished dict or array has its members so far, an unfinished
    scalar is MISSING."""
    if text.startswith(_Q, at):
        end = text.find(_Q, at + len(_Q))
        if end < 0:
            return (held_back(text[at + len(_Q):], _Q) if partial else MISSING), len(text), False
        return text[at + len(_Q):end], end + len(_Q), True
    if text.startswith(("{", "["), at):
        is_dict, closer = text[at] == "{", "}" if text[at] == "{" else "]"
        members: Any = {} if is_dict else []
        i = at + 1
        while True:
            while i < len(text) and text[i] in " \t\n":
                i += 1
            if text.startswith(closer, i):
                return members, i + 1, True
            key = None
            if is_dict:
                match = _G4_KEY.match(text, i)
                if match is None:
                    return members, len(text), False
                key, i = match.group(1), match.end()
            value, i, done = _g4_read(text, i, partial)
            if value is not MISSING:
                if is_dict:
                    members[key] = value
                else:
                    members.append(value)
            if not done:
                return members, len(text), False
            while i < len(text) and text[i] in " \t\n":
                i += 1
            if text.startswith(",", i):
                i += 1
            elif not text.startswith(closer, i):
                return members, len(text), False
    match = _G4_SCALAR.match(text, at)
    if match is None or (partial and match.end() == len(text)):  # a number may still grow
        return MISSING, len(text), False
    return json.loads(match.group()), match.end(), True


def _g4_text(value: Any) -> str:
    """A JSON value written as the Gemma 4 template writes arguments (its format_argument, keys bare)."""
    if isinstance(value, str):
        return _Q + value + _Q
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_g4_text(v)}" for k, v in sorted(value.items())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_g4_text, value)) + "]"
    return json.dumps(value)


class Gemma4(ToolFormat):
    """Gemma 4: ``<|tool_call>call:name{key:value,...}<tool_call|>``, strings quoted with ``<|"|>``, keys bare;
    thinking in ``<|channel>thought ... <channel|>``."""

    name, trigger = "gemma4", "<|tool_call>"
    think = ("<|channel>thought", "<channel|>")
    preserved = ("<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|turn>")
    triggers = (Trigger("word", "<|tool_call>"),)
    _open = re.compile(r"call:([^{\s<]+)\{")

    def detect(self, source: str, caps: Caps) -> bool:
        return "'<|tool_call>call:'" in source

    def reopen(self, prompt: str) -> str:
        # a model turn that ends with an answer after tool results: the template does not open the next turn
        return "<|turn>model\n" if prompt.endswith("<turn|>\n") else ""

    def _rule(self, schema: Any, rules: dict[str, str], *name: str) -> str:
        """The GBNF rule of a value of ``schema`` in Gemma 4's notation (declared types; anything else: any value)."""
        if not isinstance(schema, dict):
            return "g4-value"
        rule = _rule_name("g4", *name)
        kind = schema.get("type")
        if "enum" in schema or "const" in schema:
            rules[rule] = " | ".join(_lit(_g4_text(v)) for v in schema.get("enum", [schema.get("const")]))
        elif kind == "string":
            return "g4-string"
        elif kind in ("integer", "number", "boolean", "null"):  # written as in JSON
            inner, text = _schema_rule(schema, "json", *name)
            for line in text.splitlines():
                head, sep, body = line.partition(" ::= ")
                if sep:
                    rules.setdefault(head, body)
            return inner
        elif kind == "array":
            item = self._rule(schema.get("items"), rules, *name, "item")
            rules[rule] = f'"[" ({item} ("," {item})*)? "]"'
        elif kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
            required = set(schema.get("required") or [])
            keys = sorted(schema["properties"])  # in the template's order (dictsort)
            pairs = [f"{_lit(key + ':')} {self._rule(schema['properties'][key], rules, *name, key)}" for key in keys]
            # rest-i: the members from i on after one was written; first-i: from i on, none written yet
            rules[f"{rule}-rest-{len(keys)}"] = rules[f"{rule}-first-{len(keys)}"] = '""'
            for i in range(len(keys) - 1, -1, -1):
                rest, first = f"{rule}-rest-{i + 1}", f"{rule}-first-{i + 1}"
                if keys[i] in required:
                    rules[f"{rule}-rest-{i}"] = f'"," {pairs[i]} {rest}'
                    rules[f"{rule}-first-{i}"] = f"{pairs[i]} {rest}"
                else:
                    rules[f"{rule}-rest-{i}"] = f'("," {pairs[i]})? {rest}'
                    rules[f"{rule}-first-{i}"] = f"{pairs[i]} {rest} | {first}"
            rules[rule] = f'"{{" {rule}-first-0 "}}"'
        elif kind == "object":
            return "g4-dict"
        else:
            return "g4-value"
        return rule

    def grammar(self, tools: list[dict[str, Any]], choice: str, parallel: bool) -> str:
        rules: dict[str, str] = {}
        alternatives = []
        for tool in tools:
            function = tool["function"]
            args = self._rule(function.get("parameters") or {"type": "object"}, rules, "args", function["name"])
            alternatives.append(f"{_lit(function['name'])} {args}")
        call = '"<|tool_call>call:" (' + " | ".join(alternatives) + ') "<tool_call|>"'
        body = "\n".join(f"{head} ::= {text}" for head, text in rules.items())
        return f"root ::= call{'+' if parallel else ''}\ncall ::= {call}\n{body}\n{_G4_RULES}\n"

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
        content, rest = _split(text, self.trigger, partial)
        calls: list[Call] = []
        tail = ""
        while rest is not None:
            match = self._open.match(rest)
            if match is None:  # the call's name is still being written
                break
            value, end, done = _g4_read(rest, match.end() - 1, partial)
            calls.append(_make_call(match.group(1), value if isinstance(value, dict) else {}))
            after = rest[end:] if done else ""
            if after.startswith("<tool_call|>"):
                after = after[len("<tool_call|>"):]
            tail_part, found, rest_after = after.partition(self.trigger)
            tail += tail_part
            rest = rest_after if found else None
        tail = tail.strip()
        if partial:
            tail = held_back(held_back(tail, "<tool_call|>"), self.trigger)
        if calls and tail:
            content = content.rstrip() + ("\n" if content.strip() else "") + tail
        return (content.rstrip() if calls else content), calls


class Generic(ToolFormat):
    name = "generic"

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

    def parse(self, text: str, partial: bool) -> tuple[str, list[Call]]:
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
_DS = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")
_MISTRAL_ID = {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}

# In llama.cpp's order of detection (common_chat_templates_apply_jinja): the first that matches wins.
FORMATS: tuple[ToolFormat, ...] = (
    Gemma4(),  # a marker no other family's template has; llama.cpp checks it among its specialised templates
    NamedJson("deepseek-v3.1", _markers("message['prefix'] is defined and message['prefix'] and thinking"),
              "<｜tool▁call▁begin｜>{name}<｜tool▁sep｜>", "<｜tool▁call▁end｜>", block=_DS),
    NamedJson("deepseek-r1", _markers(_DS[0]), "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
              "\n```<｜tool▁call▁end｜>", block=_DS, separator="\n"),
    JsonInTags("command-r7b", _markers("<|END_THINKING|><|START_ACTION|>"), "<|START_ACTION|>", "<|END_ACTION|>", array=True,
               name_key="tool_name", args_key="parameters", id_key="tool_call_id", id_schema={"type": "string", "pattern": "^[0-9]{1,3}$"},
               think=("<|START_THINKING|>", "<|END_THINKING|>"), order=("tool_call_id", "tool_name")),
    JsonInTags("granite", _markers("elif thinking", "<|tool_call|>"), "<|tool_call|>", array=True),
    XmlCalls("glm-4.5", _markers("[gMASK]<sop>", "<arg_key>", "<arg_value>"), scope=("", ""), open="<tool_call>{name}\n",
             close="</tool_call>", key="<arg_key>{key}</arg_key>\n<arg_value>", value_end="</arg_value>"),
    XmlCalls("qwen3-coder", _markers("<tool_call>", "<function=", "<parameter="), scope=("<tool_call>", "</tool_call>"),
             open="<function={name}>\n", close="</function>", key="<parameter={key}>\n", value_end="\n</parameter>"),
    JsonInTags("hermes", _markers("<tool_call>"), "<tool_call>", "</tool_call>"),
    GptOss(),
    XmlCalls("seed-oss", _markers("<seed:think>"), scope=("<seed:tool_call>", "</seed:tool_call>"), open="<function={name}>\n",
             close="</function>", key="<parameter={key}>", value_end="</parameter>", think=("<seed:think>", "</seed:think>")),
    JsonInTags("nemotron-v2", _markers("<SPECIAL_10>"), "<TOOLCALL>", "</TOOLCALL>", array=True),
    JsonInTags("apertus", _markers("<|system_start|>", "<|tools_prefix|>"), "<|tools_prefix|>", "<|tools_suffix|>", array=True,
               think=("<|inner_prefix|>", "<|inner_suffix|>")),
    JsonInTags("lfm2", _markers("List of tools: <|tool_list_start|>[", "]<|tool_list_end|>"), "<|tool_call_start|>",
               "<|tool_call_end|>", array=True),
    XmlCalls("minimax-m2", _markers("]~!b[", "]~b]"), scope=("<minimax:tool_call>", "</minimax:tool_call>"),
             open='<invoke name="{name}">\n', close="</invoke>", key='<parameter name="{key}">', value_end="</parameter>"),
    NamedJson("kimi-k2", _markers("<|tool_calls_section_begin|>", "<|tool_call_begin|>"),
              "<|tool_call_begin|>functions.{name}:{index}<|tool_call_argument_begin|>", "<|tool_call_end|>",
              block=("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"), id_from_marker=True),
    FunctionaryV32(),
    JsonInTags("firefunction-v2", _markers(" functools["), " functools[", array=True, keep=1),
    NamedJson("functionary-v3.1", _markers("<|start_header_id|>", "<function="), "<function={name}>", "</function>"),
    Llama3(),
    JsonInTags("magistral", _markers("[THINK]", "[/THINK]"), "[TOOL_CALLS]", array=True, id_schema=_MISTRAL_ID,
               think=("[THINK]", "[/THINK]")),
    JsonInTags("mistral", _markers("[TOOL_CALLS]"), "[TOOL_CALLS]", array=True, id_schema=_MISTRAL_ID),
    Generic(),
)


def _reasoning_as_thinking(drop_call_content: bool) -> Callable[[list[dict[str, Any]], str], list[dict[str, Any]]]:
    """GPT-OSS and LFM2 templates read a turn's reasoning as ``thinking`` (GPT-OSS: a call turn with reasoning
    then has no content)."""
    def rewrite(messages: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
        out = []
        for message in messages:
            if isinstance(message.get("reasoning_content"), str):
                message = {**message, "thinking": message["reasoning_content"]}
                if drop_call_content and message.get("tool_calls"):
                    message.pop("content", None)
            out.append(message)
        return out
    return rewrite


def _has_content(message: dict[str, Any]) -> bool:
    return bool(message.get("content"))


def _gemma4_tool_responses(messages: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Gemma 4's first templates read tool results from the model turn's ``tool_responses``, not from ``tool``
    messages: llama.cpp (workaround::convert_tool_responses_gemma4) folds each ``assistant(calls) -> tool+ ->
    assistant(answer)`` run into one assistant message. The official template (it reads ``tool`` messages, under
    its "OpenAI Chat Completions" comment) gets them as they are."""
    if "{#- OpenAI Chat Completions:" in source:
        return messages
    out, i = [], 0
    while i < len(messages):
        message = messages[i]
        if message["role"] != "assistant" or not message.get("tool_calls"):
            out.append(message)
            i += 1
            continue
        calls = list(message["tool_calls"])
        folded: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        responses: list[dict[str, Any]] = []
        i += 1
        while i < len(messages) and messages[i]["role"] == "tool":
            result = messages[i].get("content")
            if isinstance(result, str):  # JSON text is read as its value, anything else stays text
                try:
                    result = json.loads(result)
                except ValueError:
                    pass
            name = calls[len(responses)]["function"]["name"] if len(responses) < len(calls) else ""
            responses.append({"name": name or messages[i].get("tool_call_id", ""), "response": result})
            i += 1
        if responses:
            folded["tool_responses"] = responses
        if i < len(messages) and messages[i]["role"] == "assistant" and not messages[i].get("tool_calls") \
                and _has_content(messages[i]):
            folded["content"] = messages[i]["content"]
            i += 1
        if isinstance(message.get("reasoning_content"), str):
            folded["reasoning_content"] = message["reasoning_content"]
        out.append(folded)
    return out


# The prompt side of llama.rn 0.12.9's per-family handlers (common_chat_params_init_gpt_oss / _lfm2, Gemma 4's
# workaround): the messages as they rewrite them. Every other family's template gets them as the shared path shapes them.
_REWRITES = {"gpt-oss": _reasoning_as_thinking(True), "lfm2": _reasoning_as_thinking(False), "gemma4": _gemma4_tool_responses}
for _format in FORMATS:
    _format.rewrite = _REWRITES.get(_format.name)


#: llama.rn 0.12.9's common_chat_format numbers (llama.cpp's PEG parsers): every Jinja chat is "peg-native"
#: except Gemma 4 and MiniMax-M3, which have their own; raw prompts and the legacy path are "content only".
CHAT_FORMAT_CONTENT_ONLY, CHAT_FORMAT_PEG_NATIVE, CHAT_FORMAT_PEG_GEMMA4, CHAT_FORMAT_PEG_MINIMAX_M3 = 0, 2, 3, 4


def chat_format_number(source: str) -> int:
    """What llama.rn reports as ``chat_format`` for a Jinja chat with this template."""
    if "'<|tool_call>call:'" in source:
        return CHAT_FORMAT_PEG_GEMMA4
    if "]<]minimax[>[" in source and "<invoke name=" in source:
        return CHAT_FORMAT_PEG_MINIMAX_M3
    return CHAT_FORMAT_PEG_NATIVE


def reasoning_markers(source: str) -> tuple[str, str]:
    """The thinking markers of the template's model family (used with or without tools)."""
    for candidate in FORMATS:
        if candidate.think != THINK and candidate.detect(source, Caps()):
            return candidate.think
    return THINK


def always_format(source: str) -> ToolFormat | None:
    """The format whose structure every reply of this template has, tools or not (GPT-OSS, Functionary v3.2)."""
    for candidate in FORMATS:
        if candidate.always and candidate.detect(source, Caps()):
            return candidate
    return None


def family_format(source: str, caps: Caps) -> ToolFormat | None:
    """The format of the template's model family, if llama.cpp has a handler for it (no error otherwise)."""
    return next((candidate for candidate in FORMATS if candidate.detect(source, caps)), None)


def pick_format(source: str, caps: Caps) -> ToolFormat:
    """The tool format of a template; templates with their own unknown tool syntax are refused."""
    for candidate in FORMATS:
        if candidate.detect(source, caps):
            return candidate
    raise UnsupportedFeatureError(
        "tools: this chat template describes tools in a format llamacompat does not parse yet "
        f"(supported: {', '.join(f.name for f in FORMATS)}); pass chat_template='hermes' or a template without tools")
