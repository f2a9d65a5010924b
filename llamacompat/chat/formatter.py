"""Messages in, prompt and reply parser out: llama.rn's ``getFormattedChat`` and its completion path.

The Jinja path follows llama.cpp's ``common_chat_templates_apply``: the model's
template (or a built-in one) renders the messages shaped for it, with
``bos_token``, ``eos_token``, ``enable_thinking``, ``tools``, ``datetime`` /
``date_string`` and the caller's ``chat_template_kwargs``; a leading BOS (and
trailing EOS) that the tokenizer adds anyway is cut. The legacy path
(``jinja: false``) renders the built-in that llama.cpp's detection picks.
"""

from __future__ import annotations

import datetime
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidParamsError, UnsupportedFeatureError
from ..grammars.triggers import Trigger
from ..params import REASONING_FORMATS, TOOL_CHOICES
from .builtin import BUILTIN_TEMPLATES, legacy_name, template_source
from .formats import (
    CHAT_FORMAT_CONTENT_ONLY,
    CONTENT,
    THINK,
    Generic,
    GptOss,
    ToolFormat,
    always_format,
    chat_format_number,
    family_format,
    pick_format,
    reasoning_markers,
)
from .messages import joined_text, media_refs, shape_for_template, validate_messages, validate_tools
from .reasoning import split_reasoning
from .template import render, template_caps

__all__ = ["epoch_moment", "ChatOptions", "TemplateTokens", "FormattedChat", "ReplyParser", "format_chat"]



@dataclass(frozen=True)
class TemplateTokens:
    """What the template sees of the vocabulary, and what the tokenizer adds by itself."""

    bos: str = ""
    eos: str = ""
    add_bos: bool = False
    add_eos: bool = False


@dataclass
class ChatOptions:
    """The completion / get_formatted_chat params that shape a chat prompt (llama.rn names)."""

    tools: list[dict[str, Any]] | None = None
    tool_choice: str = "auto"
    parallel_tool_calls: bool = False
    reasoning_format: str = "none"
    enable_thinking: bool = True
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    add_generation_prompt: bool = True
    jinja: bool = True
    now: datetime.datetime | None = None
    force_pure_content: bool = False  # llama.cpp's: the template renders everything, the reply is all content

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "ChatOptions":
        now = p.get("now")
        if now is not None and not isinstance(now, datetime.datetime):
            now = epoch_moment(now)
        return cls(tools=p.get("tools") or None, tool_choice=p.get("tool_choice") or "auto",
                   parallel_tool_calls=bool(p.get("parallel_tool_calls")),
                   reasoning_format=p.get("reasoning_format", "none"),
                   enable_thinking=p.get("enable_thinking", True), chat_template_kwargs=p.get("chat_template_kwargs") or {},
                   add_generation_prompt=p.get("add_generation_prompt", True), jinja=p.get("jinja", True), now=now,
                   force_pure_content=bool(p.get("force_pure_content")))


_LEADING_INT = re.compile(r"\s*[+-]?\d+")


def epoch_moment(now: float | str) -> datetime.datetime | None:
    """llama.rn's ``now``: seconds since the epoch, a number or a string (read as C++'s ``std::stoll``: the leading
    integer; a string without one means the current time, None). A number is truncated to whole seconds, as
    llama.rn's JS turns it into a string that stoll reads."""
    if isinstance(now, str):
        match = _LEADING_INT.match(now)
        if match is None:
            return None
        now = int(match.group())
    try:
        return datetime.datetime.fromtimestamp(int(now))
    except (OverflowError, OSError, ValueError):  # past what the platform's clock can show
        raise InvalidParamsError(f"completion: 'now' = {now!r} seconds since the epoch is out of range") from None


