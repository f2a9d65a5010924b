"""The schema corpus end to end: each schema converts as documented, llama.cpp parses every grammar,
and the real model's output under each grammar validates with jsonschema."""

from __future__ import annotations

import json
import warnings

import pytest

from llamacompat import GrammarError, LlamaCompatWarning
from llamacompat.grammars import SchemaError, accepts, convert_json_schema_to_grammar, parse_gbnf

from .llama_grammar import native_parses
from .schema_corpus import CORPUS, Case
from .schema_instances import is_valid

# Greedy with DRY and a mild repetition penalty: a 135M model otherwise loops inside open-ended JSON.
SAMPLING = {"temperature": 0, "dry_multiplier": 0.8, "dry_allowed_length": 2, "penalty_repeat": 1.1,
            "penalty_last_n": 64, "n_predict": 300}


def convert(case: Case) -> tuple[str | None, list[str], str | None]:
    """(grammar, warnings, error) for one case."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            grammar = convert_json_schema_to_grammar(case.schema, list(case.prop_order) or None)
        except GrammarError as err:
            return None, [], err.detail  # the whole message (str is llama.rn's fixed text)
    return grammar, [str(w.message) for w in caught if issubclass(w.category, LlamaCompatWarning)], None


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_schema_converts_as_documented(case):
    grammar, warned, error = convert(case)
    outcome = "error" if error else "warn" if warned else "ok"
    assert outcome == case.expect, f"expected {case.expect}, got {outcome}: {error or warned}"
    if case.match:
        assert case.match in (error or " ".join(warned)), f"{case.match!r} is not in {error or warned}"
    if error:
        assert "JSON schema at #" in error, f"the error does not say where: {error}"
    else:
        parse_gbnf(grammar)


SUPPORTED = [c for c in CORPUS if c.expect != "error"]


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_llama_cpp_parses_every_grammar(case, ctx):
    grammar, _, _ = convert(case)
    assert native_parses(ctx, grammar)


# Greedy first; where the model loops in an open-ended grammar (unbounded strings, recursion), sampled retries.
ATTEMPTS = [{}] + [{"temperature": 0.8, "seed": seed} for seed in (1, 2, 3, 4)]


@pytest.mark.parametrize("case", SUPPORTED, ids=lambda c: c.name)
def test_model_output_validates(case, ctx):
    grammar, _, _ = convert(case)
    schema_text = json.dumps(case.schema, ensure_ascii=False)
    messages = [{"role": "user", "content": f"Reply with JSON that matches this JSON schema: {schema_text}"}]
    for attempt in ATTEMPTS:
        result = ctx.completion({"messages": messages, "grammar": grammar, **SAMPLING, **attempt})
        if result["stopped_eos"]:
            break
    else:
        pytest.fail(f"no attempt ended within {SAMPLING['n_predict']} tokens: {result['text']!r}")
    value = json.loads(result["text"])
    assert accepts(grammar, result["text"])
    if case.expect == "ok":
        assert is_valid(value, case.schema), f"{result['text']!r} does not validate"
    # A widened grammar (expect "warn") may let through what the dropped keyword forbids: that is the warning.


def test_coverage_figure(capsys):
    """The corpus's size and coverage, as reported in the README: at least 150 schemas, most supported."""
    results = [convert(c) for c in CORPUS]
    supported = sum(1 for grammar, _, _ in results if grammar is not None)
    widened = sum(1 for _, warned, _ in results if warned)
    assert len(CORPUS) >= 150
    assert supported == len(SUPPORTED)
    with capsys.disabled():
        print(f"\nschema corpus: {supported}/{len(CORPUS)} supported ({widened} with a widening warning), "
              f"{len(CORPUS) - supported} refused with a SchemaError")


def test_errors_are_schema_errors_with_pointers():
    with pytest.raises(SchemaError) as info:
        convert_json_schema_to_grammar({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}})
    assert info.value.pointer == "#/properties/a/pattern"
    assert info.value.keyword == "pattern"
