"""llama.cpp's own grammar engine, reached through llama-cpp-python: the reference our GBNF must satisfy."""

from __future__ import annotations

import ctypes
import math

import llama_cpp as lc

from llamacompat import LlamaContext


def _vocab(ctx: LlamaContext):
    return ctx._core.adapter._vocab  # the adapter's llama_vocab pointer


def native_parses(ctx: LlamaContext, grammar: str) -> bool:
    """True when llama.cpp's grammar parser accepts ``grammar``. Some invalid grammars crash
    llama-cpp-python (backends.md): pass only grammars parse_gbnf accepts or known not to crash it."""
    sampler = lc.llama_sampler_init_grammar(_vocab(ctx), grammar.encode("utf-8"), b"root")
    if not sampler:
        return False
    lc.llama_sampler_free(sampler)
    return True


def tokenizable(ctx: LlamaContext, text: str) -> bool:
    """Whether the model's tokenizer can write ``text`` at all (SmolLM2's has no token for some bytes, e.g. 0xF1)."""
    return ctx.detokenize(ctx._core.adapter.tokenize(text, False)) == text


def native_accepts(ctx: LlamaContext, grammar: str, text: str) -> bool:
    """True when llama.cpp's grammar sampler lets the tokens of ``text``, then end-of-generation, through."""
    assert tokenizable(ctx, text), f"the tokenizer cannot write {text!r}"
    vocab = _vocab(ctx)
    sampler = lc.llama_sampler_init_grammar(vocab, grammar.encode("utf-8"), b"root")
    assert sampler, "llama.cpp rejected the grammar"
    try:
        tokens = ctx._core.adapter.tokenize(text, False) + [lc.llama_vocab_eos(vocab)]
        for index, token in enumerate(tokens):
            candidate = (lc.llama_token_data * 1)(lc.llama_token_data(token, 0.0, 0.0))
            array = lc.llama_token_data_array(candidate, 1, -1, False)
            lc.llama_sampler_apply(sampler, ctypes.byref(array))
            if math.isinf(candidate[0].logit):
                return False
            if index < len(tokens) - 1:
                lc.llama_sampler_accept(sampler, token)
        return True
    finally:
        lc.llama_sampler_free(sampler)
