"""Grammars: GBNF parsing and checking, and the built-in grammars shipped as package data."""

from .builtin import BUILTIN_GRAMMARS, builtin_grammar, resolve_grammar
from .gbnf import GbnfError, Grammar, parse_gbnf

__all__ = ["GbnfError", "Grammar", "parse_gbnf", "BUILTIN_GRAMMARS", "builtin_grammar", "resolve_grammar"]
