"""Lazy-grammar triggers (llama.rn's ``grammar_triggers``): where a lazy grammar starts constraining.

Kept apart from the grammar engine so every backend validates them the same way, llguidance or not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParamsError

__all__ = ["Trigger", "parse_triggers", "TRIGGER_TYPES"]

# llama.cpp's common_grammar_trigger_type, which llama.rn passes through as numbers.
TRIGGER_TYPES = {0: "token", 1: "word", 2: "pattern", 3: "pattern_full"}
_NUMBERS = {name: number for number, name in TRIGGER_TYPES.items()}


@dataclass(frozen=True)
class Trigger:
    """One trigger: a token id, a word, a regex searched in the text, or a regex the whole text must match.

    A pattern's first group, when it has one, is where the constrained text starts (llama.cpp's rule).
    """

    kind: str
    value: str = ""
    token: int = -1

    def as_dict(self) -> dict[str, Any]:
        """llama.rn's shape: ``{type, value, token}`` with llama.cpp's type number."""
        return {"type": _NUMBERS[self.kind], "value": self.value, "token": self.token}


def parse_triggers(value: Any, n_vocab: int) -> tuple[Trigger, ...]:
    """llama.rn's ``grammar_triggers``: ``[{type, value, token}]``, ``type`` a llama.cpp number or a name."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidParamsError(f"completion: 'grammar_triggers' must be a list of {{type, value}} objects, got {value!r}")
    out = []
    for i, entry in enumerate(value):
        where = f"completion: grammar_triggers[{i}]"
        if isinstance(entry, Trigger):
            out.append(entry)
            continue
        if not isinstance(entry, dict):
            raise InvalidParamsError(f"{where} must be an object with 'type' and 'value', got {entry!r}")
        kind = entry.get("type")
        kind = TRIGGER_TYPES.get(kind, kind) if isinstance(kind, int) and not isinstance(kind, bool) else kind
        if kind not in _NUMBERS:
            raise InvalidParamsError(f"{where}: 'type' must be 0 (token), 1 (word), 2 (pattern) or 3 (pattern_full), "
                                     f"or one of those names, got {entry.get('type')!r}")
        text = entry.get("value", "")
        if not isinstance(text, str) or (kind != "token" and not text):
            raise InvalidParamsError(f"{where}: 'value' must be a non-empty string, got {text!r}")
        token = entry.get("token", -1)
        if kind == "token" and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < n_vocab):
            raise InvalidParamsError(f"{where}: a token trigger needs 'token', a token id (0..{n_vocab - 1}), got {token!r}")
        if kind in ("pattern", "pattern_full"):
            try:
                re.compile(text)
            except re.error as err:
                raise InvalidParamsError(f"{where}: 'value' is not a valid regular expression ({err})") from None
        out.append(Trigger(kind, text, token if kind == "token" else -1))
    return tuple(out)
