"""Grammars: GBNF parsing and checking, JSON Schema to GBNF, a recogniser, and the built-in grammars."""

from .builtin import BUILTIN_GRAMMARS, builtin_grammar, resolve_grammar
from .gbnf import GbnfError, Grammar, parse_gbnf
from .recognise import accepts
from .schema import SchemaError, convert_json_schema_to_grammar

__all__ = ["GbnfError", "Grammar", "parse_gbnf", "BUILTIN_GRAMMARS", "builtin_grammar", "resolve_grammar",
           "accepts", "SchemaError", "convert_json_schema_to_grammar"]
