"""GBNF, llama.cpp's grammar language: a parser to an AST, and the checks engines rely on.

Hand-written because no maintained Python package parses GBNF with llama.cpp's
exact rules (rule names are ``[a-zA-Z0-9-]+``, newlines end a rule outside
parentheses, ``{m,n}`` repetitions capped at 2000, ``<token>`` references). Every
error names the line, the column and the rule, which llama.cpp's parser does not
(it prints the whole grammar to stderr). ``parse_gbnf`` also rejects what
llama.cpp only finds later or accepts silently: undefined rules, a missing
root, left recursion, a rule defined twice, empty alternatives, character
classes that match nothing, and (``check_tokens``, given the vocabulary) token
references outside it. Size limits (``MAX_NESTING``, ``MAX_RULES``) keep every
engine's recursion, and ours, bounded.
"""

from __future__ import annotations

import bisect
import difflib
from dataclasses import dataclass, field
from typing import Callable, Union

from ..errors import GrammarError

__all__ = [
    "Grammar", "Rule", "Literal", "CharClass", "AnyChar", "RuleRef", "Token", "Group", "Repeat",
    "GbnfError", "parse_gbnf", "check_tokens", "MAX_REPETITIONS", "MAX_NESTING", "MAX_RULES",
]

MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
MAX_NESTING = 100  # parentheses inside parentheses (the schema corpus needs 7)
MAX_RULES = 1000  # rules in one grammar (the schema corpus needs 17)
_LAST_CODE_POINT = 0x10FFFF


class GbnfError(GrammarError):
    """A grammar that llama.cpp would reject (or silently misread), with where and in which rule."""

    def __init__(self, problem: str, line: int, column: int, rule: str | None) -> None:
        self.problem, self.line, self.column, self.rule = problem, line, column, rule
        where = f"line {line}, column {column}" + (f" (rule '{rule}')" if rule else "")
        super().__init__(f"Failed to initialize sampling: invalid grammar at {where}: {problem}")


@dataclass(frozen=True)
class Literal:
    text: str


@dataclass(frozen=True)
class CharClass:
    ranges: tuple[tuple[int, int], ...]  # inclusive code point ranges
    negated: bool = False

    def matches(self, char: str) -> bool:
        code = ord(char)
        return any(lo <= code <= hi for lo, hi in self.ranges) != self.negated


@dataclass(frozen=True)
class AnyChar:
    pass


@dataclass(frozen=True)
class RuleRef:
    name: str
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Token:
    """``<text>`` or ``<[id]>`` (``!`` negates): a vocabulary token, checked against one by ``check_tokens``."""

    text: str
    negated: bool = False
    id: int | None = None  # for ``<[id]>``
    line: int = field(default=0, compare=False)
    column: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Group:
    alternatives: tuple[tuple["Node", ...], ...]


@dataclass(frozen=True)
class Repeat:
    node: "Node"
    min: int
    max: int | None  # None: unbounded


Node = Union[Literal, CharClass, AnyChar, RuleRef, Token, Group, Repeat]


@dataclass(frozen=True)
class Rule:
    name: str
    alternatives: tuple[tuple[Node, ...], ...]
    line: int
    column: int


@dataclass(frozen=True)
class Grammar:
    rules: dict[str, Rule]
    root: str = "root"


_ESCAPES = {"t": "\t", "r": "\r", "n": "\n", "\\": "\\", '"': '"', "[": "[", "]": "]", "-": "-"}
_HEX = {"x": 2, "u": 4, "U": 8}


def _is_word(char: str) -> bool:
    return char.isascii() and (char.isalnum() or char == "-")


