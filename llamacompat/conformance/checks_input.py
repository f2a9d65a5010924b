"""Input checks: grammars, JSON schema, bad input, and the capability contract."""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Callable

from ..adapters.base import FEATURES, SUPPORT
from ..context import LlamaContext, init_llama
from ..errors import GrammarError, InvalidParamsError, LlamaError, ModelLoadError, SessionError
from ..params import FEATURE_PARAMS
from .checks_generation import PROMPT
from .kit import GREEDY, Kit, assert_refused, check, no_warnings, refused

# Each grammar with an equivalent regular expression: the checker needs no GBNF engine.
GRAMMARS = [
    ('root ::= "yes" | "no"', r"yes|no"),
    ('root ::= [0-9]{1,4} ("," [0-9]{1,4}){0,3}', r"[0-9]{1,4}(,[0-9]{1,4}){0,3}"),
    ('root ::= "(" [a-z]{1,8} ") " ("red" | "green" | "blue")', r"\([a-z]{1,8}\) (red|green|blue)"),
    ('root ::= word (" " word){2}\nword ::= [A-Z] [a-z]{0,9}', r"[A-Z][a-z]{0,9}( [A-Z][a-z]{0,9}){2}"),
    ('root ::= "{\\"n\\": " [1-9] [0-9]? "}"', r'\{"n": [1-9][0-9]?\}'),
]
GRAMMAR_PROMPT = "Answer the question. Is the sky blue?"

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object",
     "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {"type": "object",
     "properties": {"ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 2}},
     "required": ["ok"]},
]


@check("every output under a grammar is in the grammar's language")
def check_grammar(kit: Kit) -> None:
    if not kit.supports("grammar"):
        refused(kit, "grammar", lambda c: c.completion({"prompt": PROMPT, "n_predict": 4, "grammar": GRAMMARS[0][0]}))
    ctx = kit.context()
    for grammar, pattern in GRAMMARS:
        for sampling in (GREEDY, {"temperature": 1.0, "seed": 7}, {"temperature": 1.0, "seed": 99}):
            result = ctx.completion({"prompt": GRAMMAR_PROMPT, "n_predict": 64, "grammar": grammar, **sampling})
            assert result["stopped_eos"], f"grammar {grammar!r} did not end with its language: {result['text']!r}"
            assert re.fullmatch(pattern, result["text"]), f"{result['text']!r} is not in the language of {grammar!r}"


@check("outputs under json_schema / response_format parse and validate with jsonschema")
def check_json_schema(kit: Kit) -> None:
    if not (kit.supports("grammar") or kit.supports("json_schema")):  # local cores turn schemas into grammars
        refused(kit, "grammar", lambda c: c.completion({"prompt": PROMPT, "n_predict": 4, "json_schema": SCHEMAS[0]}))
    import jsonschema  # the conformance extra installs it

    ctx = kit.context()
    for schema in SCHEMAS:
        for params in ({"json_schema": schema},
                       {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}):
            result = ctx.completion({"prompt": "Reply with JSON.", "n_predict": 128, **params, **GREEDY})
            assert result["stopped_eos"], f"output under {params} did not end with the JSON value: {result['text']!r}"
            try:
                value = json.loads(result["text"])
            except ValueError as err:
                raise AssertionError(f"output under {params} is not JSON: {result['text']!r}") from err
            jsonschema.validate(value, schema)


def _expect(error: type[LlamaError], call: Callable[[], Any], what: str, match: str = "") -> None:
    try:
        call()
    except error as err:
        assert match in err.detail, f"{what}: the message {err.detail!r} does not mention {match!r}"
        assert str(err).strip(), f"{what}: empty error message"
        return
    except Exception as err:  # the wrong kind of error is a contract violation too
        raise AssertionError(f"{what}: raised {type(err).__name__}: {err}, expected {error.__name__}") from err
    raise AssertionError(f"{what}: no error, expected {error.__name__}")


