"""GBNF as llguidance's Lark dialect, written from our parsed AST.

llguidance ships a GBNF → Lark converter, but it drops the parentheses of
``("." [0-9]{1,20})?``-style groups (Lark then sees two quantifiers in a row)
and rejects the ``\\-`` escape inside classes: on our 205-schema corpus it
refused 9 grammars that llama.cpp accepts. Writing Lark from ``parse_gbnf``'s
AST keeps every grammar we validate usable: rules become lowercase Lark rules,
classes ``/[...]/`` with ``\\x{...}`` escapes, and literals one string a
character. GBNF works on characters, but llguidance lexes greedily: with a
literal ``"02-"`` in the grammar, a date's ``"01"`` was lexed as the start of
``"02-"`` and then refused, so no lexeme is longer than one character. And
llguidance's Lark parser refuses about 28 nested parentheses, which GBNF allows
(up to ``MAX_NESTING``): groups deeper than ``_MAX_NESTING`` become rules.
"""

from __future__ import annotations

import json
import re

from .gbnf import AnyChar, CharClass, GbnfError, Group, Literal, Node, Repeat, RuleRef, Token, parse_gbnf

__all__ = ["gbnf_to_lark", "NoLarkEquivalent"]


class NoLarkEquivalent(GbnfError):
    """Valid GBNF that Lark (so llguidance) cannot express; llama.cpp's own engine can still run it."""

_PLAIN = re.compile(r"[A-Za-z0-9 ]")
_MAX_NESTING = 8  # parentheses written inside one Lark rule


def _code(code: int) -> str:
    char = chr(code)
    return char if _PLAIN.fullmatch(char) else f"\\x{{{code:X}}}"


def _char_class(node: CharClass) -> str:
    body = "".join(_code(lo) if lo == hi else f"{_code(lo)}-{_code(hi)}" for lo, hi in node.ranges)
    if not body:  # "[]" matches nothing, "[^]" anything
        return "/(?s:.)/" if node.negated else "/[^\\x{0}-\\x{10FFFF}]/"
    return f"/[{'^' if node.negated else ''}{body}]/"


class _Writer:
    def __init__(self, names: dict[str, str]) -> None:
        self.names = names
        self.extra: list[str] = []  # rules made of groups nested too deep
        self.depth = 0

    def group(self, options: tuple[tuple[Node, ...], ...]) -> str:
        """``(options)``, or past ``_MAX_NESTING`` parentheses the name of a new rule that holds them."""
        if self.depth >= _MAX_NESTING:
            outer, self.depth = self.depth, 0
            body = self.alternatives(options)
            self.depth = outer
            name = f"aux{len(self.extra)}"  # rule names from GBNF are written r<index>_<name>
            self.extra.append(f"{name}: {body}")
            return name
        self.depth += 1
        try:
            return f"({self.alternatives(options)})"
        finally:
            self.depth -= 1

    def alternatives(self, options: tuple[tuple[Node, ...], ...]) -> str:
        return " | ".join(self.sequence(items) for items in options)

    def sequence(self, items: tuple[Node, ...]) -> str:
        return " ".join(self.node(item) for item in items) if items else '""'

    def node(self, node: Node) -> str:
        if isinstance(node, Literal):  # one lexeme a character: see the module docstring
            return " ".join(json.dumps(char, ensure_ascii=False) for char in node.text) if node.text else '""'
        if isinstance(node, CharClass):
            return _char_class(node)
        if isinstance(node, AnyChar):
            return "/(?s:.)/"
        if isinstance(node, RuleRef):
            return self.names[node.name]
        if isinstance(node, Token):
            if node.negated:
                raise NoLarkEquivalent("negated token references (!<[...]>) have no Lark equivalent", 0, 0, None)
            return f"<{node.text}>"
        if isinstance(node, Group):
            return self.group(node.alternatives)
        if isinstance(node, Repeat):
            inner = self.group(node.node.alternatives if isinstance(node.node, Group) else ((node.node,),))
            if node.max is None:
                return f"{inner}*" if node.min == 0 else f"{inner}+" if node.min == 1 else f"{inner}{{{node.min},}}"
            if (node.min, node.max) == (0, 1):
                return f"{inner}?"
            return f"{inner}{{{node.min},{node.max}}}"
        raise TypeError(f"unknown GBNF node {node!r}")


def gbnf_to_lark(source: str, root: str = "root") -> str:
    """Lark text with the language of the GBNF ``source``; ``GbnfError`` if the GBNF is invalid."""
    grammar = parse_gbnf(source, root)
    names: dict[str, str] = {}
    for index, name in enumerate(grammar.rules):  # Lark rule names are lowercase identifiers
        names[name] = f"r{index}_{re.sub(r'[^a-z0-9]', '_', name.lower())}"
    writer = _Writer(names)
    lines = [f"start: {names[grammar.root]}"]
    lines += [f"{names[name]}: {writer.alternatives(rule.alternatives)}" for name, rule in grammar.rules.items()]
    return "\n".join(lines + writer.extra) + "\n"
