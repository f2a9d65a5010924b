"""Built-in grammars (package data ``builtin/*.gbnf``), usable by name wherever a grammar is accepted."""

from __future__ import annotations

import functools
from importlib import resources

from ..errors import GrammarError
from .gbnf import parse_gbnf

__all__ = ["BUILTIN_GRAMMARS", "builtin_grammar", "resolve_grammar", "checked_grammar"]

_FOLDER = resources.files(__package__) / "builtin"
BUILTIN_GRAMMARS: tuple[str, ...] = tuple(sorted(
    entry.name.removesuffix(".gbnf") for entry in _FOLDER.iterdir() if entry.name.endswith(".gbnf")
))


def builtin_grammar(name: str) -> str:
    """The GBNF source of a built-in grammar."""
    if name not in BUILTIN_GRAMMARS:
        raise GrammarError(f"Failed to initialize sampling: no built-in grammar '{name}' "
                           f"(built-in: {', '.join(BUILTIN_GRAMMARS)})")
    return (_FOLDER / f"{name}.gbnf").read_text(encoding="utf-8")


def resolve_grammar(value: str) -> str:
    """GBNF source as given, or a built-in grammar's source when ``value`` is its name."""
    if "::=" in value:
        return value
    if value.strip() in BUILTIN_GRAMMARS:
        return builtin_grammar(value.strip())
    raise GrammarError(f"Failed to initialize sampling: {value[:40]!r} is neither GBNF (it has no '::=') nor a "
                       f"built-in grammar name ({', '.join(BUILTIN_GRAMMARS)})")


@functools.lru_cache(maxsize=128)
def checked_grammar(value: str) -> str:
    """Resolve and check a grammar once per distinct value; GrammarError if it is bad."""
    source = resolve_grammar(value)
    parse_gbnf(source)
    return source
