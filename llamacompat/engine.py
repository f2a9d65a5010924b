"""The token loop: an adapter's tokens in, one ``TextStream``'s events and result out.

Adapters produce tokens; ``generate`` runs one completion on one adapter: the
prompt, ``n_predict``, interruption, context limits, grammar dead ends and
timings, and the token-to-text step (``TokenText``: incremental UTF-8 decoding
of the new token only, and its probabilities). What happens to the text (stop
strings, probabilities, parses, the result) is the sequence's ``TextStream``
(``llamacompat.text_stream``), which the openai core feeds too.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass
from typing import Generator

from .adapters.base import Adapter, Interrupted, NoTokenAllowed, SamplingParams
from .errors import ContextFullError, GrammarError
from .text_stream import Parse, TextStream
from .types import CompletionProbability, CompletionResult, TokenData

__all__ = ["CompletionRequest", "ThinkingBudget", "TokenText", "generate"]


@dataclass(frozen=True)
class ThinkingBudget:
    """llama.cpp's reasoning budget, as token sequences: after ``budget`` tokens inside a thinking block
    (opened by ``start``, or at once when ``open``), ``forced`` (the budget message and the end tag) is
    generated instead of what the model would write; ``end`` written by the model closes the block first."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    forced: tuple[int, ...]
    budget: int
    open: bool = False


class _Budget:
    """One completion's walk through a ``ThinkingBudget``: outside a block, counting inside one, forcing."""

    __slots__ = ("_spec", "_recent", "_state", "_left", "_at")

    def __init__(self, spec: ThinkingBudget) -> None:
        self._spec, self._at = spec, 0
        self._recent: list[int] = []
        self._state, self._left = ("counting", spec.budget) if spec.open else ("outside", 0)
        if self._state == "counting" and self._left <= 0:
            self._state = "forcing"

    def forced(self) -> int | None:
        """The token to force next, or None to let the model draw."""
        return self._spec.forced[self._at] if self._state == "forcing" else None

    def accept(self, token: int, complete: bool) -> None:
        """``token`` was generated; ``complete``: the text so far ends on a whole UTF-8 character."""
        spec, state = self._spec, self._state
        self._recent.append(token)
        del self._recent[: -max(len(spec.start), len(spec.end), 1)]  # the longest tag is all a match needs
        if state == "forcing":
            self._at += 1
            if self._at == len(spec.forced):
                self._state, self._at = "outside", 0
                self._recent.clear()
        elif state == "outside":
            if spec.start and self._ends_with(spec.start):  # a new block (some models think more than once)
                self._state, self._left = "counting", spec.budget
                self._recent.clear()
                if self._left <= 0:
                    self._state = "forcing"
        elif self._ends_with(spec.end):  # the model closed the block itself
            self._state = "outside"
            self._recent.clear()
        else:
            self._left -= 1
            if self._left <= 0 and complete:  # never cut a character in two
                self._state = "forcing"

    def _ends_with(self, seq: tuple[int, ...]) -> bool:
        return len(self._recent) >= len(seq) and tuple(self._recent[-len(seq):]) == seq


@dataclass(frozen=True)
class CompletionRequest:
    prompt_tokens: list[int]
    sampling: SamplingParams
    n_predict: int = -1
    stop: tuple[str, ...] = ()
    n_probs: int = 0
    parse: Parse | None = None  # None: the text is the content
    chat_format: int = 0
    prefill: str = ""  # llama.rn's prefill_text: the reply began with it
    thinking_budget: ThinkingBudget | None = None

    def text_stream(self) -> TextStream:
        return TextStream(self.stop, self.n_probs, self.parse, self.chat_format, self.prefill)


