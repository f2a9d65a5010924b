"""Render Hugging Face / llama.cpp style Jinja chat templates with jinja2.

The environment matches what those templates expect (``raise_exception``,
``tojson`` as Hugging Face writes JSON, ``strftime_now``, trimmed blocks, loop
controls, the ``{% generation %}`` tag) and is sandboxed: a template comes from
a model file, so it must not reach Python internals. Every failure becomes a
``TemplateError`` that names the template line.

The sandbox bounds data, not work, so a render also has a budget: at most
``MAX_RENDER_CPU_S`` of CPU time (a trace function on the rendering thread looks
at the clock as the template's code runs), no ``*``, ``**``, ``+`` or ``~``
result above ``MAX_RESULT`` characters or items (or a huge integer), and inside
``render_stop(stop)`` a set ``stop`` ends it with ``RenderStopped``.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import re
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Iterator

import jinja2
import jinja2.ext
import jinja2.runtime
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TemplateError

__all__ = ["Caps", "compile_template", "render", "render_stop", "RenderStopped", "template_caps",
           "MAX_RENDER_CPU_S", "MAX_RESULT"]

MAX_RENDER_CPU_S = 1.0  # CPU seconds one render may use (real templates take milliseconds)
MAX_RESULT = 10_000_000  # characters (or items) one operator may build
_MAX_INT_BITS = 100_000  # about 30,000 digits
_JOINS = frozenset({jinja2.runtime.str_join.__code__, jinja2.runtime.markup_join.__code__})  # what `~` runs


class RenderStopped(Exception):
    """The ``stop`` flag of ``render_stop`` was set while a template rendered."""


class _OverBudget(TemplateError):
    """A render ran past its budget: every later render of the template would too (cached as such)."""


class _Halt(BaseException):
    """Ends a render from inside it. A BaseException, so that no ``except Exception`` in jinja2 or in a
    filter can swallow it (Python also stops tracing once a trace function raises)."""

    def __init__(self, message: str, stopped: bool = False) -> None:
        super().__init__(message)
        self.stopped = stopped


_stop_flag: ContextVar[threading.Event | None] = ContextVar("llamacompat_template_stop", default=None)


@contextlib.contextmanager
def render_stop(stop: threading.Event) -> Iterator[None]:
    """Renders inside the block end with ``RenderStopped`` once ``stop`` is set (a completion's stop flag)."""
    token = _stop_flag.set(stop)
    try:
        yield
    finally:
        _stop_flag.reset(token)


class _Budget:
    """The trace function of one render: counts the template's steps and checks the clock and ``stop``."""

    __slots__ = ("deadline", "stop", "steps")

    def __init__(self, stop: threading.Event | None) -> None:
        self.deadline = time.thread_time() + MAX_RENDER_CPU_S
        self.stop, self.steps = stop, 0

    def call(self, frame: Any, event: str, arg: Any) -> Any:
        """Global trace function: every Python call of the render is a step; the template's own code is
        traced line by line (a loop with an empty body calls nothing), ``~`` at its return."""
        self.steps += 1
        if not self.steps & 31:
            self.check()
        code = frame.f_code
        if code.co_filename == "<template>":
            return self.line
        return self.joined if code in _JOINS else None

    def line(self, frame: Any, event: str, arg: Any) -> Any:
        self.steps += 1
        if not self.steps & 31:
            self.check()
        return self.line

    def joined(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "return" and isinstance(arg, str) and len(arg) > MAX_RESULT:
            raise _Halt(f"a '~' built {len(arg)} characters, more than the limit of {MAX_RESULT}")
        return self.joined

    def check(self) -> None:
        if self.stop is not None and self.stop.is_set():
            raise _Halt("rendering was stopped", stopped=True)
        if time.thread_time() > self.deadline:
            raise _Halt(f"rendering used more than {MAX_RENDER_CPU_S:g} s of CPU time (the limit); "
                        "the template loops too much")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with the operators that can build a huge value in one step bounded first."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and abs(left) > 1 and right * left.bit_length() > _MAX_INT_BITS:
            raise _Halt(f"{left} ** {right} is too large a number (the limit is {_MAX_INT_BITS} bits)")
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _Halt(f"a product above {_MAX_INT_BITS} bits is too large a number")
            count = right if isinstance(right, int) else left if isinstance(left, int) else 0
            if max(_size(left), _size(right)) * count > MAX_RESULT:
                raise _Halt(f"a '*' would build more than the limit of {MAX_RESULT} characters or items")
        if operator == "+" and _size(left) + _size(right) > MAX_RESULT:
            raise _Halt(f"a '+' would build more than the limit of {MAX_RESULT} characters or items")
        return super().call_binop(context, operator, left, right)


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
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag])
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
    """Render ``source`` with ``variables`` within the budget; any failure is a ``TemplateError`` naming the line
    (``RenderStopped`` when the ``render_stop`` flag was set)."""
    template = compile_template(source)
    moment = now or datetime.datetime.now()
    previous = sys.gettrace()  # a debugger's or coverage's, put back after the render
    sys.settrace(_Budget(_stop_flag.get()).call)
    try:
        return template.render(strftime_now=moment.strftime, **variables)
    except _Halt as halt:
        if halt.stopped:
            raise RenderStopped(str(halt)) from None
        line = _template_line(halt)  # a Python line: jinja2 maps only the exceptions it handles itself
        line = template.get_corresponding_lineno(line) if line else None
        raise _OverBudget(f"chat template{f' line {line}' if line else ''}: {halt}") from None
    except Exception as err:  # a template can fail in any way: index errors, type errors, ...
        line = _template_line(err)
        where = f"chat template line {line}" if line else "chat template"
        if isinstance(err, _Raised):
            raise TemplateError(f"{where}: the template refused the messages: {err}") from None
        problem = err.message if isinstance(err, jinja2.TemplateError) and err.message else f"{type(err).__name__}: {err}"
        raise TemplateError(f"{where}: {problem}") from None
    finally:
        sys.settrace(previous)


