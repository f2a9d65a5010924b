"""The converter's parts against independent oracles: number ranges against Decimal arithmetic,
patterns against Python's re (on patterns where ECMA-262 and Python agree), errors and warnings."""

from __future__ import annotations

import itertools
import json
import re
import warnings
from decimal import Decimal

import pytest

from llamacompat import GrammarError, LlamaCompatWarning, init_llama
from llamacompat.grammars import SchemaError, accepts, convert_json_schema_to_grammar, parse_gbnf
from llamacompat.grammars.numbers import NUMBER, integer_range, number_range
from llamacompat.grammars.pattern import PatternError, pattern_to_gbnf

BOUNDS = [None, -1000, -17, -1, 0, 1, 9, 10, 99, 100, 1234]


@pytest.mark.parametrize("lo,hi", [(lo, hi) for lo, hi in itertools.product(BOUNDS, BOUNDS)
                                   if lo is None or hi is None or lo <= hi])
def test_integer_ranges_are_exact(lo, hi):
    grammar = parse_gbnf("root ::= " + integer_range(lo, hi))
    for value in [*range(-1100, 1300, 7), -1000, -17, -1, 0, 1, 9, 10, 99, 100, 1234, 10**15, -10**15]:
        inside = (lo is None or value >= lo) and (hi is None or value <= hi)
        assert accepts(grammar, str(value)) == inside, (lo, hi, value)
    assert not accepts(grammar, "01") and not accepts(grammar, "1.0")


DECIMALS = [None, *map(Decimal, ["-1.25", "-0.5", "0", "0.001", "0.09", "0.5", "1", "2.75", "10", "100.5"])]
TEXTS = ["-2", "-1.25", "-1.2500", "-1.2", "-0.5", "-0.4999", "-0", "0", "0.0", "0.0001", "0.001", "0.00099", "0.09",
         "0.5", "0.50", "0.51", "1", "1.0", "2.75", "2.7501", "9.99", "10", "10.5", "100.5", "100.50001", "512"]


@pytest.mark.parametrize("lo,hi", [(lo, hi) for lo, hi in itertools.product(DECIMALS, DECIMALS)
                                   if lo is None or hi is None or lo <= hi])
@pytest.mark.parametrize("lo_strict,hi_strict", [(False, False), (True, False), (False, True), (True, True)])
def test_decimal_ranges_are_exact(lo, hi, lo_strict, hi_strict):
    expression = number_range(lo, hi, lo_strict, hi_strict)
    grammar = parse_gbnf("root ::= " + expression) if expression else None
    for text in TEXTS:
        value = Decimal(text)
        inside = (lo is None or (value > lo if lo_strict else value >= lo)) and \
                 (hi is None or (value < hi if hi_strict else value <= hi))
        assert (grammar is not None and accepts(grammar, text)) == inside, (lo, hi, lo_strict, hi_strict, text)


def test_unbounded_numbers_follow_json():
    grammar = parse_gbnf("root ::= " + NUMBER)
    assert all(accepts(grammar, t) for t in ["0", "-0", "-1.5e+10", "1E5", "12.000", "3.14159"])
    assert not any(accepts(grammar, t) for t in ["01", "1.", ".5", "+1", "1e", "NaN", "1" * 17])


PATTERNS = {
    r"^[a-z]+$": ["abc", "", "aBc", "a1"],
    r"^\d{3}-\d{4}$": ["555-1234", "55-1234", "5551234"],
    r"abc": ["abc", "xxabcyy", "ab", "a\nabc"],
    r'^"quoted"\\$': ['"quoted"\\', "quoted"],
    r"^(foo|bar)?baz$": ["baz", "foobaz", "barbaz", "fbaz"],
    r"^[^\s]+@[^\s]+\.[a-z]{2,}$": ["a@b.com", "a b@c.de", "x@y.z"],
    r"^.{2,4}$": ["ab", "abcd", "a", "abcde", "a\nb", "é€😀"],
    r"^\w+\W\S$": ["ab!c", "ab c"],
    r"^[\]\-\\]+$": ["]-\\", "a"],
    r"^a|b$": ["a", "ax", "xb", "x"],
    r"^\u00e9\x41\t$": ["éA\t", "éA"],
    r"^[^a]*$": ["bcd\x01\"\\", "bad"],
    r"^(?:[A-Z]{2})([0-9]+)$": ["AB12", "A12"],
    r"^(a{2}){1,2}?$": ["aa", "aaaa", "aaa"],
    r"^\d+(\.\d+)?$": ["1", "1.5", "1."],
}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_like_re_search(pattern):
    grammar = parse_gbnf("root ::= " + pattern_to_gbnf(pattern))
    for text in PATTERNS[pattern]:
        written = json.dumps(text, ensure_ascii=False)[1:-1]  # the grammar covers a JSON string's inside
        assert accepts(grammar, written) == bool(re.search(pattern, text)), (pattern, text)


