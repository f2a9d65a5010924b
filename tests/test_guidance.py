"""The llguidance guide on the packaged model's vocabulary: masks, forced tokens, lazy triggers."""

from __future__ import annotations

import numpy as np
import pytest

from llamacompat.errors import GrammarError, InvalidParamsError
from llamacompat.grammars.guidance import Guide
from llamacompat.grammars.triggers import Trigger, parse_triggers


@pytest.fixture
def vocab(ctx):
    adapter = ctx._core.adapter
    return adapter, adapter.grammar_table()


def _guide(vocab, gbnf: str, **kwargs) -> Guide:
    adapter, table = vocab
    return Guide(table, gbnf, adapter.n_vocab, piece=adapter.token_to_piece,
                 tokenize=lambda text: adapter.tokenize(text, False), **kwargs)


def test_the_mask_allows_exactly_the_grammars_next_tokens(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "yes" | "no"')
    logits = np.zeros(adapter.n_vocab, dtype=np.float32)
    allowed = guide.apply(logits)
    allowed_pieces = {adapter.token_to_piece(int(t)) for t in np.flatnonzero(allowed)}
    assert allowed_pieces and all(b"yes".startswith(p) or b"no".startswith(p) for p in allowed_pieces)
    assert np.isneginf(logits[~allowed]).all() and (logits[allowed] == 0).all()
    for token in adapter.tokenize("yes", False):
        guide.accept(token)
    assert guide.stopped  # only the end of generation may follow


def test_forced_tokens_are_the_only_continuation(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "{\\"name\\": \\"" [a-z]+ "\\"}"')
    forced = guide.forced()
    assert adapter.detokenize(forced) == '{"name": "'


def test_a_token_the_grammar_refuses_is_an_error(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "yes"')
    with pytest.raises(GrammarError, match="refused token"):
        guide.accept(adapter.tokenize("no", False)[0])


def test_a_lazy_grammar_waits_for_its_word_then_constrains_from_it(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "<call>" [a-z]+', lazy=True, triggers=(Trigger("word", "<call>"),))
    for token in adapter.tokenize("Sure, I will <ca", False):
        assert guide.allowed().all()  # free text
        guide.accept(token)
    for token in adapter.tokenize("ll>", False):
        guide.accept(token)
    assert guide.active
    allowed = guide.allowed()
    assert 0 < allowed.sum() < adapter.n_vocab
    assert all(adapter.token_to_piece(int(t))[:1].isalpha() for t in np.flatnonzero(allowed) if not adapter.is_eog(int(t)))


def test_a_lazy_pattern_starts_at_its_first_group(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "{" [^}]* "}"', lazy=True, triggers=(Trigger("pattern", r"call: *(\{)"),))
    for token in adapter.tokenize("ok call: {", False):
        guide.accept(token)
    assert guide.active  # the grammar was fed '{' and now wants the rest of the object
    assert not guide.stopped


def test_a_lazy_token_trigger(vocab):
    adapter, _ = vocab
    trigger = adapter.tokenize("<|im_start|>", False)
    assert len(trigger) == 1
    guide = _guide(vocab, f'root ::= <[{trigger[0]}]> "x"', lazy=True, triggers=(Trigger("token", token=trigger[0]),))
    for token in adapter.tokenize("words", False):
        guide.accept(token)
    assert not guide.active
    guide.accept(trigger[0])
    assert guide.active


def test_text_the_lazy_grammar_cannot_take_is_an_error(vocab):
    adapter, _ = vocab
    guide = _guide(vocab, 'root ::= "<call>" [0-9]', lazy=True, triggers=(Trigger("pattern", "<call>[a-z]"),))
    with pytest.raises(GrammarError, match="does not accept the text from its trigger"):
        for token in adapter.tokenize("<call>a", False):
            guide.accept(token)


@pytest.mark.parametrize("value, message", [
    ("word", "must be a list"),
    ([{"type": "nope", "value": "x"}], "'type' must be 0"),
    ([{"type": "word", "value": ""}], "non-empty string"),
    ([{"type": "pattern", "value": "("}], "not a valid regular expression"),
    ([{"type": 0, "value": "", "token": 10**9}], "token id"),
    ([{"type": 7, "value": "x"}], "'type' must be 0"),
])
def test_bad_triggers_are_invalid_params(value, message):
    with pytest.raises(InvalidParamsError, match=message):
        parse_triggers(value, 49152)


def test_triggers_take_llama_rns_numbers_and_names():
    assert parse_triggers([{"type": 1, "value": "<tool_call>"}, {"type": "pattern_full", "value": ".*x"},
                           {"type": 0, "value": "<|x|>", "token": 5}, {"type": 2, "value": "a(b)"}], 100) == (
        Trigger("word", "<tool_call>"), Trigger("pattern_full", ".*x"), Trigger("token", "<|x|>", 5),
        Trigger("pattern", "a(b)"))
    assert Trigger("word", "<tool_call>").as_dict() == {"type": 1, "value": "<tool_call>", "token": -1}


def test_lazy_without_triggers_is_refused(vocab):
    with pytest.raises(InvalidParamsError, match="needs 'grammar_triggers'"):
        _guide(vocab, 'root ::= "x"', lazy=True)
