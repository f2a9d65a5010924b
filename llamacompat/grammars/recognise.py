"""Does a text belong to a grammar's language? A recogniser over the ``parse_gbnf`` AST.

Each node maps a start position to the set of positions where it can end, with
rule results memoised per position. That is a complete recogniser for any
grammar ``parse_gbnf`` accepts (which has no left recursion), ambiguous ones
included, and polynomial in the text's length. It checks converter output in
tests and ``llamacompat grammar test``; generation uses the backend's engine.
"""

from __future__ import annotations

import sys

from ..errors import GrammarError
from .gbnf import AnyChar, CharClass, Grammar, Group, Literal, Node, Repeat, RuleRef, Token, parse_gbnf

__all__ = ["accepts"]


class _Recogniser:
    def __init__(self, grammar: Grammar, text: str) -> None:
        self.rules = grammar.rules
        self.text = text
        self.memo: dict[tuple[str, int], frozenset[int]] = {}

    def rule(self, name: str, pos: int) -> frozenset[int]:
        key = (name, pos)
        if key not in self.memo:
            ends: set[int] = set()
            for alternative in self.rules[name].alternatives:
                ends |= self.sequence(alternative, pos)
            self.memo[key] = frozenset(ends)
        return self.memo[key]

    def sequence(self, nodes: tuple[Node, ...], pos: int) -> set[int]:
        current = {pos}
        for node in nodes:
            current = {end for start in current for end in self.node(node, start)}
            if not current:
                break
        return current

    def node(self, node: Node, pos: int) -> set[int] | frozenset[int]:
        text = self.text
        if isinstance(node, Literal):
            return {pos + len(node.text)} if text.startswith(node.text, pos) else set()
        if isinstance(node, CharClass):
            return {pos + 1} if pos < len(text) and node.matches(text[pos]) else set()
        if isinstance(node, AnyChar):
            return {pos + 1} if pos < len(text) else set()
        if isinstance(node, RuleRef):
            return self.rule(node.name, pos)
        if isinstance(node, Group):
            return {end for alternative in node.alternatives for end in self.sequence(alternative, pos)}
        if isinstance(node, Repeat):
            return self.repeat(node, pos)
        assert isinstance(node, Token)
        raise GrammarError("the recogniser cannot check token references (<...>): they depend on a vocabulary")

    def repeat(self, node: Repeat, pos: int) -> set[int]:
        reached = {pos} if node.min == 0 else set()
        frontier, count = {pos}, 0
        while frontier and (node.max is None or count < node.max):
            following = {end for start in frontier for end in self.node(node.node, start)}
            count += 1
            if count < node.min:
                frontier = following
                continue
            fresh = following - reached
            reached |= following
            # Past the minimum only new positions can lead anywhere new.
            frontier = fresh if node.max is None or following == frontier else following
        return reached


def accepts(grammar: Grammar | str, text: str) -> bool:
    """True when the whole of ``text`` is in the language of ``grammar`` (GBNF source or a parsed Grammar)."""
    parsed = parse_gbnf(grammar) if isinstance(grammar, str) else grammar
    try:
        return len(text) in _Recogniser(parsed, text).rule(parsed.root, 0)
    except RecursionError:  # it recurses once per rule reference it follows
        raise GrammarError("the recogniser cannot check this text: its parse nests rules deeper than Python's "
                           f"recursion limit ({sys.getrecursionlimit()})") from None
