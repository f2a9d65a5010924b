"""GBNF grammars on MLX: llguidance computes the allowed-token mask, ``mx.where`` applies it.

llguidance's MLX kernel is Metal-only, so the mask is filled with its numpy API
on the CPU. The mask for a step depends only on the tokens before it, so it is
computed while MLX evaluates that step's forward pass (``mx.async_eval`` first).
GBNF reaches llguidance as Lark written by our grammar package
(``grammars.lark``); a grammar that llguidance still refuses is a ``GrammarError``
that says so.
"""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx
import numpy as np

from ...errors import BackendUnavailableError, GrammarError
from ...grammars.lark import gbnf_to_lark
from ...vocab import Vocab
from ..base import NoTokenAllowed

try:
    import llguidance
    import llguidance.numpy as llg_numpy
except ImportError as err:  # pragma: no cover - the mlx extra installs it
    raise BackendUnavailableError("the mlx backend needs llguidance for grammars: pip install 'llamacompat[mlx]'") from err

__all__ = ["GrammarMask", "token_table"]


def token_table(vocab: Vocab, eog: Iterable[int]) -> "llguidance.LLTokenizer":
    """llguidance's view of the vocabulary (about a second to build: make it once per model)."""
    return llguidance.LLTokenizer(vocab.tokenizer.to_str(), n_vocab=vocab.size, eos_token=sorted(eog))


class GrammarMask:
    """A logits processor that lets through only the tokens the grammar allows next.

    When no allowed token is left once the ``banned`` ones (bias -inf, ignore_eos) are taken out, the mask
    cannot be applied: ``dead_end`` then says why, for the adapter to raise before that step's draw is used.
    """

    def __init__(self, table: "llguidance.LLTokenizer", gbnf: str, n_logits: int, banned: Iterable[int] = (),
                 eog: Iterable[int] = ()) -> None:
        lark = gbnf_to_lark(gbnf)  # GbnfError (a GrammarError) for invalid GBNF
        try:
            grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        except ValueError as err:
            raise GrammarError(f"Failed to initialize sampling: the mlx backend's grammar engine (llguidance) "
                               f"cannot use this grammar: {err}") from None
        self._matcher = llguidance.LLMatcher(table, grammar)
        if self._matcher.is_error():
            raise GrammarError(f"Failed to initialize sampling: invalid grammar ({self._matcher.get_error()})")
        self._bits = llg_numpy.allocate_token_bitmask(1, table.vocab_size)
        self._n_logits = n_logits
        self._usable: np.ndarray | None = None
        banned = list(banned)
        if banned:
            self._usable = np.ones(n_logits, dtype=np.bool_)
            self._usable[banned] = False
        self._eog = np.zeros(n_logits, dtype=np.bool_)
        self._eog[list(eog)] = True
        self.dead_end: NoTokenAllowed | None = None

    def __call__(self, logits: mx.array, token: mx.array | None) -> mx.array:
        mx.async_eval(logits)  # the forward pass runs while the mask is computed
        if token is not None:
            self._matcher.consume_token(int(token.item()))
        llg_numpy.fill_next_token_bitmask(self._matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        allowed = np.pad(allowed, (0, max(0, self._n_logits - allowed.size)))[: self._n_logits].astype(np.bool_)
        if not (allowed if self._usable is None else allowed & self._usable).any():
            self.dead_end = NoTokenAllowed.judge(allowed, self._eog)
        return mx.where(mx.array(allowed), logits, -float("inf"))