@pytest.mark.parametrize("pattern,problem", [
    ("(a", "unbalanced '('"), ("a)", "unbalanced ')'"), ("(?=a)", "lookaround"), (r"\1", "backreferences"),
    (r"\bword", "word boundary"), ("*a", "nothing to repeat"), ("a{3,2}", "maximum below"), ("[b-a]", "out of order"),
    (r"\p{L}", "Unicode property"), ("a{5000}", "repetition limit"), ("a^b", "anchors"),
])
def test_pattern_errors_say_what_and_where(pattern, problem):
    with pytest.raises((PatternError, SchemaError)) as info:
        convert_json_schema_to_grammar({"type": "string", "pattern": pattern})
    assert problem in info.value.detail and "position" in info.value.detail


def test_widening_warns_each_time_and_strict_refuses():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    for _ in range(2):  # conversions are cached; the warning is not lost on the second call
        with pytest.warns(LlamaCompatWarning, match="#/uniqueItems"):
            convert_json_schema_to_grammar(schema)
    with pytest.raises(SchemaError, match="strict"):
        convert_json_schema_to_grammar(schema, strict=True)


def test_prop_order_accepts_a_list_or_llama_cpp_mapping():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
              "required": ["a", "b"], "additionalProperties": False}
    for order in (["a"], {"a": 0, "b": 1}):
        grammar = convert_json_schema_to_grammar(schema, order)
        assert accepts(grammar, '{"a": 1, "b": 2}') and not accepts(grammar, '{"b": 2, "a": 1}')
    with pytest.raises(GrammarError, match="prop_order"):
        convert_json_schema_to_grammar(schema, 5)


def test_schema_params_on_a_context(ctx):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    base = {"prompt": "Reply with JSON.", "n_predict": 40, "temperature": 0}
    texts = [ctx.completion({**base, **p})["text"] for p in (
        {"json_schema": schema}, {"json_schema": json.dumps(schema)},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}},
        {"response_format": {"type": "json_schema", "schema": schema}},
    )]
    assert all(json.loads(t) in ({"ok": True}, {"ok": False}) for t in texts), texts
    anything = ctx.completion({**base, "response_format": {"type": "json_object"}})
    json.loads(anything["text"])  # json_object: any JSON value, as in llama.cpp's server
    grammar_wins = ctx.completion({**base, "grammar": 'root ::= "yes"', "json_schema": schema})
    assert grammar_wins["text"] == "yes"
    with pytest.raises(SchemaError, match="#/type"):
        ctx.completion({**base, "json_schema": {"type": "strnig"}})
    assert ctx.completion({**base, "n_predict": 2})["tokens_predicted"] == 2  # still usable


def test_strict_context_refuses_widened_schemas():
    with init_llama({"n_ctx": 256, "n_threads": 2, "strict": True}) as strict:
        with pytest.raises(SchemaError, match="uniqueItems"):
            strict.completion({"prompt": "x", "json_schema": {"type": "array", "uniqueItems": True}})


def test_bad_response_format_is_a_clear_error(ctx):
    from llamacompat import InvalidParamsError

    with pytest.raises(InvalidParamsError, match="'text', 'json_object' or 'json_schema'"):
        ctx.completion({"prompt": "x", "response_format": {"type": "xml"}})
    with pytest.raises(InvalidParamsError, match="needs"):
        ctx.completion({"prompt": "x", "response_format": {"type": "json_schema"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ctx.completion({"prompt": "x", "n_predict": 1, "response_format": {"type": "text"}})["tokens_predicted"] == 1
