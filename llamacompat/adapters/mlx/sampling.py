"""llama.rn's sampling settings as MLX operations, in llama.cpp's sampler-chain order.

llama.cpp: logit bias → penalties → grammar → top-n-sigma → top-k → top-p →
min-p → xtc → temperature → draw. The filters are mlx-lm's compiled
``apply_*`` functions; mlx-lm's ``make_sampler`` runs them in another order
(top-p before top-k) and its penalties see only a fixed window of the tokens
it was handed, so the chain and the processors are assembled here. Everything
stays lazy (no host sync), so a step's sampling runs in the same graph as the
model's forward pass.
"""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, cast

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, apply_xtc, categorical_sampling

from ..base import NoTokenAllowed, SamplingParams

__all__ = ["Sampling", "token_id"]

Logits = mx.array  # shape (1, n_vocab)


class Mask(Protocol):
    """A grammar's step (``grammar.GrammarMask``): the logits it allows, after ``token`` was sampled."""

    dead_end: NoTokenAllowed | None

    def __call__(self, logits: Logits, token: mx.array | None) -> Logits: ...


def token_id(token: mx.array) -> int:
    """The id a drawn token holds (an int32 scalar array; ``item``'s stub says any scalar). Waits for its step."""
    return cast(int, token.item())


class Sampling:
    """One completion's logits processing and token draw; ``process`` then ``sample`` at every step."""

    def __init__(self, s: SamplingParams, n_vocab: int, n_ctx: int, eog: Iterable[int], history: list[int],
                 grammar: Mask | None = None, key: mx.array | None = None) -> None:
        self._grammar = grammar
        # A request's own random stream (parallel mode: MLX's global one is shared by every row of the batch)
        self._key = key
        bias = dict(s.logit_bias)
        if s.ignore_eos:
            bias.update(dict.fromkeys(eog, -float("inf")))
        self._bias = None
        if bias:
            dense = mx.zeros((n_vocab,), dtype=mx.float32)
            self._bias = dense.at[mx.array(list(bias))].add(mx.array(list(bias.values()), dtype=mx.float32))
        self._penalised = s.penalty_repeat != 1.0 or s.penalty_freq != 0.0 or s.penalty_present != 0.0
        self._last_n = n_ctx if s.penalty_last_n == -1 else s.penalty_last_n
        # the prompt counts as history, as in llama.cpp's server
        self._window = mx.array(history[-self._last_n:] if self._last_n else [], dtype=mx.int32)
        self._s = s
        self._n_vocab = n_vocab
        self._draw = self._chain(s, n_vocab, self._split)

    def process(self, logits: Logits, token: mx.array | None) -> Logits:
        """Apply bias, penalties and grammar; ``token`` is the one just sampled (None after the prompt)."""
        if self._bias is not None:
            logits = logits + self._bias
        if self._penalised:
            logits = self._penalise(logits, token)
        if self._grammar is not None:
            logits = self._grammar(logits, token)
        return logits

    def sample(self, logits: Logits) -> mx.array:
        return self._draw(logits)

    def _split(self) -> mx.array | None:
        """The key for one draw: None (MLX's global random state) unless this request has its own stream."""
        if self._key is None:
            return None
        self._key, step = mx.random.split(self._key)
        return step

    def check(self) -> None:
        """Raise the grammar's ``NoTokenAllowed`` when the last processed step left nothing to draw."""
        if self._grammar is not None and self._grammar.dead_end is not None:
            raise self._grammar.dead_end

    def _penalise(self, logits: Logits, token: mx.array | None) -> Logits:
        s = self._s
        if token is not None and self._last_n:
            self._window = mx.concatenate([self._window, token.astype(mx.int32).reshape(-1)])[-self._last_n:]
        if self._window.size == 0:
            return logits
        counts = mx.zeros((self._n_vocab,), dtype=mx.float32).at[self._window].add(1.0)
        seen = counts > 0
        if s.penalty_repeat != 1.0:  # llama.cpp: shrink positive logits, grow negative ones
            repeated = mx.where(logits > 0, logits / s.penalty_repeat, logits * s.penalty_repeat)
            logits = mx.where(seen, repeated, logits)
        return logits - counts * s.penalty_freq - seen.astype(mx.float32) * s.penalty_present

    @staticmethod
    def _chain(s: SamplingParams, n_vocab: int, key: Callable[[], mx.array | None]) -> Callable[[Logits], mx.array]:
        if s.temperature <= 0:
            return lambda logits: mx.argmax(logits, axis=-1)
        filters: list[Callable[[mx.array], mx.array]] = []
        if s.top_n_sigma > 0:
            filters.append(lambda x: _top_n_sigma(x, s.top_n_sigma))
        if 0 < s.top_k < n_vocab:
            filters.append(lambda x: apply_top_k(x, s.top_k))
        if s.top_p < 1.0:
            filters.append(lambda x: apply_top_p(x, s.top_p))
        if s.min_p > 0.0:
            filters.append(lambda x: apply_min_p(x, s.min_p))
        if s.xtc_probability > 0.0 and s.xtc_threshold <= 0.5:  # above 0.5 llama.cpp's XTC never removes anything
            filters.append(lambda x: apply_xtc(x, s.xtc_probability, s.xtc_threshold, []))

        def draw(logits: Logits) -> mx.array:
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            for keep in filters:
                logprobs = keep(logprobs)
            step = key()
            if step is None:
                return categorical_sampling(logprobs, s.temperature)
            return mx.random.categorical(logprobs * (1 / s.temperature), key=step)

        return draw


def _top_n_sigma(logprobs: mx.array, n: float) -> mx.array:
    """Keep the tokens within ``n`` standard deviations of the best logit (finite logits only)."""
    finite = mx.isfinite(logprobs)
    count = mx.maximum(finite.sum(axis=-1, keepdims=True), 1)
    values = mx.where(finite, logprobs, 0.0)
    mean = values.sum(axis=-1, keepdims=True) / count
    std = mx.sqrt(mx.where(finite, (values - mean) ** 2, 0.0).sum(axis=-1, keepdims=True) / count)
    return mx.where(logprobs < logprobs.max(axis=-1, keepdims=True) - n * std, -float("inf"), logprobs)