@dataclass(frozen=True)
class Caps:
    """What a template does with its inputs, found by rendering probe conversations (as llama.cpp does)."""

    system_role: bool = True
    string_content: bool = True
    typed_content: bool = False
    tools: bool = False
    tool_calls: bool = False
    parallel_tool_calls: bool = False  # two calls of one assistant turn both reach the output
    tool_responses: bool = True
    object_arguments: bool = False


def _try(source: str, messages: list[dict[str, Any]], **extra: Any) -> str | None:
    try:
        return render(source, {"messages": messages, "bos_token": "", "eos_token": "",
                               "add_generation_prompt": True, **extra})
    except _OverBudget:
        raise  # not "the template refuses this input": it would run past its budget again and again
    except TemplateError:
        return None


_USER = {"role": "user", "content": "User message"}


def template_caps(source: str) -> Caps:
    """Probe ``source`` with small conversations and see what reaches the output.

    A template that runs past its budget raises ``TemplateError``, at once from the second call on.
    """
    caps = _caps_or_error(source)
    if isinstance(caps, _OverBudget):
        raise caps
    return caps


@functools.lru_cache(maxsize=32)
def _caps_or_error(source: str) -> "Caps | _OverBudget":
    try:
        return _probe(source)
    except _OverBudget as err:
        return err


def _probe(source: str) -> Caps:
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

    def call(arguments: Any, names: tuple[str, ...] = ("called_" + marker,)) -> list[dict[str, Any]]:
        made = [{"id": f"call0000{i + 1}", "type": "function", "function": {"name": name, "arguments": arguments}}
                for i, name in enumerate(names)]
        return [_USER, {"role": "assistant", "content": "", "tool_calls": made},
                *({"role": "tool", "content": "response_" + marker, "tool_call_id": c["id"]} for c in made),
                {"role": "assistant", "content": "The tool response was 'tool response'"}, _USER]

    object_call = _try(source, call({"arg": "value_" + marker}), tools=[tool])
    string_call = _try(source, call(json.dumps({"arg": "value_" + marker})), tools=[tool])
    # A call shows by its name or, in templates that write only the call's id (Kimi K2 Thinking), by its id.
    calls = [out for out in (object_call, string_call) if out is not None and ("called_" + marker in out or "call00001" in out)]
    two = ("called_" + marker, "second_" + marker)
    arguments: Any = {"arg": "value_" + marker} if object_call in calls else json.dumps({"arg": "value_" + marker})
    parallel = _try(source, call(arguments, two), tools=[tool]) if calls else None
    answered = _try(source, [_USER, {"role": "tool", "content": "response_" + marker, "tool_call_id": "x"},
                             {"role": "assistant", "content": "Noted."}, _USER])
    responses = [out for out in (object_call, string_call, answered) if out is not None]
    return Caps(
        system_role=system is not None and marker in system,
        string_content=string_content or not typed_content,
        typed_content=typed_content,
        tools=with_tools is not None and "tool_" + marker in with_tools,
        tool_calls=bool(calls),
        parallel_tool_calls=parallel is not None and all(name in parallel for name in two),
        tool_responses=any("response_" + marker in out for out in responses),
        object_arguments=_wants_objects(object_call, string_call, "value_" + marker),
    )


def _wants_objects(object_call: str | None, string_call: str | None, value: str) -> bool:
    """Whether a template takes tool-call arguments as an object: it writes them out as JSON itself, or it
    takes the object apart (the value shows bare) where a JSON string would fail or show only quoted."""
    if object_call is None or value not in object_call or "'" + value in object_call:
        return False
    if f'"{value}"' in object_call:
        return True
    bare = re.compile(r"(?<![\'\"\\])" + re.escape(value))
    return bool(bare.search(object_call)) and (string_call is None or not bare.search(string_call))