class ReplyParser:
    """Generated text → llama.rn's ``content`` / ``reasoning_content`` / ``tool_calls`` (only non-empty ones)."""

    def __init__(self, tool_format: ToolFormat, reasoning_format: str, forced_open: bool = False,
                 think: tuple[str, str] = THINK) -> None:
        self.tool_format, self.reasoning_format, self.forced_open = tool_format, reasoning_format, forced_open
        self.think = think
        self._id_prefix = "call_" + secrets.token_hex(6) + "_"  # stable across one reply's stream
        self._ids: list[str] = []

    def _id(self, index: int, call: dict[str, Any], writing: bool) -> str:
        """A call's id, fixed when it is first seen: the model's own once written out, else one of ours."""
        if index < len(self._ids):
            return self._ids[index]
        own = call.get("id") if not writing or self.tool_format.ids_in_marker else None
        self._ids.append(own or f"{self._id_prefix}{index}")
        return self._ids[index]

    def __call__(self, text: str, partial: bool) -> dict[str, Any]:
        if isinstance(self.tool_format, GptOss):  # harmony: the channels carry the reasoning
            reasoning, content, calls = self.tool_format.split(text, partial, self.reasoning_format != "none")
        else:
            reasoning, content = split_reasoning(text, self.reasoning_format, partial, self.forced_open, *self.think)
            content, calls = self.tool_format.parse(content, partial)
        out: dict[str, Any] = {}
        if content:
            out["content"] = content
        if reasoning:
            out["reasoning_content"] = reasoning
        if calls:
            out["tool_calls"] = [{**call, "id": self._id(i, call, partial and i == len(calls) - 1)} for i, call in enumerate(calls)]
        return out


@dataclass
class FormattedChat:
    prompt: str
    tool_format: ToolFormat = CONTENT
    grammar: str = ""
    grammar_lazy: bool = False
    grammar_triggers: tuple[Trigger, ...] = ()
    preserved_tokens: list[str] = field(default_factory=list)
    additional_stops: list[str] = field(default_factory=list)
    generation_prompt: str = ""
    thinking_forced_open: bool = False
    reasoning_format: str = "none"
    legacy: bool = False
    think: tuple[str, str] = THINK
    #: llama.rn's number for the parser (llama.cpp's common_chat_format)
    chat_format: int = CHAT_FORMAT_CONTENT_ONLY
    #: the messages' media (image_url / input_audio parts), one per media marker in ``prompt``, in order
    media_paths: list[str] = field(default_factory=list)

    def parser(self) -> ReplyParser | None:
        """None when the reply is plain content (the engine's fast path)."""
        if self.tool_format is CONTENT and self.reasoning_format == "none":
            return None
        return ReplyParser(self.tool_format, self.reasoning_format, self.thinking_forced_open, self.think)

    def as_result(self) -> dict[str, Any]:
        """llama.rn's getFormattedChat result."""
        if self.legacy:
            return {"type": "llama-chat", "prompt": self.prompt, "has_media": bool(self.media_paths),
                    "media_paths": list(self.media_paths)}
        result: dict[str, Any] = {
            "type": "jinja", "prompt": self.prompt, "chat_format": self.chat_format,
            "grammar": self.grammar, "grammar_lazy": self.grammar_lazy,
            "grammar_triggers": [trigger.as_dict() for trigger in self.grammar_triggers],
            "preserved_tokens": self.preserved_tokens, "additional_stops": self.additional_stops,
            "generation_prompt": self.generation_prompt, "thinking_forced_open": self.thinking_forced_open,
            "has_media": bool(self.media_paths), "media_paths": list(self.media_paths),
        }
        if self.think[0] in self.prompt or self.thinking_forced_open or self.reasoning_format != "none":
            result.update(thinking_start_tag=self.think[0], thinking_end_tag=self.think[1])
        return result


def _context(options: ChatOptions, tokens: TemplateTokens) -> dict[str, Any]:
    now = options.now or datetime.datetime.now()
    variables: dict[str, Any] = {"bos_token": tokens.bos, "eos_token": tokens.eos,
                                 "enable_thinking": options.enable_thinking,
                                 "datetime": now.strftime("%b %d %Y"), "date_string": now.strftime("%d %b %Y")}
    if options.tools:
        variables["tools"] = options.tools
    variables.update(options.chat_template_kwargs)
    return variables


def _render(source: str, messages: list[dict[str, Any]], variables: dict[str, Any], generation: bool,
            tokens: TemplateTokens, now: datetime.datetime | None) -> str:
    extra = {"add_generation_prompt": True} if generation else {}
    prompt = render(source, {"messages": messages, **variables, **extra}, now)
    if tokens.add_bos and tokens.bos and prompt.startswith(tokens.bos):
        prompt = prompt[len(tokens.bos):]
    if tokens.add_eos and tokens.eos and prompt.endswith(tokens.eos):
        prompt = prompt[: -len(tokens.eos)]
    return prompt


