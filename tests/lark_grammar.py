"""A third judge for grammars: llguidance (the mlx backend's engine) running our GBNF → Lark translation."""

from __future__ import annotations

import functools

import llguidance
import mlx.core as mx

from llamacompat.adapters.mlx.grammar import token_table
from llamacompat.grammars.lark import gbnf_to_lark
from llamacompat.models import default_model_path
from llamacompat.vocab import Vocab, vocab_from_gguf


@functools.lru_cache(maxsize=1)
def _vocab() -> tuple[Vocab, "llguidance.LLTokenizer"]:
    path = default_model_path()
    _tensors, meta = mx.load(path, return_metadata=True)
    vocab = vocab_from_gguf(meta, path)
    return vocab, token_table(vocab, vocab.eog)


@functools.lru_cache(maxsize=64)
def _compiled(gbnf: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(gbnf))


def lark_accepts(gbnf: str, text: str) -> bool:
    """True when llguidance, given our Lark for ``gbnf``, takes the tokens of ``text`` and may stop there."""
    vocab, table = _vocab()
    matcher = llguidance.LLMatcher(table, _compiled(gbnf))
    assert not matcher.is_error(), matcher.get_error()
    tokens = vocab.encode(text, False)
    return matcher.validate_tokens(tokens) == len(tokens) and matcher.consume_tokens(tokens) and matcher.is_accepting()