class _Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0
        self.rule: str | None = None
        self.rules: dict[str, Rule] = {}
        self.depth = 0  # open parentheses
        self.newlines = [at for at, char in enumerate(source) if char == "\n"]  # where() in O(log n)

    # -- positions and errors ---------------------------------------------------
    def where(self, pos: int | None = None) -> tuple[int, int]:
        pos = self.pos if pos is None else pos
        before = bisect.bisect_left(self.newlines, pos)  # newlines before pos
        return before + 1, pos - (self.newlines[before - 1] + 1 if before else 0) + 1

    def fail(self, problem: str, pos: int | None = None) -> GbnfError:
        return GbnfError(problem, *self.where(pos), self.rule)

    def peek(self, offset: int = 0) -> str:
        at = self.pos + offset
        return self.src[at] if at < len(self.src) else ""

    def space(self, newline_ok: bool) -> None:
        src = self.src
        while self.pos < len(src):
            char = src[self.pos]
            if char == "#":
                while self.pos < len(src) and src[self.pos] not in "\r\n":
                    self.pos += 1
            elif char in " \t" or (newline_ok and char in "\r\n"):
                self.pos += 1
            else:
                break

    # -- grammar ------------------------------------------------------------------
    def parse(self) -> dict[str, Rule]:
        self.space(True)
        while self.pos < len(self.src):
            self.parse_rule()
        return self.rules

    def name(self) -> str:
        start = self.pos
        while _is_word(self.peek()):
            self.pos += 1
        if self.pos == start:
            found = self.peek()
            hint = " (rule names use letters, digits and '-' only)" if found == "_" else ""
            raise self.fail(f"expected a rule name, found {found!r}{hint}" if found else "expected a rule name")
        return self.src[start:self.pos]

    def parse_rule(self) -> None:
        start = self.pos
        self.rule = None
        name = self.name()
        self.rule = name
        self.space(False)
        if not self.src.startswith("::=", self.pos):
            raise self.fail(f"expected '::=' after the rule name, found {self.peek()!r}" if self.peek() else "expected '::='")
        self.pos += 3
        self.space(True)
        alternatives = self.alternatives(nested=False)
        if name in self.rules:
            first = self.rules[name]
            raise self.fail(f"rule '{name}' is defined twice (first at line {first.line}); merge the definitions "
                            "with '|'", start)
        if len(self.rules) == MAX_RULES:
            raise self.fail(f"more than {MAX_RULES} rules (the limit)", start)
        self.rules[name] = Rule(name, alternatives, *self.where(start))
        if self.peek() == "\r":
            self.pos += 2 if self.peek(1) == "\n" else 1
        elif self.peek() == "\n":
            self.pos += 1
        elif self.peek():
            hint = {")": " (unbalanced ')')", "_": " (rule names use letters, digits and '-' only)"}.get(self.peek(), "")
            raise self.fail(f"expected the end of the rule, found {self.peek()!r}{hint}")
        self.space(True)

    def alternatives(self, nested: bool) -> tuple[tuple[Node, ...], ...]:
        alts = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            alts.append(self.sequence(nested))
        return tuple(alts)

    def sequence(self, nested: bool) -> tuple[Node, ...]:
        start = self.pos
        items: list[Node] = []
        while True:
            char = self.peek()
            if char == '"':
                items.append(Literal(self.literal()))
            elif char == "[":
                items.append(self.char_class())
            elif char == ".":
                self.pos += 1
                items.append(AnyChar())
            elif char in ("<", "!"):
                items.append(self.token())
            elif char == "(":
                open_at = self.pos
                self.depth += 1
                if self.depth > MAX_NESTING:
                    raise self.fail(f"parentheses nested more than {MAX_NESTING} levels deep (the limit); "
                                    "move inner parts into rules of their own")
                self.pos += 1
                self.space(True)
                group = Group(self.alternatives(nested=True))
                if self.peek() != ")":
                    raise self.fail("unbalanced '(': no matching ')'", open_at)
                self.pos += 1
                self.depth -= 1
                items.append(group)
            elif char and _is_word(char):
                line, column = self.where()
                items.append(RuleRef(self.name(), line, column))
            elif char in ("*", "+", "?", "{"):
                if not items:
                    raise self.fail(f"'{char}' must follow an item to repeat")
                items[-1] = self.repetition(items[-1])
            else:
                break
            self.space(nested)
        if not items:
            problem = "empty alternative: write \"\" to match the empty string"
            if self.peek() in ("]", "}"):
                problem = f"unexpected {self.peek()!r}"
            elif not self.peek() and nested:
                problem = "unbalanced '(': the grammar ends inside parentheses"
            raise self.fail(problem, start if self.peek() in ("|", ")", "\n", "\r", "") else None)
        return tuple(items)

    def char(self, closing: str) -> str:
        """One (possibly escaped) character of a literal or class."""
        start = self.pos
        char = self.peek()
        if not char:
            what = "string" if closing == '"' else "character class"
            raise self.fail(f"unterminated {what}: no closing {closing!r}", start)
        if char != "\\":
            self.pos += 1
            return char
        kind = self.peek(1)
        if kind in _ESCAPES:
            self.pos += 2
            return _ESCAPES[kind]
        if kind in _HEX:
            digits = self.src[self.pos + 2:self.pos + 2 + _HEX[kind]]
            if len(digits) != _HEX[kind] or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.fail(f"bad escape '\\{kind}': expected {_HEX[kind]} hex digits")
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self.fail(f"bad escape '\\{kind}{digits}': beyond the last Unicode code point")
            self.pos += 2 + _HEX[kind]
            return chr(code)
        raise self.fail(f"bad escape '\\{kind}' (known: \\t \\r \\n \\\\ \\\" \\[ \\] \\- \\xHH \\uHHHH \\UHHHHHHHH)")

    def literal(self) -> str:
        start = self.pos
        self.pos += 1
        out = []
        while self.peek() != '"':
            if not self.peek():
                raise self.fail("unterminated string: no closing '\"'", start)
            out.append(self.char('"'))
        self.pos += 1
        return "".join(out)

    def char_class(self) -> CharClass:
        start = self.pos
        self.pos += 1
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        ranges = []
        while self.peek() != "]":
            if not self.peek():
                raise self.fail("unbalanced '[': no matching ']'", start)
            low = self.char("]")
            high = low
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                high = self.char("]")
                if ord(high) < ord(low):
                    raise self.fail(f"empty range {low!r}-{high!r} in character class")
            ranges.append((ord(low), ord(high)))
        self.pos += 1
        if not ranges and not negated:
            raise self.fail("empty character class '[]': it matches no character", start)
        if negated and _covers_everything(ranges):
            raise self.fail(f"character class {self.src[start:self.pos]} excludes every character: it matches none",
                            start)
        return CharClass(tuple(ranges), negated)

    def token(self) -> Token:
        line, column = self.where()
        negated = self.peek() == "!"
        if negated:
            self.pos += 1
        if self.peek() != "<":
            raise self.fail("expected '<' after '!' (a negated token)")
        start = self.pos
        end = self.src.find(">", start)
        if end == -1 or "\n" in self.src[start:end]:
            raise self.fail("unterminated token: no closing '>'", start)
        self.pos = end + 1
        text = self.src[start + 1:end]
        token_id = None
        if text.startswith("["):
            digits = text[1:-1] if text.endswith("]") else ""
            if not (digits.isascii() and digits.isdigit()):
                raise self.fail(f"bad token id <{text}>: write <[N]> with a non-negative integer N", start)
            token_id = int(digits)
        return Token(text, negated, token_id, line, column)

    def integer(self) -> int:
        start = self.pos
        while self.peek().isdigit() and self.peek().isascii():
            self.pos += 1
        if self.pos == start:
            raise self.fail("expected an integer in '{...}'")
        return int(self.src[start:self.pos])

    def repetition(self, node: Node) -> Repeat:
        char = self.peek()
        self.pos += 1
        if char == "*":
            return Repeat(node, 0, None)
        if char == "+":
            return Repeat(node, 1, None)
        if char == "?":
            return Repeat(node, 0, 1)
        open_at = self.pos - 1
        self.space(True)
        low = self.integer()
        self.space(True)
        high: int | None = low
        if self.peek() == ",":
            self.pos += 1
            self.space(True)
            high = self.integer() if self.peek().isdigit() else None
            self.space(True)
        if self.peek() != "}":
            raise self.fail("unbalanced '{': expected '}'", open_at)
        self.pos += 1
        if max(low, high or 0) > MAX_REPETITIONS:
            raise self.fail(f"repetition count above llama.cpp's limit of {MAX_REPETITIONS}", open_at)
        if high is not None and high < low:
            raise self.fail(f"repetition {{{low},{high}}} has its maximum below its minimum", open_at)
        return Repeat(node, low, high)


