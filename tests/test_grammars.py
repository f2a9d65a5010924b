"""GBNF checking before generation, built-in grammars, and the grammar CLI."""

from __future__ import annotations

import json
import re

import pytest

from llamacompat import GrammarError
from llamacompat.cli import main
from llamacompat.grammars import BUILTIN_GRAMMARS, GbnfError, builtin_grammar, parse_gbnf

from .conftest import GREEDY
from .llama_grammar import native_parses


@pytest.fixture(scope="module")
def vocab():
    """A vocabulary-only context: all llama.cpp's grammar parser needs."""
    from llamacompat import init_llama

    with init_llama({"vocab_only": True}) as ctx:
        yield ctx


@pytest.mark.parametrize("name", BUILTIN_GRAMMARS)
def test_builtin_grammars_pass_both_parsers(name, vocab):
    source = builtin_grammar(name)
    assert "root" in parse_gbnf(source).rules
    assert native_parses(vocab, source)


# source, line, column, rule, what the message says, whether llama.cpp's parser also rejects it
BAD = [
    ('root ::= "a" | b', 1, 16, "root", "undefined rule 'b'", True),
    ('root ::= value\nvalue ::= "x" | vaule', 2, 17, "value", "did you mean 'value'", True),
    ('root ::= "abc', 1, 10, "root", "unterminated string", True),
    ("root ::= [a-z", 1, 10, "root", "unbalanced '['", True),
    ('root ::= ("a" | "b"', 1, 10, "root", "unbalanced '('", True),
    ('root ::= "a")', 1, 13, "root", "unbalanced ')'", True),
    ('root ::= "\\q"', 1, 11, "root", "bad escape '\\q'", True),
    ('root ::= "\\x4"', 1, 11, "root", "expected 2 hex digits", True),
    ('root ::= "a" | | "b"', 1, 16, "root", "empty alternative", False),
    ('root ::= "a" |\n', 2, 1, "root", "empty alternative", False),
    ('expr ::= expr "+" "1" | "1"\nroot ::= expr', 1, 10, "expr", "left recursion (expr -> expr)", True),
    ('root ::= a\na ::= b "x"\nb ::= "y"? a', 3, 12, "b", "left recursion (a -> b -> a)", True),
    ('item ::= "a"', 1, 1, None, "no 'root' rule", True),
    ('root ::= "a"\nroot ::= "b"', 2, 1, "root", "defined twice", False),
    ('root ::= my_rule\nmy_rule ::= "x"', 1, 12, "root", "letters, digits and '-' only", True),
    ('root ::= "a"{3000}', 1, 13, "root", "limit of 2000", True),
    ('root = "a"', 1, 6, "root", "expected '::='", True),
    ('root ::= *"a"', 1, 10, "root", "must follow an item", True),
    # llama.cpp accepts these, then aborts the process at the first token (nothing can match)
    ('root ::= "a" []', 1, 14, "root", "empty character class", False),
    ("root ::= [^\\x00-\\U0010FFFF]", 1, 10, "root", "excludes every character", False),
    ("root ::= [^\\x00-\\x7f\\x80-\\U0010FFFF]", 1, 10, "root", "excludes every character", False),
    ("root ::= <[12a]>", 1, 10, "root", "bad token id <[12a]>", True),
    # limits that keep every engine's recursion (and ours) bounded
    ("root ::= " + "(" * 101 + '"a"' + ")" * 101, 1, 110, "root", "nested more than 100 levels deep (the limit)", False),
    ("\n".join(f'r{i} ::= "a"' for i in range(1001)) + "\nroot ::= r0", 1001, 1, "r1000", "more than 1000 rules (the limit)",
     False),
]


@pytest.mark.parametrize("source,line,column,rule,message,native_rejects", BAD, ids=[b[4] for b in BAD])
def test_bad_grammar_names_line_column_and_rule(source, line, column, rule, message, native_rejects, vocab):
    with pytest.raises(GbnfError) as caught:
        parse_gbnf(source)
    err = caught.value
    assert (err.line, err.column, err.rule) == (line, column, rule)
    assert message in err.detail and err.detail.startswith("Failed to initialize sampling: invalid grammar at line")
    assert str(err) == "Failed to initialize sampling"  # llama.rn's text
    assert native_parses(vocab, source) is not native_rejects  # where we are stricter than llama.cpp, it is on purpose


def test_grammars_at_the_limits_are_accepted():
    assert len(parse_gbnf("root ::= " + "(" * 100 + '"a"' + ")" * 100).rules) == 1
    chain = "\n".join([f"r{i} ::= r{i + 1}" for i in range(998)] + ['r998 ::= "a"', "root ::= r0"])
    assert len(parse_gbnf(chain).rules) == 1000  # a chain this long once hit Python's recursion limit
    assert parse_gbnf("root ::= [^\\x00-\\U0010FFFE] | [^]")


def test_token_references_are_checked_against_the_vocabulary(ctx):
    for grammar, message in [("root ::= <[99999999]>", "token <[99999999]> is outside the vocabulary (ids 0..49151)"),
                             ('root ::= "a" <not-a-token>', "<not-a-token> is not a single token of this model's vocabulary")]:
        with pytest.raises(GbnfError) as caught:
            ctx.completion({"prompt": "Hi", "grammar": grammar})
        assert message in caught.value.detail and caught.value.line == 1
    result = ctx.completion({"prompt": "Hi", "grammar": "root ::= <[81]> <|im_start|>", "n_predict": 4})
    assert result["text"] == "a<|im_start|>" and result["stopped_eos"]


