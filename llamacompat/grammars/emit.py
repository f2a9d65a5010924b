"""Writing GBNF text: string literals and character classes, escaped so ``parse_gbnf`` and llama.cpp read them back."""

from __future__ import annotations

from typing import Iterable

__all__ = ["literal", "char_class", "merge_ranges", "complement", "MAX_CODE_POINT"]

MAX_CODE_POINT = 0x10FFFF
_LITERAL_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CLASS_ESCAPES = {"]": "\\]", "[": "\\[", "\\": "\\\\", "-": "\\-", "^": "\\x5E", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _hex(code: int) -> str:
    if code <= 0xFF:
        return f"\\x{code:02X}"
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def _printable(char: str) -> bool:
    code = ord(char)
    return code >= 0x20 and not 0x7F <= code <= 0x9F and not 0xD800 <= code <= 0xDFFF and char.isprintable()


def literal(text: str) -> str:
    """A GBNF string literal matching exactly ``text``."""
    return '"' + "".join(_LITERAL_ESCAPES.get(c) or (c if _printable(c) else _hex(ord(c))) for c in text) + '"'


def _class_char(code: int) -> str:
    char = chr(code)
    return _CLASS_ESCAPES.get(char) or (char if _printable(char) else _hex(code))


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping, non-adjacent inclusive ranges."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The code points (0..0x10FFFF) outside ``ranges``."""
    out, start = [], 0
    for lo, hi in merge_ranges(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return out


def char_class(ranges: Iterable[tuple[int, int]], negated: bool = False) -> str:
    """A GBNF character class over inclusive code point ranges."""
    parts = []
    for lo, hi in merge_ranges(ranges):
        parts.append(_class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}")
    return "[" + ("^" if negated else "") + "".join(parts) + "]"
