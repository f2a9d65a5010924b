"""Render Hugging Face / llama.cpp style Jinja chat templates with jinja2.

The environment matches what those templates expect (``raise_exception``,
``tojson`` as Hugging Face writes JSON, ``strftime_now``, trimmed blocks, loop
controls, the ``{% generation %}`` tag) and is sandboxed: a template comes from
a model file, so it must not reach Python internals. Every failure becomes a
``TemplateError`` that names the template line.
"""

from __future__ import annotations

import datetime
import functools
import json
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError

__all__ = ["Caps", "compile_template", "render", "template_caps"]


class _Raised(Exception):
    """``raise_exception(...)`` called by a template."""


def _raise_exception(message: str) -> None:
    raise _Raised(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Hugging Face's tojson (llama.cpp's too) keeps non-ASCII and does not
    # HTML-escape, unlike jinja2's built-in filter.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """Hugging Face's ``{% generation %}...{% endgeneration %}`` marks training spans: render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        parser.stream.skip(1)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template text; a syntax error names its line."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"chat template line {err.lineno}: syntax error: {err.message}") from None


def _template_line(err: BaseException) -> int | None:
    """The template line being rendered when ``err`` was raised (jinja2 maps frames to it)."""
    line = None
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(source: str, variables: dict[str, Any], now: datetime.datetime | None = None) -> str:
    """Render ``source`` with ``variables``; any failure is a ``TemplateError`` naming the line."""
    template = compile_template(source)
    moment = now or datetime.datetime.now()
    try:
        return template.render(strftime_now=moment.strftime, **variables)
    except Exception as err:  # a template can fail in any way: index errors, type errors, ...
        line = _template_line(err)
        where = f"chat template line {line}" if line else "chat template"
        if isinstance(err, _Raised):
            raise TemplateError(f"{where}: the template refused the messages: {err}") from None
        problem = err.message if isinstance(err, jinja2.TemplateError) and err.message else f"{type(err).__name__}: {err}"
        raise TemplateError(f"{where}: {problem}") from None


@dataclass(frozen=True)
class Caps:
    """What a template does with its inputs, found by rendering probe conversations (as llama.cpp does)."""

    system_role: bool = True
    string_content: bool = True
    typed_content: bool = False
    tools: bool = False
    tool_calls: bool = False
    tool_responses: bool = True
    object_arguments: bool = False


def _try(source: str, messages: list[dict[str, Any]], **extra: Any) -> str | None:
    try:
        return render(source, {"messages": messages, "bos_token": "", "eos_token": "",
                               "add_generation_prompt": True, **extra})
    except TemplateError:
        return None


_USER = {"role": "user", "content": "User message"}


@functools.lru_cache(maxsize=32)
def template_caps(source: str) -> Caps:
    """Probe ``source`` with small conversations and see what reaches the output."""
    marker = "MARKER_7f3a"
    as_string = _try(source, [{"role": "user", "content": marker}])
    as_parts = _try(source, [{"role": "user", "content": [{"type": "text", "text": marker}]}])
    string_content = as_string is not None and marker in as_string
    typed_content = as_parts is not None and marker in as_parts and not string_content
    system = _try(source, [{"role": "system", "content": marker}, _USER])
    tool = {"type": "function", "function": {"name": "tool_" + marker, "description": "Tool description",
                                             "parameters": {"type": "object", "properties": {"arg": {"type": "string"}},
                                                            "required": ["arg"]}}}
    with_tools = _try(source, [_USER], tools=[tool])

    def call(arguments: Any) -> list[dict[str, Any]]:
        return [_USER, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call00001", "type": "function", "function": {"name": "called_" + marker, "arguments": arguments}}]},
            {"role": "tool", "content": "response_" + marker, "tool_call_id": "call00001"},
            {"role": "assistant", "content": "The tool response was 'tool response'"}, _USER]

    object_call = _try(source, call({"arg": "value_" + marker}), tools=[tool])
    string_call = _try(source, call(json.dumps({"arg": "value_" + marker})), tools=[tool])
    calls = [out for out in (object_call, string_call) if out is not None and "called_" + marker in out]
    answered = _try(source, [_USER, {"role": "tool", "content": "response_" + marker, "tool_call_id": "x"},
                             {"role": "assistant", "content": "Noted."}, _USER])
    responses = [out for out in (object_call, string_call, answered) if out is not None]
    return Caps(
        system_role=system is not None and marker in system,
        string_content=string_content or not typed_content,
        typed_content=typed_content,
        tools=with_tools is not None and "tool_" + marker in with_tools,
        tool_calls=bool(calls),
        tool_responses=any("response_" + marker in out for out in responses),
        # A template that writes the arguments out as JSON itself wants an object, not a string.
        object_arguments=object_call is not None and f'"value_{marker}"' in object_call
        and "'value_" + marker not in object_call,
    )