def _covers_everything(ranges: list[tuple[int, int]]) -> bool:
    """Whether the code point ranges leave no character out."""
    reach = -1
    for low, high in sorted(ranges):
        if low > reach + 1:
            return False
        reach = max(reach, high)
    return reach >= _LAST_CODE_POINT


def _refs(nodes: tuple[Node, ...]) -> list[RuleRef]:
    """Every rule reference in ``nodes``."""
    return _left_refs(nodes, lambda _node: True)


def _nullability(rules: dict[str, Rule]) -> Callable[[Node], bool]:
    """A test for "can match the empty string", from a fixed point over the rules."""
    nullable: set[str] = set()

    def node_nullable(node: Node) -> bool:
        if isinstance(node, Literal):
            return node.text == ""
        if isinstance(node, RuleRef):
            return node.name in nullable
        if isinstance(node, Group):
            return any(all(node_nullable(n) for n in alt) for alt in node.alternatives)
        if isinstance(node, Repeat):
            return node.min == 0 or node_nullable(node.node)
        return False

    changed = True
    while changed:
        changed = False
        for rule in rules.values():
            if rule.name not in nullable and any(all(node_nullable(n) for n in alt) for alt in rule.alternatives):
                nullable.add(rule.name)
                changed = True
    return node_nullable


