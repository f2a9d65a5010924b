"""Property tests (hypothesis): a converted schema's grammar accepts its instances and rejects the rest.

Instances are drawn by schema_strategy (our own, on hypothesis's public strategies), kept only where jsonschema
accepts them (patterns read as ECMA-262, formats checked), and written the grammar's way
(schema_instances.canonical). Two recognisers judge each text: this package's (over the parse_gbnf AST) and
llama.cpp's own grammar engine; a third, llguidance on our Lark translation (the mlx backend's engine), must agree.
"""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from llamacompat.grammars import accepts, convert_json_schema_to_grammar, parse_gbnf

from .lark_grammar import lark_accepts
from .llama_grammar import native_accepts, tokenizable
from .schema_corpus import CORPUS
from .schema_instances import OutsideLanguage, canonical, is_valid
from .schema_strategy import instances

CASES = [c for c in CORPUS if c.expect == "ok" and isinstance(c.schema, (dict, bool))]
SETTINGS = settings(max_examples=12, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(-1e6, 1e6, allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


_grammars: dict[str, tuple[str, object]] = {}


def grammar_of(case):
    """The case's grammar text and parsed form, converted once; "ok" cases convert without a warning."""
    if case.name not in _grammars:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            text = convert_json_schema_to_grammar(case.schema, list(case.prop_order) or None)
        _grammars[case.name] = (text, parse_gbnf(text))
    return _grammars[case.name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_instances_are_accepted(case, ctx):
    text, grammar = grammar_of(case)

    @SETTINGS
    @given(instances(case.schema), st.booleans())
    def run(instance, indent):
        assume(is_valid(instance, case.schema))
        try:
            written = canonical(instance, case.schema, case.schema, case.prop_order, indent)
        except OutsideLanguage:
            assume(False)
        assert accepts(grammar, written), f"the grammar rejects an instance: {written}"
        if tokenizable(ctx, written):
            assert native_accepts(ctx, text, written), f"llama.cpp's engine rejects an instance: {written}"
            assert lark_accepts(text, written), f"llguidance rejects an instance: {written}"

    run()


def _mutations(draw, instance):
    """``instance`` with one part replaced, removed or added."""
    paths = []

    def walk(value, path):
        paths.append(path)
        if isinstance(value, dict):
            for key in value:
                walk(value[key], path + [key])
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, path + [index])

    walk(instance, [])
    path = draw(st.sampled_from(paths))
    copy = json.loads(json.dumps(instance))
    if not path:
        return draw(JSON)
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    action = draw(st.sampled_from(["replace", "remove", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(JSON)
    elif action == "remove":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=5))] = draw(JSON)
    else:
        parent.insert(path[-1], draw(JSON))
    return copy


EVERYTHING = {"empty schema", "true schema", "annotations only"}  # no non-instance exists


@pytest.mark.parametrize("case", [c for c in CASES if c.name not in EVERYTHING], ids=lambda c: c.name)
def test_non_instances_are_rejected(case, ctx):
    text, grammar = grammar_of(case)

    @SETTINGS
    @given(st.data())
    def run(data):
        instance = data.draw(instances(case.schema))
        assume(is_valid(instance, case.schema))
        broken = _mutations(data.draw, instance)
        assume(not is_valid(broken, case.schema))
        for written in (json.dumps(broken, ensure_ascii=False), json.dumps(broken, ensure_ascii=False, indent=2)):
            assert not accepts(grammar, written), f"the grammar accepts a non-instance: {written}"
            if tokenizable(ctx, written):
                assert not native_accepts(ctx, text, written), f"llama.cpp's engine accepts a non-instance: {written}"
                assert not lark_accepts(text, written), f"llguidance accepts a non-instance: {written}"

    run()