class TokenText:
    """The token-to-text step of one sequence: each token's text, a UTF-8 character split over
    tokens waiting for its last byte; and the probabilities at its position."""

    __slots__ = ("_adapter", "_decoder", "_decode")

    def __init__(self, adapter: Adapter) -> None:
        self._adapter = adapter
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._decode = self._decoder.decode

    def piece(self, token: int) -> str:
        return self._decode(self._adapter.token_to_piece(token))

    @property
    def complete(self) -> bool:
        """Whether the text so far ends on a whole character (no byte of a split one is waiting)."""
        return not self._decoder.getstate()[0]

    def probabilities(self, piece: str, n_probs: int) -> CompletionProbability:
        """The model's top-``n_probs`` distribution at this position (softmax of the raw logits)."""
        adapter = self._adapter
        return {
            "content": piece,
            "probs": [
                {"tok_str": adapter.token_to_piece(token).decode("utf-8", "replace"), "prob": prob}
                for token, prob in adapter.top_probs(n_probs)
            ],
        }


def generate(adapter: Adapter, request: CompletionRequest, stop_event: threading.Event) -> Generator[TokenData, None, CompletionResult]:
    """Run one completion; yields TokenData events and returns the result."""
    n_prompt = len(request.prompt_tokens)
    if n_prompt >= adapter.n_ctx:
        raise ContextFullError(
            f"Context is full: the prompt has {n_prompt} tokens and n_ctx is {adapter.n_ctx}; "
            "shorten the prompt or create the context with a larger n_ctx"
        )
    started = time.perf_counter()
    interrupted = stopped_eos = context_full = False
    n_generated = 0
    stream = request.text_stream()
    cache_n = prompt_n = 0
    prompt_done = started
    try:
        try:
            cache_n = adapter.begin(request.prompt_tokens, request.sampling, stop_event)
        except Interrupted as stop:
            interrupted, cache_n = True, stop.cache_n
        prompt_done = time.perf_counter()
        prompt_n = adapter.n_past - cache_n  # tokens actually evaluated (fewer when interrupted)

        text = TokenText(adapter)
        n_probs, n_ctx = request.n_probs, adapter.n_ctx
        limit = request.n_predict if request.n_predict >= 0 else float("inf")
        next_token, is_eog, push = adapter.next_token, adapter.is_eog, stream.push
        budget = _Budget(request.thinking_budget) if request.thinking_budget is not None else None
        while not interrupted and n_generated < limit:
            if stop_event.is_set():
                interrupted = True
                break
            if n_prompt + n_generated > n_ctx:  # evaluating the last token would overflow
                context_full = True
                break
            try:
                forced = budget.forced() if budget is not None else None
                token = next_token() if forced is None else adapter.force_token(forced)
            except Interrupted:
                interrupted = True
                break
            except NoTokenAllowed as dead_end:
                # The one place a grammar's dead end is decided, for every backend: a complete grammar ends the
                # text as an end-of-generation token would (ignore_eos cannot extend it); anything else is an error.
                if dead_end.grammar_complete:
                    stopped_eos = True
                    break
                raise GrammarError(f"Failed to sample: no token may follow the {n_generated} generated "
                                   f"({stream.text[-40:]!r}): {dead_end.reason}") from None
            n_generated += 1
            if is_eog(token):
                stopped_eos = True
                break
            piece = text.piece(token)
            if budget is not None:
                budget.accept(token, text.complete)
            event = push(piece, (text.probabilities(piece, n_probs),) if n_probs else ())
            if event is not None:
                yield event
            if stream.stopping_word:
                break
        last = stream.flush()
        if last is not None:
            yield last
    finally:
        adapter.end()

    finished = time.perf_counter()
    prompt_ms, predicted_ms = (prompt_done - started) * 1000.0, (finished - prompt_done) * 1000.0
    measured = adapter.runtime_timings()
    if measured is not None:
        prompt_ms, predicted_ms = measured
    return stream.result(
        n_predicted=n_generated, n_evaluated=n_prompt, n_cached=adapter.n_past, cache_n=cache_n, prompt_n=prompt_n,
        prompt_ms=prompt_ms, predicted_ms=predicted_ms, interrupted=interrupted, stopped_eos=stopped_eos,
        stopped_limit=not (interrupted or stopped_eos or context_full) and n_generated >= limit,
        context_full=context_full,
    )
