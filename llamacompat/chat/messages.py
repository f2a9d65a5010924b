"""llama.rn chat messages and tools: validation, then the shape a template receives.

Validation names the message and field at fault. Shaping follows llama.cpp's
Jinja path: content is always present, tool-call arguments are JSON strings
(objects for templates that write them out themselves), text parts are joined
for templates that only take strings, ``developer`` becomes ``system``, and a
system message is folded into the next one for templates without a system role.
Calls and results that the template would drop are written out as JSON only on
the generic tool path (llama.cpp's generic handler); otherwise the template
gets them as they are, as llama.cpp hands them over.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from ..errors import InvalidParamsError
from ..media import MEDIA_MARKER, audio_data_url
from .template import Caps

__all__ = ["validate_messages", "validate_tools", "shape_for_template", "joined_text", "media_refs", "media_ref",
           "map_media_parts", "MEDIA_PART_TYPES"]

ROLES = ("system", "user", "assistant", "tool", "developer")
MEDIA_PART_TYPES = ("image_url", "input_audio")


def _fail(where: str, problem: str) -> InvalidParamsError:
    return InvalidParamsError(f"{where}: {problem}")


def _check_parts(content: list[Any], where: str) -> list[dict[str, str]]:
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in MEDIA_PART_TYPES:
            media_ref(part, f"{where}[{j}]")  # checked here; media_refs collects them
            kind, part = "text", {"type": "text", "text": MEDIA_MARKER}  # as llama.rn's JS does: a marker in the text
        if kind != "text" or not isinstance(part.get("text"), str):
            raise _fail(f"{where}[{j}]", f"must be {{'type': 'text', 'text': str}}, got {part!r}")
        parts.append({"type": "text", "text": part["text"]})
    return parts


def media_ref(part: dict[str, Any], where: str) -> str:
    """The reference of an ``image_url`` part (its url) or an ``input_audio`` part (a data: URL of its data)."""
    if part["type"] == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str) or not url:
            raise _fail(f"{where}.image_url", f"must be {{'url': path | file:// | data: URL}}, got {image!r}")
        return url
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise _fail(f"{where}.input_audio", f"must be {{'data': base64, 'format': 'wav' | 'mp3'}}, got {audio!r}")
    fmt = str(audio.get("format"))
    if isinstance(audio.get("url"), str) and audio["url"]:  # llama.rn also takes a url (a path) here
        audio_data_url("", fmt)  # the format is still checked
        return str(audio["url"])
    data = audio.get("data")
    if not isinstance(data, str) or not data:
        raise _fail(f"{where}.input_audio.data", "must be the sound as a base64 string")
    return audio_data_url(data, fmt)


def _is_media_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in MEDIA_PART_TYPES


def map_media_parts(messages: Any, fn: Callable[[dict[str, Any], str], dict[str, Any]]) -> Any:
    """``messages`` with ``fn(part, where)`` in place of each ``image_url`` / ``input_audio`` part, in prompt order
    (``where``: ``messages[i].content[j]``); the other messages and parts as they are, whatever their shape."""
    if not isinstance(messages, list):
        return messages
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(_is_media_part(part) for part in content):
            message = {**message, "content": [fn(part, f"messages[{i}].content[{j}]") if _is_media_part(part) else part
                                              for j, part in enumerate(content)]}
        out.append(message)
    return out


def media_refs(messages: list[Any]) -> list[str]:
    """The media of (already validated) ``messages``, in prompt order: one per media marker."""
    refs: list[str] = []

    def collect(part: dict[str, Any], where: str) -> dict[str, Any]:
        refs.append(media_ref(part, where))
        return part

    map_media_parts(messages, collect)
    return refs


def _check_tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise _fail(where, f"must be a list of {{'type': 'function', 'function': {{name, arguments}}}}, got {calls!r}")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise _fail(at, f"must be a dict, got {type(call).__name__}")
        if call.get("type", "function") != "function":
            raise _fail(f"{at}.type", f"must be 'function', got {call.get('type')!r}")
        function = call.get("function")
        if not isinstance(function, dict):
            raise _fail(f"{at}.function", "must be a dict with 'name' and 'arguments'")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"{at}.function.name", f"must be a non-empty string, got {name!r}")
        arguments = function.get("arguments", {})
        if isinstance(arguments, dict):
            arguments = json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))
        elif not isinstance(arguments, str):
            raise _fail(f"{at}.function.arguments", f"must be a JSON string or a dict, got {type(arguments).__name__}")
        shaped: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
        ident = call.get("id")
        if ident is not None and not isinstance(ident, str):
            raise _fail(f"{at}.id", f"must be a string, got {ident!r}")
        if ident:
            shaped["id"] = ident
        out.append(shaped)
    return out


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check llama.rn messages; returns clean copies (content str or text parts, never None)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParamsError("messages must be a non-empty list of {role, content} dicts")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _fail(where, f"must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise _fail(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        clean: dict[str, Any] = {"role": role}
        content = message.get("content")
        if isinstance(content, list):
            clean["content"] = _check_parts(content, f"{where}.content")
        elif content is None or isinstance(content, str):
            clean["content"] = content or ""
        else:
            raise _fail(f"{where}.content", f"must be a string or a list of text parts, got {type(content).__name__}")
        calls = message.get("tool_calls")
        if content is None and not calls:
            raise _fail(where, "needs 'content' (or 'tool_calls' for an assistant turn)")
        if calls:
            if role != "assistant":
                raise _fail(f"{where}.tool_calls", f"only assistant messages carry tool calls, not {role!r}")
            clean["tool_calls"] = _check_tool_calls(calls, f"{where}.tool_calls")
        for key in ("reasoning_content", "name", "tool_call_id"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                raise _fail(f"{where}.{key}", f"must be a string, got {type(value).__name__}")
            if value:
                clean[key] = value
        out.append(clean)
    return out


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Check OpenAI-shaped tools: ``[{type: 'function', function: {name, description?, parameters?}}]``."""
    if not isinstance(tools, list):
        raise InvalidParamsError(f"completion: 'tools' must be a list of {{'type': 'function', 'function': {{...}}}}, "
                                 f"got {type(tools).__name__}")
    names = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _fail(where, f"must be {{'type': 'function', 'function': {{name, description, parameters}}}}, got {tool!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _fail(f"{where}.function", "must be a dict with 'name' (and 'description', 'parameters')")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(f"{where}.function.name", f"must be a non-empty string, got {name!r}")
        if name in names:
            raise _fail(f"{where}.function.name", f"{name!r} is declared twice")
        names.add(name)
        parameters = function.get("parameters", {})
        if not isinstance(parameters, (dict, bool)):
            raise _fail(f"{where}.function.parameters", f"must be a JSON schema object, got {type(parameters).__name__}")
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise _fail(f"{where}.function.description", f"must be a string, got {type(description).__name__}")
    return tools


def joined_text(content: str | list[dict[str, str]]) -> str:
    """Text parts joined with newlines, as llama.cpp does for string-only templates."""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def shape_for_template(messages: list[dict[str, Any]], caps: Caps, *, write_out: bool = False,
                       map_developer: bool = True) -> list[dict[str, Any]]:
    """The messages as llama.cpp hands them to this template (see the module docstring).

    ``write_out``: the generic tool path, where calls and results the template drops are written out as JSON;
    ``map_developer``: ``developer`` becomes ``system`` (all templates but GPT-OSS, whose template has the role).
    """
    shaped = []
    for i, message in enumerate(messages):
        message = dict(message)
        content = message.get("content")  # GPT-OSS's handler drops it from call turns with reasoning
        if caps.typed_content and not caps.string_content and isinstance(content, str):
            message["content"] = [{"type": "text", "text": content}]
        elif not (caps.typed_content and caps.string_content) and isinstance(content, list):
            message["content"] = joined_text(content)
        if message["role"] == "developer" and map_developer:
            message["role"] = "system"
        if caps.object_arguments and "tool_calls" in message:
            message["tool_calls"] = [_with_object_arguments(call, i) for call in message["tool_calls"]]
        shaped.append(_written_out(message, caps) if write_out else message)
    if not caps.system_role and shaped and shaped[0]["role"] == "system":
        system = shaped.pop(0)
        if shaped:
            shaped[0]["content"] = joined_text(system["content"]) + "\n" + joined_text(shaped[0]["content"])
    return shaped


def _written_out(message: dict[str, Any], caps: Caps) -> dict[str, Any]:
    """Calls and results for a template that would drop them, as the JSON the generic tool format uses."""
    if message.get("tool_calls") and not caps.tool_calls:
        calls = []
        for call in message["tool_calls"]:
            arguments = call["function"]["arguments"]
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments or "{}")
                except json.JSONDecodeError:
                    pass
            calls.append({"name": call["function"]["name"], "arguments": arguments})
        reply = {"tool_call": calls[0]} if len(calls) == 1 else {"tool_calls": calls}
        text = json.dumps(reply, ensure_ascii=False)
        content = joined_text(message["content"])
        message = {k: v for k, v in message.items() if k != "tool_calls"}
        message["content"] = f"{content}\n{text}" if content else text
    elif message["role"] == "tool" and not caps.tool_responses:
        response = {"tool_response": {"tool_call_id": message.get("tool_call_id", ""),
                                      "content": joined_text(message["content"])}}
        message = {"role": "user", "content": json.dumps(response, ensure_ascii=False)}
    return message


def _with_object_arguments(call: dict[str, Any], index: int) -> dict[str, Any]:
    function = call["function"]
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError as err:
        raise _fail(f"messages[{index}].tool_calls", f"arguments of {function['name']!r} are not valid JSON ({err}); "
                    "this template needs them as an object") from None
    return {**call, "function": {**function, "arguments": arguments}}