def test_a_schema_nested_too_deep_names_the_limit():
    from llamacompat.grammars import SchemaError, convert_json_schema_to_grammar

    for make in (lambda s: {"type": "array", "items": s}, lambda s: {"type": "object", "properties": {"a": s}},
                 lambda s: {"allOf": [s]}, lambda s: {"anyOf": [s, {"type": "null"}]}):
        schema: object = {"type": "string"}
        for _ in range(300):
            schema = make(schema)
        with pytest.raises(SchemaError, match="nests more than 64 levels deep"):
            convert_json_schema_to_grammar(schema)
    with pytest.raises(SchemaError, match="nests more than 64 levels deep"):  # too deep for json itself
        convert_json_schema_to_grammar('{"items":' * 100_000 + "{}" + "}" * 100_000)


def test_an_object_with_many_optional_properties_gives_a_shallow_linear_grammar():
    from llamacompat.grammars import accepts, convert_json_schema_to_grammar

    def wide(n: int) -> str:  # parentheses were nested once per optional property, and the text grew as n squared
        return convert_json_schema_to_grammar({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)},
                                               "additionalProperties": False})

    assert len(wide(2000)) < 2.2 * len(wide(1000)) and len(parse_gbnf(wide(2000)).rules) < 600
    grammar = wide(60)  # (the recogniser recurses once per nested group or rule: keep it within Python's limit)
    assert accepts(grammar, '{"p3": 1, "p30": 2, "p59": 3}') and accepts(grammar, "{}")
    assert not accepts(grammar, '{"p30": 2, "p3": 1}')  # properties in schema order


def test_a_grammar_that_crashes_llama_cpp_never_reaches_it(ctx, capfd):
    # llama.cpp aborts the process on {5,2}; we refuse it first, and print nothing.
    with pytest.raises(GbnfError, match=r"maximum below its minimum"):
        ctx.completion({"prompt": "Hi", "grammar": 'root ::= "a"{5,2}'})
    with pytest.raises(GrammarError, match="undefined rule 'b'"):
        ctx.completion({"prompt": "Hi", "grammar": 'root ::= "a" | b'})
    assert capfd.readouterr().err == ""
    assert ctx.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2


BUILTIN_SHAPES = {
    "identifiers": r"[a-zA-Z_][a-zA-Z0-9_]{0,31}(, ?[a-zA-Z_][a-zA-Z0-9_]{0,31}){0,31}",
    "list": r"(- [^\r\n]{1,200}\n){1,20}",
    "arithmetic": r"[-+*/0-9. ()]+ = -?[0-9]{1,9}(\.[0-9]{1,6})?",
    "english": r"[A-Z][a-z']{0,15}(,? [a-zA-Z'-]{1,20}){0,30}[.!?]( [A-Z][a-z']{0,15}(,? [a-zA-Z'-]{1,20}){0,30}[.!?]){0,3}",
}


# A small model can ramble past any limit; these questions lead SmolLM2 to finish within the grammar.
QUESTIONS = {
    "identifiers": "Name three variables for a loop.",
    "list": "Write a shopping list with three items.",
    "arithmetic": "What is 12 times 3? Write the sum and its result.",
    "english": "Say hello.",
}


def chat(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("name", sorted(BUILTIN_SHAPES))
def test_builtin_grammar_by_name_constrains_output(ctx, name):
    result = ctx.completion({"prompt": chat(QUESTIONS[name]), "grammar": name, "n_predict": 300, **GREEDY})
    assert result["stopped_eos"], result["text"]
    assert re.fullmatch(BUILTIN_SHAPES[name], result["text"]), result["text"]
    free = ctx.completion({"prompt": chat(QUESTIONS[name]), "n_predict": 60, **GREEDY})["text"]
    assert not re.fullmatch(BUILTIN_SHAPES[name], free)  # the grammar, not the model, made the shape


def test_json_builtin_gives_a_json_object(ctx):
    prompt = chat("Give a JSON object with two keys, name and age, for a cat.")
    result = ctx.completion({"prompt": prompt, "grammar": "json", "n_predict": 300, **GREEDY})
    assert result["stopped_eos"], result["text"]
    assert set(json.loads(result["text"])) == {"name", "age"}


def test_unknown_grammar_name_lists_the_builtins(ctx):
    with pytest.raises(GrammarError, match="neither GBNF .* json, json_arr"):
        ctx.completion({"prompt": "Hi", "grammar": "jsonn"})


def test_grammar_cli(tmp_path, capsys):
    good, bad = tmp_path / "good.gbnf", tmp_path / "bad.gbnf"
    good.write_text('root ::= "yes" | "no"\n')
    bad.write_text('root ::= answer\nanswer ::= "yes" | nope\n')
    assert main(["grammar", "check", str(good)]) == 0
    assert "ok (1 rules)" in capsys.readouterr().out
    assert main(["grammar", "check", str(good), str(bad)]) == 1
    assert f"{bad}:2:20: undefined rule 'nope' (rule 'answer')" in capsys.readouterr().err
    assert main(["grammar", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in BUILTIN_GRAMMARS)
    assert main(["grammar", "show", "json"]) == 0
    assert "root" in capsys.readouterr().out
