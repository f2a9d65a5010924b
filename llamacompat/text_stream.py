"""One sequence's text on its way to the caller: the per-sequence half of llama.rn's completion semantics.

``TextStream`` takes the text of each generated token (from the engine's token loop, or
from a server's stream in the openai core) and gives back llama.rn's ``TokenData``
events and, at the end, its ``CompletionResult``: stop strings held back while a
partial match may still complete, probabilities handed out with the event that
carries their text, the cumulative parse (``content``, ``reasoning_content``,
``tool_calls``) and ``accumulated_text`` on every event as llama.rn sends them, the
final text. It knows nothing of tokens or runtimes, so every producer of text (one per
slot, in parallel decoding) shares it. Stop matching looks at a tail no longer than the
longest stop string; the cumulative fields are, as in llama.rn, the whole text so far.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Iterable

from .types import CompletionProbability, CompletionResult, TokenCallback, TokenData

__all__ = ["Parse", "TextStream", "StopScanner", "find_stop", "completion_result", "stopped_before_prompt", "drain"]

#: (text so far, partial?) -> llama.rn's parsed fields: content / reasoning_content / tool_calls, each when non-empty
Parse = Callable[[str, bool], dict[str, Any]]


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
        self.stops, self.held = stops, ""
        self.word: str | None = None

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


class TextStream:
    """The text of one sequence: pieces in, TokenData events out, llama.rn's result at the end.

    ``push`` returns the event to send for a piece, or None while nothing can be sent yet
    (an incomplete UTF-8 character, text held back by a stop string). ``stopping_word`` is
    set once a stop string completed: the producer should stop. ``flush`` returns the
    held text as a last event when generation ends otherwise. ``prefill`` is text the reply
    was started with (llama.rn's ``prefill_text``): part of what is parsed and accumulated.
    """

    __slots__ = ("_scanner", "_n_probs", "_parse", "_parts", "_so_far", "_pending", "probabilities", "chat_format",
                 "stopping_word", "_prefill")

    def __init__(self, stop: tuple[str, ...] = (), n_probs: int = 0, parse: Parse | None = None,
                 chat_format: int = 0, prefill: str = "") -> None:
        self._scanner = StopScanner(stop) if stop else None
        self._n_probs, self._parse, self.chat_format = n_probs, parse, chat_format
        self._prefill = prefill
        self._parts: list[str] = []
        self._so_far = prefill  # the reply so far, prefill included: what is parsed and accumulated
        self._pending: list[CompletionProbability] = []  # probabilities whose text is not sent yet
        self.probabilities: list[CompletionProbability] = []
        self.stopping_word = ""

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def push(self, piece: str, probs: Iterable[CompletionProbability] = (), note: str | None = None) -> TokenData | None:
        """The event for ``piece`` (the text of the next token or chunk), or None if nothing can be sent yet.

        ``probs`` are the probabilities of the token(s) behind ``piece``. ``note`` forces an event without
        text of the reply (a server's reasoning or tool-call delta): its ``token`` is ``piece`` or ``note``.
        """
        if self._n_probs:
            self._pending.extend(probs)
        scanner = self._scanner
        if piece and scanner is not None:
            piece = scanner.feed(piece)
            if scanner.word is not None:
                self.stopping_word = scanner.word
        if not piece and note is None:
            return None
        return self._event(piece, note)

    def flush(self) -> TokenData | None:
        """The text still held back (generation ended without completing a stop string: it is real text)."""
        held = self._scanner.flush() if self._scanner is not None else ""
        return self._event(held, None) if held else None

    def _event(self, piece: str, note: str | None) -> TokenData:
        event: TokenData = {"token": piece or note or ""}
        if piece:
            self._parts.append(piece)
            self._so_far += piece
        if self._n_probs:
            event["completion_probabilities"] = self._pending
            self.probabilities.extend(self._pending)
            self._pending = []
        so_far = self._so_far
        # llama.rn sends cumulative parses, not deltas, on every event (each field when non-empty)
        if self._parse is not None:
            event.update(self._parse(so_far, True))  # type: ignore[typeddict-item]
        elif so_far:
            event["content"] = so_far
        if so_far:
            event["accumulated_text"] = so_far
        return event

    def result(self, *, n_predicted: int, n_evaluated: int, n_cached: int, cache_n: int, prompt_n: int,
               prompt_ms: float, predicted_ms: float, interrupted: bool, stopped_eos: bool, stopped_limit: bool,
               context_full: bool) -> CompletionResult:
        """llama.rn's NativeCompletionResult for this sequence (the counts and clocks are the producer's)."""
        word = self.stopping_word
        result = completion_result(
            self.text, self._parse, chat_format=self.chat_format, probabilities=self.probabilities,
            n_predicted=n_predicted, n_evaluated=n_evaluated, n_cached=n_cached, cache_n=cache_n, prompt_n=prompt_n,
            prompt_ms=prompt_ms, predicted_ms=predicted_ms, interrupted=interrupted,
            stopped_eos=stopped_eos and not word, stopped_word=bool(word), stopping_word=word,
            stopped_limit=stopped_limit and not word, context_full=context_full and not word, prefill=self._prefill)
        return result


def _per_token(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second), 0 where undefined."""
    return (ms / n if n else 0.0, n / ms * 1000.0 if ms > 0 else 0.0)


def completion_result(text: str, parse: Parse | None, *, chat_format: int,
                      probabilities: list[CompletionProbability], n_predicted: int, n_evaluated: int, n_cached: int,
                      cache_n: int, prompt_n: int, prompt_ms: float, predicted_ms: float, interrupted: bool,
                      stopped_eos: bool, stopped_word: bool, stopping_word: str, stopped_limit: bool,
                      context_full: bool, prefill: str = "") -> CompletionResult:
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
        reply = prefill + text
        if parse is not None:
            result.update(parse(reply, False))  # type: ignore[typeddict-item]
        elif reply:
            result["content"] = reply
        if reply:
            result["accumulated_text"] = reply
    return result


def stopped_before_prompt(n_cached: int) -> CompletionResult:
    """The result of a completion stopped before it had a prompt (while its chat template rendered)."""
    return TextStream().result(n_predicted=0, n_evaluated=0, n_cached=n_cached, cache_n=0, prompt_n=0, prompt_ms=0.0,
                               predicted_ms=0.0, interrupted=True, stopped_eos=False, stopped_limit=False,
                               context_full=False)


def drain(gen: Generator[TokenData, None, CompletionResult], callback: TokenCallback | None) -> CompletionResult:
    """Run a generation to its result, handing each event to ``callback``."""
    try:
        if callback is None:
            while True:
                next(gen)
        while True:
            callback(next(gen))
    except StopIteration as done:
        return done.value
    finally:
        gen.close()
