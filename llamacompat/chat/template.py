"""Render Hugging Face / llama.cpp style Jinja chat templates with jinja2.

The environment matches what those templates expect (``raise_exception``,
``tojson``, ``strftime_now``, trimmed blocks) and is sandboxed: a template comes
from a model file, so it must not reach Python internals.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import InvalidParamsError, TemplateError, UnsupportedFeatureError

__all__ = ["BUILTIN_TEMPLATES", "render_chat", "normalize_messages"]

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}

_ROLES = ("system", "user", "assistant", "tool")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF's tojson keeps non-ASCII as is, unlike jinja2's HTML-safe filter.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise TemplateError(f"chat template syntax error at line {err.lineno}: {err.message}") from err


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate llama.rn chat messages; text parts are joined with newlines (as llama.rn)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParamsError("messages must be a non-empty list of {role, content} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidParamsError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in _ROLES:
            raise InvalidParamsError(f"messages[{i}].role must be one of {', '.join(_ROLES)}, got {role!r}")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            raise InvalidParamsError(f"messages[{i}] needs 'content' (or 'tool_calls')")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif kind in ("image_url", "input_audio", "media_marker"):
                    raise UnsupportedFeatureError(f"messages[{i}].content[{j}]: media parts are not supported yet")
                else:
                    raise InvalidParamsError(f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': str}}, got {part!r}")
            content = "\n".join(texts)
        elif content is not None and not isinstance(content, str):
            raise InvalidParamsError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        out.append({**message, "content": content if content is not None else ""})
    return out


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    strip_bos: bool = False,
    **extra: Any,
) -> str:
    """Render ``messages`` with ``template`` (Jinja source or a built-in name).

    With ``strip_bos`` a leading BOS text is removed, because the tokenizer adds
    the BOS token itself (llama.cpp does the same).
    """
    source = BUILTIN_TEMPLATES.get(template, template)
    try:
        prompt = _compile(source).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=bos_token, eos_token=eos_token, **extra,
        )
    except TemplateError:
        raise
    except jinja2.TemplateError as err:
        raise TemplateError(f"chat template failed: {err}") from err
    except Exception as err:  # a template may index missing keys etc.
        raise TemplateError(f"chat template failed: {type(err).__name__}: {err}") from err
    if strip_bos and bos_token and prompt.startswith(bos_token):
        prompt = prompt[len(bos_token):]
    return prompt