def format_chat(template: str, messages: Any, tokens: TemplateTokens, options: ChatOptions,
                *, has_grammar: bool = False) -> FormattedChat:
    """Render ``messages`` with ``template`` (Jinja source or a built-in name) and plan the reply."""
    chat = _format_chat(template, messages, tokens, options, has_grammar)
    chat.media_paths = media_refs(messages)  # their markers are in the prompt (validate_messages put them there)
    return chat


def _format_chat(template: str, messages: Any, tokens: TemplateTokens, options: ChatOptions,
                 has_grammar: bool) -> FormattedChat:
    checked = validate_messages(messages)
    tools = validate_tools(options.tools) if options.tools else []
    if options.tool_choice not in TOOL_CHOICES:
        raise InvalidParamsError(f"completion: 'tool_choice' must be 'auto', 'none' or 'required', got {options.tool_choice!r}")
    if options.reasoning_format not in REASONING_FORMATS:
        raise InvalidParamsError(f"Unknown reasoning format: {options.reasoning_format!r}; "
                                 f"use one of {', '.join(REASONING_FORMATS)}")
    if options.tool_choice == "required" and not tools:
        raise InvalidParamsError("completion: tool_choice 'required' needs at least one tool in 'tools'")
    if not options.jinja:
        if tools:
            raise UnsupportedFeatureError("tools need the Jinja template path: pass jinja: true")
        plain = [{**m, "content": joined_text(m["content"])} for m in checked]
        variables = {"add_generation_prompt": True} if options.add_generation_prompt else {}
        prompt = render(BUILTIN_TEMPLATES[legacy_name(template)], {"messages": plain, **variables})
        return FormattedChat(prompt, legacy=True, reasoning_format=options.reasoning_format)

    source = template_source(template)
    caps = template_caps(source)
    # force_pure_content: tools reach the template, but no call grammar and no parse of calls or reasoning
    pure = options.force_pure_content
    tool_format = CONTENT if pure else always_format(source) or CONTENT
    calling = bool(tools) and options.tool_choice != "none" and not pure
    reasoning_format = "none" if pure else options.reasoning_format
    if calling:
        if has_grammar:
            raise InvalidParamsError("completion: cannot combine 'grammar' / 'json_schema' with tools; "
                                     "drop one, or pass tool_choice: 'none'")
        tool_format = pick_format(source, caps).with_tools(tools)
        checked = tool_format.prepare(checked, tools, options.tool_choice, options.parallel_tool_calls, caps)
    family = family_format(source, caps)
    if family is not None and family.rewrite is not None and not pure:  # llama.cpp rewrites in the family's handler
        checked = family.rewrite(checked, source)
    shaped = shape_for_template(checked, caps, write_out=calling and isinstance(tool_format, Generic),
                                map_developer=not isinstance(family, GptOss))
    variables = _context(options, tokens)
    prompt = _render(source, shaped, variables, options.add_generation_prompt, tokens, options.now)
    generation = ""
    if options.add_generation_prompt:
        without = _render(source, shaped, variables, False, tokens, options.now)
        generation = prompt[len(os.path.commonprefix([prompt, without])):]
        reopened = family.reopen(prompt) if family is not None and not pure else ""
        if reopened:
            prompt, generation = prompt + reopened, reopened
    grammar, lazy = "", False
    if calling and (options.tool_choice == "required" or isinstance(tool_format, Generic)):
        grammar = tool_format.grammar(tools, options.tool_choice, options.parallel_tool_calls)
    elif calling and tool_format.triggers:  # auto: the model writes freely until a call starts (llama.cpp's lazy grammar)
        grammar, lazy = tool_format.lazy_grammar(tools, options.parallel_tool_calls), True
    think = tool_format.think if tool_format is not CONTENT else reasoning_markers(source)
    return FormattedChat(
        prompt, tool_format, grammar, lazy, tool_format.triggers if lazy else (),
        preserved_tokens=list(tool_format.preserved) if calling or tool_format.always else [],
        additional_stops=list(tool_format.stops) if calling else [],
        generation_prompt=generation,
        thinking_forced_open=generation.rstrip().endswith(think[0]),
        reasoning_format=reasoning_format,
        think=think, chat_format=chat_format_number(source),
    )