def _left_refs(nodes: tuple[Node, ...], nullable_node: Callable[[Node], bool]) -> list[RuleRef]:
    """Rule references that can come first in ``nodes``: each node is passed over while it can match nothing."""
    out: list[RuleRef] = []
    for node in nodes:
        if isinstance(node, RuleRef):
            out.append(node)
        elif isinstance(node, Group):
            for alt in node.alternatives:
                out.extend(_left_refs(alt, nullable_node))
        elif isinstance(node, Repeat):
            out.extend(_left_refs((node.node,), nullable_node))
        if not nullable_node(node):
            break
    return out


def _check(grammar: Grammar) -> None:
    rules = grammar.rules
    names = list(rules)
    for rule in rules.values():
        for alt in rule.alternatives:
            for ref in _refs(alt):
                if ref.name not in rules:
                    close = difflib.get_close_matches(ref.name, names, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise GbnfError(f"undefined rule '{ref.name}'{hint}", ref.line, ref.column, rule.name)
    if grammar.root not in rules:
        raise GbnfError(f"no '{grammar.root}' rule: the grammar starts there", 1, 1, None)
    node_nullable = _nullability(rules)
    edges = {rule.name: [ref for alt in rule.alternatives for ref in _left_refs(alt, node_nullable)] for rule in rules.values()}
    # A cycle in "can start with" edges is left recursion, which llama.cpp's engine rejects. Depth-first with
    # an explicit stack: a chain of MAX_RULES rules would pass Python's recursion limit.
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in rules:
        if start in state:
            continue
        state[start] = 1
        path, pending = [start], [iter(edges[start])]
        while pending:
            edge = next(pending[-1], None)
            if edge is None:
                state[path.pop()] = 2
                pending.pop()
            elif state.get(edge.name) == 1:
                cycle = path[path.index(edge.name):] + [edge.name]
                raise GbnfError("left recursion (" + " -> ".join(cycle) + "): llama.cpp cannot run it; "
                                "rewrite it with repetition, e.g. a ::= b (\"+\" b)*", edge.line, edge.column, path[-1])
            elif edge.name not in state:
                state[edge.name] = 1
                path.append(edge.name)
                pending.append(iter(edges[edge.name]))


def _tokens(nodes: tuple[Node, ...]) -> list[Token]:
    """Every token reference in ``nodes`` (nesting is bounded by MAX_NESTING)."""
    out: list[Token] = []
    for node in nodes:
        if isinstance(node, Token):
            out.append(node)
        elif isinstance(node, Group):
            for alt in node.alternatives:
                out.extend(_tokens(alt))
        elif isinstance(node, Repeat):
            out.extend(_tokens((node.node,)))
    return out


def check_tokens(grammar: Grammar, n_vocab: int, is_token: Callable[[str], bool]) -> None:
    """Refuse token references the vocabulary lacks: ``<[id]>`` with ``id >= n_vocab``, and ``<text>`` where
    ``is_token("<text>")`` is false (the text is not exactly one token). No engine could ever match them."""
    for rule in grammar.rules.values():
        for alt in rule.alternatives:
            for token in _tokens(alt):
                if token.id is not None and token.id >= n_vocab:
                    raise GbnfError(f"token <[{token.id}]> is outside the vocabulary (ids 0..{n_vocab - 1})",
                                    token.line, token.column, rule.name)
                if token.id is None and not is_token(f"<{token.text}>"):
                    raise GbnfError(f"<{token.text}> is not a single token of this model's vocabulary",
                                    token.line, token.column, rule.name)


def parse_gbnf(source: str, root: str = "root") -> Grammar:
    """Parse and check a GBNF grammar; ``GbnfError`` (a ``GrammarError``) says where and what is wrong."""
    if not isinstance(source, str):
        raise GrammarError(f"Failed to initialize sampling: a grammar must be a string, got {type(source).__name__}")
    parser = _Parser(source)
    grammar = Grammar(parser.parse(), root)
    if not grammar.rules:
        raise GbnfError("the grammar has no rules", 1, 1, None)
    _check(grammar)
    return grammar
