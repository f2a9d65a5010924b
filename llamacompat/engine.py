"""The generation loop: the one place where llama.rn's completion semantics live.

Adapters produce tokens; this module turns them into streamed ``TokenData`` and
the final ``CompletionResult``: stop strings (held back while a partial match
may still complete), ``n_predict``, interruption, context limits, probabilities
and timings. Per-token work is O(1) in the output length: incremental UTF-8
decoding of the new token only, and stop matching over a tail no longer than the
longest stop string.
"""

from __future__ import annotations

import codecs
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator

from .adapters.base import Adapter, Interrupted, NoTokenAllowed, SamplingParams
from .errors import ContextFullError, GrammarError
from .types import CompletionProbability, CompletionResult, TokenData

__all__ = ["CompletionRequest", "generate", "find_stop", "StopScanner", "completion_result", "stopped_before_prompt"]


@dataclass(frozen=True)
class CompletionRequest:
    prompt_tokens: list[int]
    sampling: SamplingParams
    n_predict: int = -1
    stop: tuple[str, ...] = ()
    n_probs: int = 0
    # (text so far, partial?) -> content / reasoning_content / tool_calls; None: the text is the content.
    parse: Callable[[str, bool], dict[str, Any]] | None = None
    chat_format: int = 0


def find_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str | None, int]:
    """Scan ``text`` for stop strings.

    Returns ``(cut, word, hold)``: with a full match, ``cut`` is where the
    earliest stop string starts and ``word`` is that string; otherwise ``word``
    is None and the last ``hold`` characters are a prefix of some stop string,
    to be held back until the next token decides.
    """
    cut, word = -1, None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and (cut == -1 or at < cut):
            cut, word = at, stop
    if word is not None:
        return cut, word, 0
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:size]):
                hold = size
                break
    return len(text), None, hold


