"""JSON Schema ``pattern`` (an ECMA-262 regular expression) to GBNF over the text of a JSON string.

Hand-written: JSON Schema patterns are ECMA-262, not Python's dialect, and
Python's own regex parser is private API. The subset is what schemas use:
literals, escapes (``\\d \\w \\s`` and their negations, ``\\xHH``, ``\\uHHHH``,
``\\cX``), classes with ranges, ``.``, groups (capturing, ``(?:``, named),
alternation, greedy and lazy quantifiers, and ``^`` / ``$`` at the ends. A
pattern is unanchored unless it says otherwise, as in JSON Schema. What a
grammar cannot express (backreferences, lookaround, word boundaries, Unicode
property escapes) raises ``PatternError`` with the position.

The grammar matches the JSON *encoding* of matching strings: a quote is written
``\\"``, a backslash ``\\\\``, control characters as JSON escapes, everything
else raw (what ``json.dumps(..., ensure_ascii=False)`` writes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from .emit import MAX_CODE_POINT, char_class, complement, literal, merge_ranges
from .gbnf import MAX_REPETITIONS

__all__ = ["PatternError", "pattern_to_gbnf", "json_chars", "JSON_STRING_CHAR"]

Ranges = list[tuple[int, int]]

_DIGIT: Ranges = [(0x30, 0x39)]
_WORD: Ranges = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
_SPACE: Ranges = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                  (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF)]
_LINE_TERMINATORS: Ranges = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
_CLASS_ESCAPES = {"d": (_DIGIT, False), "D": (_DIGIT, True), "w": (_WORD, False), "W": (_WORD, True),
                  "s": (_SPACE, False), "S": (_SPACE, True)}
_CONTROL_ESCAPES = {"t": 0x09, "n": 0x0A, "v": 0x0B, "f": 0x0C, "r": 0x0D}
_JSON_SHORT = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r", 0x22: '\\"', 0x5C: "\\\\"}

# Any character of a JSON string, as it may be written (escapes included; no lone surrogates).
JSON_STRING_CHAR = ('[^"\\\\\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" ([0-9a-cA-Ce-fE-F] [0-9a-fA-F]{3} | '
                    '[dD] [0-7] [0-9a-fA-F]{2}))')


class PatternError(ValueError):
    """A pattern the converter cannot express, with the 0-based position in the pattern."""

    def __init__(self, problem: str, position: int) -> None:
        super().__init__(f"{problem} at position {position}")
        self.problem, self.position = problem, position


@dataclass(frozen=True)
class _Chars:
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class _Seq:
    items: tuple["_Node", ...]


@dataclass(frozen=True)
class _Alt:
    options: tuple[_Seq, ...]


@dataclass(frozen=True)
class _Rep:
    node: "_Node"
    min: int
    max: int | None


@dataclass(frozen=True)
class _Anchor:
    start: bool
    position: int


_Node = Union[_Chars, _Seq, _Alt, _Rep, _Anchor]


class _Parser:
    def __init__(self, pattern: str, dotall: bool) -> None:
        self.src, self.pos, self.dotall = pattern, 0, dotall

    def peek(self, offset: int = 0) -> str:
        at = self.pos + offset
        return self.src[at] if at < len(self.src) else ""

    def fail(self, problem: str, position: int | None = None) -> PatternError:
        return PatternError(problem, self.pos if position is None else position)

    def parse(self) -> _Alt:
        alt = self.alternation()
        if self.pos < len(self.src):
            raise self.fail("unbalanced ')'")
        return alt

    def alternation(self) -> _Alt:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return _Alt(tuple(options))

    def sequence(self) -> _Seq:
        items: list[_Node] = []
        while self.peek() and self.peek() not in "|)":
            char = self.peek()
            if char in "*+?":
                raise self.fail(f"nothing to repeat before '{char}'")
            if char == "{" and self.quantifier_ahead():
                raise self.fail("nothing to repeat before '{'")
            items.append(self.quantified(self.atom()))
        return _Seq(tuple(items))

    def quantifier_ahead(self) -> bool:
        end = self.src.find("}", self.pos)
        body = self.src[self.pos + 1:end] if end != -1 else ""
        low, _, high = body.partition(",")
        return bool(low.isdigit() and (not high or high.isdigit()))

    def quantified(self, node: _Node) -> _Node:
        char = self.peek()
        start = self.pos
        if char in ("*", "+", "?"):
            self.pos += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif char == "{" and self.quantifier_ahead():
            end = self.src.index("}", self.pos)
            body = self.src[self.pos + 1:end]
            self.pos = end + 1
            low_text, comma, high_text = body.partition(",")
            low = int(low_text)
            high = (int(high_text) if high_text else None) if comma else low
            if high is not None and high < low:
                raise self.fail(f"quantifier {{{body}}} has its maximum below its minimum", start)
            if max(low, high or 0) > MAX_REPETITIONS:
                raise self.fail(f"quantifier {{{body}}} is above llama.cpp's repetition limit of {MAX_REPETITIONS}", start)
        else:
            return node
        if isinstance(node, _Anchor):
            raise self.fail("an anchor cannot be repeated", start)
        if self.peek() == "?":  # lazy: the same language
            self.pos += 1
        return self.quantified(_Rep(node, low, high))

    def atom(self) -> _Node:
        char = self.peek()
        start = self.pos
        self.pos += 1
        if char == "(":
            if self.src.startswith("?:", self.pos):
                self.pos += 2
            elif self.src.startswith(("?=", "?!", "?<=", "?<!"), self.pos):
                raise self.fail("lookaround assertions cannot be expressed in a grammar", start)
            elif self.src.startswith("?<", self.pos):
                end = self.src.find(">", self.pos)
                if end == -1:
                    raise self.fail("unterminated group name", start)
                self.pos = end + 1
            elif self.peek() == "?":
                raise self.fail("inline flags and other '(?' groups are not supported", start)
            inner = self.alternation()
            if self.peek() != ")":
                raise self.fail("unbalanced '(': no matching ')'", start)
            self.pos += 1
            return inner
        if char == "[":
            return _Chars(tuple(self.char_class(start)))
        if char == ".":
            return _Chars(tuple([(0, MAX_CODE_POINT)] if self.dotall else complement(_LINE_TERMINATORS)))
        if char in ("^", "$"):
            return _Anchor(char == "^", start)
        if char == "\\":
            return _Chars(tuple(self.escape(in_class=False)))
        return _Chars(((ord(char), ord(char)),))

    def hex_digits(self, count: int, start: int) -> int:
        digits = self.src[self.pos:self.pos + count]
        if len(digits) != count or any(d not in "0123456789abcdefABCDEF" for d in digits):
            raise self.fail(f"expected {count} hex digits", start)
        self.pos += count
        return int(digits, 16)

    def escape(self, in_class: bool) -> Ranges:
        """After a backslash: the characters it stands for."""
        start = self.pos - 1
        char = self.peek()
        if not char:
            raise self.fail("the pattern ends with a lone backslash", start)
        self.pos += 1
        if char in _CLASS_ESCAPES:
            ranges, negated = _CLASS_ESCAPES[char]
            return complement(ranges) if negated else list(ranges)
        if char in _CONTROL_ESCAPES:
            return [(_CONTROL_ESCAPES[char],) * 2]
        if char == "b" and in_class:
            return [(0x08, 0x08)]
        if char in "bB":
            raise self.fail(f"the word boundary '\\{char}' cannot be expressed in a grammar", start)
        if char == "0" and not self.peek().isdigit():
            return [(0, 0)]
        if char.isdigit():
            raise self.fail("backreferences cannot be expressed in a grammar", start)
        if char == "x":
            code = self.hex_digits(2, start)
            return [(code, code)]
        if char == "u":
            if self.peek() == "{":
                end = self.src.find("}", self.pos)
                body = self.src[self.pos + 1:end] if end != -1 else ""
                if not body or any(d not in "0123456789abcdefABCDEF" for d in body) or int(body, 16) > MAX_CODE_POINT:
                    raise self.fail("bad '\\u{...}' escape", start)
                self.pos = end + 1
                code = int(body, 16)
            else:
                code = self.hex_digits(4, start)
            return [(code, code)]
        if char == "c" and self.peek().isascii() and self.peek().isalpha():
            code = ord(self.peek()) % 32
            self.pos += 1
            return [(code, code)]
        if char in "pP" and self.peek() == "{":
            raise self.fail("Unicode property escapes are not supported", start)
        if char == "k" and self.peek() == "<":
            raise self.fail("backreferences cannot be expressed in a grammar", start)
        return [(ord(char), ord(char))]

    def class_atom(self) -> tuple[Ranges, bool]:
        """One class member: (characters, whether it is a single character usable in a range)."""
        char = self.peek()
        if not char:
            raise self.fail("unbalanced '[': no matching ']'")
        self.pos += 1
        if char != "\\":
            return [(ord(char), ord(char))], True
        ranges = self.escape(in_class=True)
        return ranges, len(ranges) == 1 and ranges[0][0] == ranges[0][1] and self.src[self.pos - 1] not in "dDwWsS"

    def char_class(self, start: int) -> Ranges:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges: Ranges = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("unbalanced '[': no matching ']'", start)
            low, single = self.class_atom()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                dash = self.pos
                self.pos += 1
                high, high_single = self.class_atom()
                if not (single and high_single):
                    raise self.fail("a class escape cannot bound a range", dash)
                if high[0][0] < low[0][0]:
                    raise self.fail("range out of order in character class", dash)
                ranges.append((low[0][0], high[0][0]))
            else:
                ranges.extend(low)
        self.pos += 1
        return complement(ranges) if negated else merge_ranges(ranges)


# -- emitting GBNF -----------------------------------------------------------------------------------


def _json_escape(code: int) -> str:
    return _JSON_SHORT.get(code) or f"\\u{code:04x}"


def _hex_any_case(text: str) -> str:
    return " ".join(f"[{c}{c.upper()}]" if c in "abcdef" else f'"{c}"' for c in text)


def json_chars(ranges: Ranges) -> str:
    """GBNF for one character from ``ranges``, as it is written inside a JSON string."""
    ranges = merge_ranges(ranges)
    specials = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C), (0xD800, 0xDFFF)]
    raw = _intersect(ranges, complement(specials))
    alternatives = [char_class(raw)] if raw else []
    controls = [c for lo, hi in _intersect(ranges, [(0x00, 0x1F)]) for c in range(lo, hi + 1)]
    if len(controls) == 32:
        alternatives.append(literal("\\u00") + " [01] [0-9a-fA-F]")
    for code in controls if len(controls) < 32 else []:
        if code not in _JSON_SHORT:
            alternatives.append(literal("\\u00") + " " + _hex_any_case(f"{code:02x}"))
    for code in (0x08, 0x09, 0x0A, 0x0C, 0x0D, 0x22, 0x5C):
        if any(lo <= code <= hi for lo, hi in ranges):
            alternatives.append(literal(_json_escape(code)))
    if not alternatives:
        return ""
    return alternatives[0] if len(alternatives) == 1 else "(" + " | ".join(alternatives) + ")"


def _intersect(a: Ranges, b: Ranges) -> Ranges:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return merge_ranges(out)


def _single(node: _Node) -> int | None:
    if isinstance(node, _Chars) and len(node.ranges) == 1 and node.ranges[0][0] == node.ranges[0][1]:
        return node.ranges[0][0]
    return None


class _Emitter:
    def node(self, node: _Node) -> str:
        if isinstance(node, _Chars):
            expression = json_chars(list(node.ranges))
            if not expression:
                return '[^\\x00-\\U0010FFFF]'  # an empty class ([] in ECMA-262): matches nothing
            return expression
        if isinstance(node, _Rep):
            inner = f"({self.node(node.node)})"
            suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((node.min, node.max))
            if suffix is None:
                suffix = f"{{{node.min}}}" if node.min == node.max else f"{{{node.min},{'' if node.max is None else node.max}}}"
            return inner + suffix
        if isinstance(node, _Alt):
            options = [self.sequence(option.items) for option in node.options]
            return options[0] if len(options) == 1 else "(" + " | ".join(o or '""' for o in options) + ")"
        if isinstance(node, _Seq):
            return self.sequence(node.items)
        raise PatternError("anchors are supported only at the start or the end of the pattern", node.position)

    def sequence(self, items: tuple[_Node, ...]) -> str:
        parts: list[str] = []
        run: list[str] = []
        for item in items:
            code = _single(item)
            if code is not None and not 0xD800 <= code <= 0xDFFF:
                run.append(chr(code))
                continue
            if run:
                parts.append(_literal_run(run))
                run = []
            parts.append(self.node(item))
        if run:
            parts.append(_literal_run(run))
        return " ".join(p for p in parts if p)


def _literal_run(chars: list[str]) -> str:
    """Characters written one way each; a control character may also use its \\u00XX spelling."""
    if all(ord(c) >= 0x20 for c in chars):
        return literal("".join(_json_escape(ord(c)) if c in '"\\' else c for c in chars))
    return " ".join(json_chars([(ord(c), ord(c))]) for c in chars)


def pattern_to_gbnf(pattern: str, dotall: bool = False) -> str:
    """GBNF (one expression) for the JSON-encoded text of every string ``pattern`` matches (searched, not anchored)."""
    tree = _Parser(pattern, dotall).parse()
    emitter = _Emitter()
    any_char = f"({JSON_STRING_CHAR})*"
    options = []
    for option in tree.options:
        items = list(option.items)
        anchored_start = bool(items) and isinstance(items[0], _Anchor) and items[0].start
        anchored_end = bool(items) and isinstance(items[-1], _Anchor) and not items[-1].start
        if anchored_start:
            items.pop(0)
        if anchored_end:
            items.pop()
        body = emitter.sequence(tuple(items))
        parts = ("" if anchored_start else any_char, body, "" if anchored_end else any_char)
        options.append(" ".join(p for p in parts if p) or '""')
    return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"
