"""llguidance, the grammar engine of the backends that see their logits (llama_cpp, mlx).

One ``Guide`` constrains one completion: at each step it computes which tokens the grammar allows next
(one bit per token, in Rust, without the GIL), the adapter sets the others to -inf in its logits and samples
with its own native chain, and ``accept`` moves the grammar on. Where only one continuation is possible,
``forced`` names the tokens, so an adapter can evaluate them in one batch instead of sampling each.

A lazy grammar (llama.cpp's ``grammar_lazy``) lets the model write freely until a trigger appears in the
text (a word, a regex searched or matched in full, or a token id), then constrains from the trigger on: the
text from the trigger (a pattern's first group, if it has one) is fed to the grammar, which must accept it.

GBNF reaches llguidance as Lark written by our grammar package (``grammars.lark``); a grammar llguidance
still refuses is a ``GrammarError`` that says so.
"""

from __future__ import annotations

import codecs
import re
import time
from typing import Callable

import numpy as np

from ..errors import BackendUnavailableError, GrammarError, InvalidParamsError
from .lark import gbnf_to_lark
from .triggers import Trigger

try:
    import llguidance
except ImportError as err:  # pragma: no cover - the llama-cpp and mlx extras install it
    raise BackendUnavailableError("grammars need llguidance: pip install 'llamacompat[llama-cpp]'") from err

__all__ = ["Guide"]

def _compiled(table: "llguidance.LLTokenizer", gbnf: str) -> "llguidance.LLMatcher":
    lark = gbnf_to_lark(gbnf)  # GbnfError (a GrammarError) for invalid GBNF
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(lark)
        matcher = llguidance.LLMatcher(table, grammar, log_level=0)
    except ValueError as err:
        raise GrammarError(f"Failed to initialize sampling: the grammar engine (llguidance) cannot use this "
                           f"grammar: {err}") from None
    if matcher.is_error():
        raise GrammarError(f"Failed to initialize sampling: invalid grammar ({matcher.get_error()})")
    return matcher


class Guide:
    """One completion's grammar over one vocabulary of ``n_logits`` entries."""

    def __init__(self, table: "llguidance.LLTokenizer", gbnf: str, n_logits: int, *, lazy: bool = False,
                 triggers: tuple[Trigger, ...] = (), piece: Callable[[int], bytes] | None = None,
                 tokenize: Callable[[str], list[int]] | None = None) -> None:
        """``piece`` (a token's bytes) and ``tokenize`` (plain text to tokens, special tokens not parsed) are
        needed by a lazy grammar only."""
        if lazy and not triggers:
            raise InvalidParamsError("completion: 'grammar_lazy' needs 'grammar_triggers' (where the grammar starts)")
        started = time.perf_counter()
        self._matcher = _compiled(table, gbnf)
        #: figures for bench/bench_grammar.py: compile time, each mask's time, tokens evaluated as forced
        self.compile_ms = (time.perf_counter() - started) * 1000.0
        self.mask_times: list[float] = []
        self._ready = False  # the bit buffer holds the mask of the current position
        self.forced_tokens = 0
        self._bits = np.full((table.vocab_size + 31) // 32, -1, dtype=np.int32)
        self._allowed = np.zeros(n_logits, dtype=np.bool_)
        self.n_logits, self.n_vocab = n_logits, table.vocab_size
        self.active = not lazy
        self._triggers = triggers
        self._piece, self._tokenize = piece, tokenize
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._text = ""  # free text of a lazy grammar, until a trigger
        # Patterns look at the whole text (as llama.cpp's); words need only the tail that may begin one.
        patterns = any(t.kind in ("pattern", "pattern_full") for t in triggers)
        self._keep = None if patterns else max((len(t.value) - 1 for t in triggers if t.kind == "word"), default=0)

    # -- the mask ---------------------------------------------------------------------------------------------
    def compute(self) -> None:
        """Compute the next mask into the bit buffer. llguidance drops the GIL here, so an adapter may run this
        on another thread while the forward pass runs: it depends only on the tokens accepted so far."""
        if self.active and not self._ready:
            started, bits = time.perf_counter(), self._bits
            self._matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
            self.mask_times.append(time.perf_counter() - started)
            self._ready = True

    def allowed(self) -> np.ndarray:
        """A boolean mask over the logits of the tokens the grammar allows next (all, while a lazy grammar waits)."""
        if not self.active:
            self._allowed[:] = True
            return self._allowed
        self.compute()
        unpacked = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=min(self.n_vocab, self.n_logits))
        self._allowed[: unpacked.size] = unpacked
        self._allowed[unpacked.size:] = False  # logits past the tokenizer's vocabulary (padding) are never drawn
        return self._allowed

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """Set the logits of disallowed tokens to -inf, in place; returns the allowed mask."""
        allowed = self.allowed()
        if self.active:
            np.putmask(logits, ~allowed, -np.inf)
        return allowed

    def forced(self) -> list[int]:
        """The tokens the grammar forces from here (fast-forward), none while a lazy grammar waits."""
        return self._matcher.compute_ff_tokens() if self.active else []

    @property
    def stopped(self) -> bool:
        """The grammar can take nothing more than the end of generation."""
        return self.active and self._matcher.is_stopped()

    # -- moving on ----------------------------------------------------------------------------------------------
    def accept(self, token: int) -> None:
        """Move past ``token``; a lazy grammar looks for its triggers in the text so far."""
        self._ready = False
        if self.active:
            if not self._matcher.consume_token(token):
                raise GrammarError(f"the grammar refused token {token} ({self._matcher.get_error()})")
            return
        piece = self._decode(self._piece(token)) if self._piece is not None else ""
        self._text += piece
        piece_start = len(self._text) - len(piece)
        start = self._trigger_start(token, piece_start)
        if start is None:
            if self._keep is not None:  # word and token triggers only: a word's possible start is all to keep
                self._text = self._text[-self._keep:] if self._keep else ""
            return
        self.active = True
        constrained, self._text = self._text[start:], ""
        if start == piece_start and any(t.kind == "token" and t.token == token for t in self._triggers):
            tokens = [token]  # a token trigger is fed as itself (a special token's text is no grammar literal)
        else:  # the text is fed as plain text, special-token look-alikes included
            tokens = self._tokenize(constrained) if self._tokenize is not None and constrained else []
        if tokens and self._matcher.try_consume_tokens(tokens) != len(tokens):
            raise GrammarError(f"the lazy grammar does not accept the text from its trigger on: {constrained!r}")

    def _trigger_start(self, token: int, piece_start: int) -> int | None:
        """Where in the free text the grammar starts, once a trigger has appeared; None before."""
        best: int | None = None
        for trigger in self._triggers:
            at: int | None = None
            if trigger.kind == "token":
                at = piece_start if token == trigger.token else None  # the trigger token's own text is constrained
            elif trigger.kind == "word":
                found = self._text.find(trigger.value)
                at = found if found >= 0 else None
            else:
                match = (re.search if trigger.kind == "pattern" else re.fullmatch)(trigger.value, self._text)
                at = (match.start(1) if match.lastindex else match.start()) if match else None
            if at is not None and (best is None or at < best):
                best = at
        return best