class StopScanner:
    """Feeds streamed text through ``find_stop``: holds back what may begin a stop string.

    ``feed`` returns the text that is safe to emit; once a stop string is complete,
    ``word`` is set and the text from it on is dropped. ``flush`` gives back what is
    still held when generation ends without completing a stop string.
    """

    __slots__ = ("stops", "held", "word")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops, self.held, self.word = stops, "", None

    def feed(self, piece: str) -> str:
        text = self.held + piece
        cut, word, hold = find_stop(text, self.stops)
        if word is not None:
            self.held, self.word = "", word
            return text[:cut]
        self.held = text[cut - hold:]
        return text[: cut - hold]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def _per_token(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second), 0 where undefined."""
    return (ms / n if n else 0.0, n / ms * 1000.0 if ms > 0 else 0.0)


def generate(adapter: Adapter, request: CompletionRequest, stop_event: threading.Event) -> Generator[TokenData, None, CompletionResult]:
    """Run one completion; yields TokenData events and returns the result."""
    n_prompt = len(request.prompt_tokens)
    if n_prompt >= adapter.n_ctx:
        raise ContextFullError(
            f"Context is full: the prompt has {n_prompt} tokens and n_ctx is {adapter.n_ctx}; "
            "shorten the prompt or create the context with a larger n_ctx"
        )
    started = time.perf_counter()
    interrupted = stopped_eos = stopped_word = context_full = False
    stopping_word = ""
    n_generated = 0
    parts: list[str] = []
    all_probs: list[CompletionProbability] = []
    cache_n = prompt_n = 0
    prompt_done = started
    try:
        try:
            cache_n = adapter.begin(request.prompt_tokens, request.sampling, stop_event)
        except Interrupted as stop:
            interrupted, cache_n = True, stop.cache_n
        prompt_done = time.perf_counter()
        prompt_n = adapter.n_past - cache_n  # tokens actually evaluated (fewer when interrupted)

        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        n_probs, n_ctx = request.n_probs, adapter.n_ctx
        limit = request.n_predict if request.n_predict >= 0 else float("inf")
        scanner = StopScanner(request.stop) if request.stop else None
        so_far = ""
        parse = request.parse
        pending_probs: list[CompletionProbability] = []
        next_token, token_to_piece, is_eog = adapter.next_token, adapter.token_to_piece, adapter.is_eog
        while not interrupted and n_generated < limit:
            if stop_event.is_set():
                interrupted = True
                break
            if n_prompt + n_generated > n_ctx:  # evaluating the last token would overflow
                context_full = True
                break
            try:
                token = next_token()
            except Interrupted:
                interrupted = True
                break
            except NoTokenAllowed as dead_end:
                # The one place a grammar's dead end is decided, for every backend: a complete grammar ends the
                # text as an end-of-generation token would (ignore_eos cannot extend it); anything else is an error.
                if dead_end.grammar_complete:
                    stopped_eos = True
                    break
                so_far_text = "".join(parts)
                raise GrammarError(f"Failed to sample: no token may follow the {n_generated} generated "
                                   f"({so_far_text[-40:]!r}): {dead_end.reason}") from None
            n_generated += 1
            if is_eog(token):
                stopped_eos = True
                break
            piece = decode(token_to_piece(token))
            if n_probs:
                pending_probs.append(_probabilities(adapter, piece, n_probs))
            if not piece:  # an incomplete UTF-8 character: wait for its next byte
                continue
            if scanner is not None:
                piece = scanner.feed(piece)
                if scanner.word is not None:
                    stopped_word, stopping_word = True, scanner.word
            if piece:
                parts.append(piece)
                event: TokenData = {"token": piece}
                if n_probs:
                    event["completion_probabilities"] = pending_probs
                    all_probs.extend(pending_probs)
                    pending_probs = []
                if parse is not None:  # llama.rn streams cumulative parses, not deltas
                    so_far += piece
                    event.update(parse(so_far, True))  # type: ignore[typeddict-item]
                yield event
            if stopped_word:
                break
        held = scanner.flush() if scanner is not None else ""
        if held:  # generation ended without completing the stop string: the text is real
            parts.append(held)
            event = {"token": held}
            if n_probs:
                event["completion_probabilities"] = pending_probs
                all_probs.extend(pending_probs)
            if parse is not None:
                event.update(parse(so_far + held, True))  # type: ignore[typeddict-item]
            yield event
    finally:
        adapter.end()

    finished = time.perf_counter()
    prompt_ms, predicted_ms = (prompt_done - started) * 1000.0, (finished - prompt_done) * 1000.0
    measured = adapter.runtime_timings()
    if measured is not None:
        prompt_ms, predicted_ms = measured
    return completion_result(
        "".join(parts), request.parse, chat_format=request.chat_format, probabilities=all_probs,
        n_predicted=n_generated, n_evaluated=n_prompt, n_cached=adapter.n_past, cache_n=cache_n, prompt_n=prompt_n,
        prompt_ms=prompt_ms, predicted_ms=predicted_ms,
        interrupted=interrupted, stopped_eos=stopped_eos, stopped_word=stopped_word, stopping_word=stopping_word,
        stopped_limit=not (interrupted or stopped_eos or stopped_word or context_full) and n_generated >= limit,
        context_full=context_full,
    )


def completion_result(text: str, parse: Callable[[str, bool], dict[str, Any]] | None, *, chat_format: int,
                      probabilities: list[CompletionProbability], n_predicted: int, n_evaluated: int, n_cached: int,
                      cache_n: int, prompt_n: int, prompt_ms: float, predicted_ms: float, interrupted: bool,
                      stopped_eos: bool, stopped_word: bool, stopping_word: str, stopped_limit: bool,
                      context_full: bool) -> CompletionResult:
    """llama.rn's NativeCompletionResult (every backend and core builds it here)."""
    prompt_per_token_ms, prompt_per_second = _per_token(prompt_n, prompt_ms)
    predicted_per_token_ms, predicted_per_second = _per_token(n_predicted, predicted_ms)
    result: CompletionResult = {
        "text": text,
        "chat_format": chat_format,
        "completion_probabilities": probabilities,
        "tokens_predicted": n_predicted,
        "tokens_evaluated": n_evaluated,
        "tokens_cached": n_cached,
        "draft_tokens": 0,
        "draft_tokens_accepted": 0,
        "truncated": False,
        "context_full": context_full,
        "interrupted": interrupted,
        "stopped_eos": stopped_eos,
        "stopped_word": stopped_word,
        "stopped_limit": stopped_limit,
        "stopping_word": stopping_word,
        "timings": {
            "cache_n": cache_n,
            "prompt_n": prompt_n,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_per_token_ms,
            "prompt_per_second": prompt_per_second,
            "predicted_n": n_predicted,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_per_token_ms,
            "predicted_per_second": predicted_per_second,
        },
    }
    if not interrupted:  # llama.rn: parsed fields only when non-empty, never when interrupted
        if parse is not None:
            result.update(parse(text, False))  # type: ignore[typeddict-item]
        elif text:
            result["content"] = text
    return result


def stopped_before_prompt(n_cached: int) -> CompletionResult:
    """The result of a completion stopped before it had a prompt (while its chat template rendered)."""
    return completion_result(
        "", None, chat_format=0, probabilities=[], n_predicted=0, n_evaluated=0, n_cached=n_cached, cache_n=0,
        prompt_n=0, prompt_ms=0.0, predicted_ms=0.0, interrupted=True, stopped_eos=False, stopped_word=False,
        stopping_word="", stopped_limit=False, context_full=False,
    )


def _probabilities(adapter: Adapter, piece: str, n_probs: int) -> CompletionProbability:
    """The model's top-``n_probs`` distribution at this position (softmax of the raw logits)."""
    return {
        "content": piece,
        "probs": [
            {"tok_str": adapter.token_to_piece(token).decode("utf-8", "replace"), "prob": prob}
            for token, prob in adapter.top_probs(n_probs)
        ],
    }
