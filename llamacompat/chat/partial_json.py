"""Read JSON that a model is still writing: close what is open, drop what is half-written.

Streaming needs the tool calls (and a generic-format ``response``) of a reply
that stops mid-value. The standard library parses only whole documents, so the
text is completed first: an open string is closed, an unfinished member or
literal is cut back to the last complete one, and open objects and arrays are
closed. Written by hand because no maintained library does this for plain
``json`` without pulling in a parser generator.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Iterator

__all__ = ["parse_partial", "MISSING"]

MISSING = object()
_decoder = json.JSONDecoder()


# A string (closed or not) or one structural character; strings are skipped in C, not char by char.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*(")?|[{}\[\],]')


# Streaming parses ever longer prefixes of one reply, so the scan resumes where
# the previous one stopped: (scanned prefix, open brackets, cuts as a linked list).
_resume: tuple[str, tuple[str, ...], Any] = ("", (), None)


def _scan(text: str) -> tuple[str, bool, Any]:
    """(closers for what is open, inside a string?, linked (cut, closers there, previous) places to cut back to)."""
    global _resume
    prefix, opened, cuts = _resume
    if not text.startswith(prefix):
        prefix, opened, cuts = "", (), None
    stack = list(opened)
    safe = len(prefix)
    in_string = False
    for match in _TOKENS.finditer(text, safe):
        token = match.group()
        if token[0] == '"':
            in_string = match.group(1) is None  # only the last token can be unclosed
            if not in_string:
                safe = match.end()
            continue
        if token in "{[":
            stack.append("}" if token == "{" else "]")
            cuts = (match.end(), "".join(reversed(stack)), cuts)
        elif token in "}]":
            if stack:
                stack.pop()
        else:
            cuts = (match.start(), "".join(reversed(stack)), cuts)
        safe = match.end()
    _resume = (text[:safe], tuple(stack), cuts)
    return "".join(reversed(stack)), in_string, cuts


def _cut_backs(text: str, cuts: Any) -> Iterator[tuple[str, str]]:
    while cuts is not None:
        cut, closers, cuts = cuts
        yield text[:cut].rstrip(), closers


def parse_partial(text: str) -> Any:
    """The value ``text`` (a prefix of one JSON document) is heading for, or ``MISSING``.

    Whole documents parse as they are; trailing text after the value is ignored.
    """
    stripped = text.strip()
    if not stripped:
        return MISSING
    try:
        return _decoder.raw_decode(stripped)[0]
    except ValueError:
        pass
    closers, in_string, cuts = _scan(stripped)
    if in_string:
        # Close the string, dropping a half-written escape.
        escape = stripped.rfind("\\", len(stripped) - 6)
        if escape != -1 and (escape == len(stripped) - 1 or stripped[escape + 1] == "u"):
            stripped = stripped[:escape]
        stripped += '"'
    for head, end in itertools.chain([(stripped, closers)], _cut_backs(stripped, cuts)):
        if head.endswith(":"):  # a key without its value yet
            continue
        try:
            return json.loads(head + end)
        except ValueError:
            continue
    return MISSING
