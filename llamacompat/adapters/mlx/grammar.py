"""GBNF grammars on MLX: a ``Guide`` (llguidance) computes the allowed-token mask, ``mx.where`` applies it.

llguidance's MLX kernel is Metal-only, so the mask is filled on the CPU. The mask for a step depends only on
the tokens before it, so it is computed while MLX evaluates that step's forward pass (``mx.async_eval``
first). Forced tokens are not skipped ahead here: the decode loop keeps one step queued, which already hides
the mask's cost.
"""

from __future__ import annotations

from typing import Iterable

import mlx.core as mx
import numpy as np

from ...errors import BackendUnavailableError
from ...grammars.guidance import Guide
from ...vocab import Vocab
from ..base import NoTokenAllowed
from .sampling import token_id

try:
    import llguidance
except ImportError as err:  # pragma: no cover - the mlx extra installs it
    raise BackendUnavailableError("the mlx backend needs llguidance for grammars: pip install 'llamacompat[mlx]'") from err

__all__ = ["GrammarMask", "token_table"]


def token_table(vocab: Vocab, eog: Iterable[int]) -> "llguidance.LLTokenizer":
    """llguidance's view of the vocabulary (about a second to build: make it once per model)."""
    return llguidance.LLTokenizer(vocab.tokenizer.to_str(), n_vocab=vocab.size, eos_token=sorted(eog))


class GrammarMask:
    """A logits processor that lets through only the tokens the grammar (a ``Guide``) allows next.

    When no allowed token is left once the ``banned`` ones (bias -inf, ignore_eos) are taken out, the mask
    cannot be applied: ``dead_end`` then says why, for the adapter to raise before that step's draw is used.
    """

    def __init__(self, guide: Guide, n_logits: int, banned: Iterable[int] = (), eog: Iterable[int] = ()) -> None:
        self.guide = guide
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
        guide = self.guide
        if token is not None:
            guide.accept(token_id(token))
        allowed = guide.allowed()
        if not (allowed if self._usable is None else allowed & self._usable).any():
            self.dead_end = NoTokenAllowed.judge(allowed, self._eog)
        if not guide.active:  # a lazy grammar before its trigger
            return logits
        return mx.where(mx.array(allowed), logits, -float("inf"))