@check("bad input raises the documented LlamaError and leaves the context usable")
def check_bad_input(kit: Kit) -> None:
    ctx = kit.context()
    request = {"prompt": PROMPT, "n_predict": 6, **GREEDY}
    baseline = ctx.completion(request)["text"]
    odd_path = os.fsdecode(b"/nonexistent/caf\xe9")  # not valid UTF-8
    cases: list[tuple[str, type[LlamaError], Callable[[], Any], str]] = [
        ("unknown key", InvalidParamsError, lambda: ctx.completion({**request, "n_predcit": 3}), "n_predict"),
        ("wrong type", InvalidParamsError, lambda: ctx.completion({**request, "temperature": "hot"}), "temperature"),
        ("out of range", InvalidParamsError, lambda: ctx.completion({**request, "top_p": 1.5}), "top_p"),
        ("empty prompt", InvalidParamsError, lambda: ctx.completion({"prompt": ""}), "Prompt is required"),
        ("params not a dict", InvalidParamsError, lambda: ctx.completion("hello"), ""),  # type: ignore[arg-type]
        ("callback not callable", InvalidParamsError, lambda: ctx.completion(request, 5), "callback"),  # type: ignore[arg-type]
        ("huge n_predict", InvalidParamsError, lambda: ctx.completion({**request, "n_predict": 2**40}), "n_predict"),
        ("negative token id", InvalidParamsError, lambda: ctx.detokenize([5, -1]), "tokens[1]"),
        ("token id past the vocabulary", InvalidParamsError, lambda: ctx.detokenize([10**9]), "tokens[0]"),
        ("logit_bias out of the vocabulary", InvalidParamsError,
         lambda: ctx.completion({**request, "logit_bias": [[10**9, -1.0]]}), "logit_bias"),
        ("tokenize a non-string", InvalidParamsError, lambda: ctx.tokenize(5), "tokenize"),  # type: ignore[arg-type]
        ("missing model file", ModelLoadError, lambda: init_llama({**kit.params, "model": "/nonexistent/model.gguf"}), ""),
        ("non-UTF-8 model path", ModelLoadError, lambda: init_llama({**kit.params, "model": odd_path + ".gguf"}), ""),
        ("unknown init key", InvalidParamsError, lambda: init_llama({**kit.params, "n_ctxx": 64}), "n_ctx"),
    ]
    if kit.supports("session"):
        cases.append(("non-UTF-8 session path", SessionError, lambda: ctx.load_session(odd_path + ".session"), ""))
    if kit.supports("grammar"):
        cases += [
            ("invalid grammar", GrammarError, lambda: ctx.completion({**request, "grammar": 'root ::= "a'}), "line 1"),
            # well-formed GBNF, but the token is not in the vocabulary
            ("grammar with an unknown token", GrammarError,
             lambda: ctx.completion({**request, "grammar": "root ::= <|no-such-token-here|>"}), ""),
        ]
        if kit.supports("logit_bias") and ctx.backend != "openai":
            # A dead end mid-generation: the only token the grammar allows is banned. (Not sent to an
            # OpenAI-compatible server: llama-cpp-python's aborts on one.)
            cases.append(("a grammar whose every token is banned", GrammarError,
                          lambda: ctx.completion({**request, "grammar": 'root ::= "a"', "logit_bias": [["a", False]]}),
                          "bans every token"))
    for what, error, call, match in cases:
        _expect(error, call, what, match)
        after = ctx.completion({**request, "n_predict": 2})
        assert after["tokens_predicted"] >= 1 and not after["interrupted"], f"the context is unusable after {what}"
    assert ctx.completion(request)["text"] == baseline, "errors changed what the context generates"


# One small request per capability: what a completion that relies on the feature sends.
PROBES: dict[str, dict[str, Any]] = {
    "grammar": {"grammar": 'root ::= "a" | "b"'},
    # a trigger the model does not write: the text stays free (tests/test_lazy_grammars.py covers the switch)
    "lazy_grammar": {"grammar": 'root ::= "a" | "b"', "grammar_lazy": True,
                     "grammar_triggers": [{"type": 1, "value": "<no trigger here>"}]},
    "temperature": {"temperature": 0.5},
    "top_k": {"temperature": 0.8, "top_k": 5},
    "top_p": {"temperature": 0.8, "top_p": 0.5},
    "min_p": {"temperature": 0.8, "min_p": 0.1},
    "typical_p": {"temperature": 0.8, "typical_p": 0.5},
    "xtc": {"temperature": 0.8, "xtc_probability": 0.5},
    "top_n_sigma": {"temperature": 0.8, "top_n_sigma": 1.0},
    "penalties": {"penalty_repeat": 1.2},
    "mirostat": {"temperature": 0.8, "mirostat": 2},
    "dry": {"dry_multiplier": 0.8},
    "seed": {"temperature": 0.8, "seed": 5},
    "logit_bias": {"logit_bias": [[0, -1.0]]},
    "ignore_eos": {"ignore_eos": True},
    "n_probs": {"n_probs": 2},
    # a chat (the template names the thinking tags); SmolLM2's template opens none, so the text stays free
    "thinking_budget": {"prompt": None, "messages": [{"role": "user", "content": PROMPT}], "thinking_budget_tokens": 4},
}


@check("capabilities are honest: listed features work silently, missing ones warn or raise")
def check_capabilities(kit: Kit) -> None:
    caps = kit.context().capabilities
    assert caps["backend"] == kit.context().backend, "capabilities name another backend"
    assert set(caps["features"].values()) <= SUPPORT, f"bad support levels: {caps}"
    unknown = set(caps["features"]) - FEATURES
    assert not unknown, f"capabilities name features outside the catalogue (adapters.base.Feature): {sorted(unknown)}"
    assert set(PROBES) == set(FEATURE_PARAMS), "every request-level feature needs a probe"
    for feature, extra in PROBES.items():
        params = {"prompt": PROMPT, "n_predict": 2, **extra}
        if kit.supports(feature):
            with no_warnings(f"'{feature}' (listed as supported)"):
                result = kit.context().completion(params)
            assert result["tokens_predicted"] >= 1, f"'{feature}' produced nothing"
        else:
            assert_refused(kit, feature, functools.partial(LlamaContext.completion, params=params))
