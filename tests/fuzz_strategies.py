"""Hypothesis strategies for the fuzz tests: JSON values, completion params drawn from ``COMPLETION_FIELDS``, small
random grammars and schemas, and every bridge method's request.

Params are drawn from each Field's types (right and wrong), so a new completion param is fuzzed as soon as it is
in ``COMPLETION_FIELDS``; a few params get strategies of their own that reach deeper (grammars, schemas,
logit_bias, messages). Every completion a strategy draws is bounded: ``n_predict`` is always set, to 0..8 or
to a value validation refuses.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from llamacompat.bridge.protocol import METHODS
from llamacompat.errors import LlamaError
from llamacompat.params import CHAT_FIELDS, COMPLETION_FIELDS, Field

MAX_PREDICT = 8  # tokens a fuzzed completion may generate


SCALE = int(os.environ.get("LLAMACOMPAT_FUZZ_SCALE", "1"))  # more examples for a long hunt; CI runs the default


def fuzz_settings(examples: int) -> settings:
    """Reproducible runs of ``examples`` examples (as tests/test_schema_properties.py): no deadline, no database."""
    return settings(max_examples=examples * SCALE, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def stable_codes() -> set[str]:
    """The ``code`` of every LlamaError class: what a typed error reply may carry."""
    codes, todo = set(), [LlamaError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


# -- values ----------------------------------------------------------------------------------------
# Text that UTF-8 cannot carry (lone surrogates, from JSON's \ud800 escapes), control characters and special tokens.
ODD_TEXT = st.sampled_from(["", " ", "\x00", "\ud800", "a\udfff", "\n", "<|im_start|>", "<|im_end|>", "🙂", "\u202e", "é" * 3])
TEXT = st.text(max_size=12) | ODD_TEXT
INTS = st.sampled_from([-2**63, -2**31, -2, -1, 0, 1, 2, 3, 100, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**70]) | \
    st.integers(-1000, 1000)
FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 1e-9, 0.5, 1.0, 1.0000001, 1.75, 2.0, 1e308]) | \
    st.floats(-10, 10)
JSON = st.recursive(st.none() | st.booleans() | INTS | FLOATS | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=8)


def _of_type(kind: type) -> st.SearchStrategy[Any]:
    return {int: INTS, float: FLOATS, str: TEXT, bool: st.booleans(), list: st.lists(JSON, max_size=4),
            tuple: st.lists(TEXT, max_size=4), dict: st.dictionaries(TEXT, JSON, max_size=4)}[kind]


def _type_ok(value: Any, field: Field) -> bool:
    if value is None:
        return field.nullable
    return isinstance(value, field.types) and not (isinstance(value, bool) and bool not in field.types)


def field_values(field: Field) -> st.SearchStrategy[Any]:
    """Values of the field's types (its default and, if nullable, None among them) and values of other types."""
    right = st.one_of(*(_of_type(kind) for kind in field.types))
    if isinstance(field.default, (bool, int, float, str, list, tuple)):
        right = right | st.just(field.default)
    if field.nullable:
        right = right | st.none()
    valid = right.filter(lambda value: value is None or field.check is None or field.check(value))
    wrong = JSON.filter(lambda value: not _type_ok(value, field))
    return st.one_of(valid, valid, right, wrong)  # at and past the field's bounds, and of other types


# -- grammars and schemas --------------------------------------------------------------------------
_ATOMS = ['"a"', '"yes"', '"\\n"', '""', '"\\x41"', '"\\u00e9"', '"', "[a-z]", "[^a]", "[0-9]", "[]", "[^\\x00-\\U0010FFFF]",
          "[z-a]", ".", "x", "root", "undefined", "<[12]>", "<[999999]>", "<|im_end|>", "<nope>", "!^"]
_SUFFIXES = ["", "", "*", "+", "?", "{0,3}", "{2}", "{2000}", "{2001}", "{3,1}", "{,2}", "{"]


@st.composite
def _expr(draw: Any, depth: int = 0) -> str:
    items = []
    for _ in range(draw(st.integers(1, 3))):
        atom = draw(st.sampled_from(_ATOMS)) if depth >= 2 or draw(st.integers(0, 3)) else f"( {draw(_expr(depth + 1))} )"
        items.append(atom + draw(st.sampled_from(_SUFFIXES)))
    return draw(st.sampled_from([" ", " | "])).join(items)


@st.composite
def grammars(draw: Any) -> str:
    """A small GBNF grammar from random fragments: often valid, often not, sometimes a dead end."""
    rules = [f"root ::= {draw(_expr())}"]
    if draw(st.booleans()):
        rules.append(f"x ::= {draw(_expr())}")
    text = draw(st.sampled_from(["\n", "\r\n", " "])).join(rules)
    return draw(st.sampled_from([text, text, text, "json", "root ::= x", "root ::=", "# only a comment"]))


_SCHEMA_LEAVES = st.sampled_from([
    {}, True, False, {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
    {"type": "nope"}, {"type": ["string", "null"]}, {"enum": ["a", 1, None]}, {"enum": []}, {"const": "x"},
    {"type": "string", "minLength": 2, "maxLength": 1}, {"type": "string", "maxLength": 10**9},
    {"type": "integer", "minimum": 5, "maximum": 1}, {"type": "number", "exclusiveMinimum": 0.5},
    {"type": "string", "pattern": "^[a-z]+$"}, {"type": "string", "pattern": "("}, {"type": "string", "pattern": "a{1000000}"},
    {"type": "string", "format": "date-time"}, {"type": "string", "format": "no-such-format"}, {"$ref": "#/nowhere"},
    {"$ref": "#"}, {"not": {}}, {"type": "string", "enum": [1]},
])


def _schema_nodes(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    props = st.dictionaries(st.sampled_from(["a", "b", "", "\ud800", "é"]), inner, max_size=3)
    return st.one_of(
        st.builds(lambda p, req: {"type": "object", "properties": p, "required": req}, props,
                  st.lists(st.sampled_from(["a", "b", "c"]), max_size=2)),
        st.builds(lambda items, lo, hi: {"type": "array", "items": items, "minItems": lo, "maxItems": hi}, inner,
                  st.sampled_from([0, 1, 3, 10**6]), st.sampled_from([0, 2, 5, 10**6])),
        st.builds(lambda alts: {"anyOf": alts}, st.lists(inner, max_size=3)),
        st.builds(lambda alts: {"oneOf": alts}, st.lists(inner, max_size=3)),
        st.builds(lambda alts: {"allOf": alts}, st.lists(inner, max_size=2)),
        st.builds(lambda p, extra: {"type": "object", "properties": p, "additionalProperties": extra}, props, inner),
        st.builds(lambda defs: {"$defs": {"d": defs}, "$ref": "#/$defs/d"}, inner),
    )


SCHEMAS = st.recursive(_SCHEMA_LEAVES, _schema_nodes, max_leaves=5)


# -- completion params ------------------------------------------------------------------------------
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]), "content": TEXT})
_ODD_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "developer"]) | TEXT},
                                     optional={"content": TEXT | JSON, "tool_calls": JSON, "reasoning_content": TEXT,
                                               "name": TEXT, "tool_call_id": TEXT})
MESSAGES = st.lists(st.one_of(_MESSAGE, _MESSAGE, _ODD_MESSAGE), min_size=1, max_size=3)
TEMPLATES = st.sampled_from([
    "{% for m in messages %}{{ m.content }}{% endfor %}", "{{ messages[0]['content'] }}{{ eos_token }}",
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "{{ raise_exception('no') }}", "{% for %}", "{{ x.y.z }}", "{{ 'a' * 100000000 }}", "{{ '\\ud800' }}",
    "{% for i in range(10**9) %}{% endfor %}", "{{ messages | tojson }}", "",
]) | TEXT
TOOLS = st.lists(st.fixed_dictionaries({"type": st.just("function") | TEXT, "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["get", "a b", ""]) | TEXT}, optional={"parameters": SCHEMAS, "description": TEXT})}),
    max_size=2) | JSON
LOGIT_BIAS = st.lists(st.one_of(
    st.tuples(INTS | st.sampled_from([49151, 49152]) | TEXT, FLOATS | INTS | st.just(False)).map(list), JSON), max_size=4) | \
    st.dictionaries(TEXT, FLOATS | st.just(False), max_size=3)


def _bounded_predict(value: Any) -> Any:
    """n_predict as drawn, unless it would let the completion run past MAX_PREDICT tokens."""
    field = COMPLETION_FIELDS["n_predict"]
    if _type_ok(value, field) and value is not None and field.check(value) and not 0 <= value <= MAX_PREDICT:
        return value % (MAX_PREDICT + 1)
    return value


_SPECIAL = {
    "prompt": st.sampled_from(["Hello", "The capital of France is", "1, 2, 3,"]) | TEXT | st.none() | JSON,
    "messages": MESSAGES | st.none() | JSON,
    "chat_template": TEMPLATES | st.none(),
    "grammar": grammars() | st.none() | JSON,
    "json_schema": SCHEMAS | SCHEMAS.map(json.dumps) | st.sampled_from(["{", "[]", '"x"']) | st.none(),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["json_object", "json_schema", "text"]) | TEXT},
                                             optional={"schema": SCHEMAS, "json_schema": st.fixed_dictionaries(
                                                 {}, optional={"schema": SCHEMAS})}) | JSON,
    "logit_bias": LOGIT_BIAS | JSON,
    "stop": st.lists(TEXT, max_size=3) | JSON,
    "tools": TOOLS | st.none(),
    "n_predict": st.integers(0, MAX_PREDICT) | INTS.map(_bounded_predict) | JSON.map(_bounded_predict),
    # lazy grammars: mostly off (on, they need a grammar and triggers), triggers of every type and shape
    "grammar_lazy": st.sampled_from([False, False, False, True]) | JSON,
    "grammar_triggers": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from([0, 1, 2, 3, "word", "pattern_full"]) | INTS | TEXT,
         "value": st.sampled_from(["a", " the", "{", "<tool_call>", r"(\{)", ".*", "("]) | TEXT},
        optional={"token": INTS | JSON}), max_size=2) | JSON,
    "grammar_engine": st.sampled_from(["auto", "llguidance", "llama_cpp"]) | TEXT | JSON,
    "preserved_tokens": st.lists(TEXT, max_size=2) | JSON,
}


def field_strategy(name: str) -> st.SearchStrategy[Any]:
    return _SPECIAL.get(name, field_values(COMPLETION_FIELDS[name]))


# media_paths fails without init_multimodal whatever its value (the fuzzed server has no projector): it comes as
# the rare extra key below, so that the drawn fields keep reaching the model
_DRAWN_FIELDS = sorted(set(COMPLETION_FIELDS) - {"media_paths"})


@st.composite
def completion_params(draw: Any) -> dict[str, Any]:
    """A params dict for ``completion``: a few fields of COMPLETION_FIELDS (any of them), rarely an unknown one; always
    a bounded n_predict, and mostly a prompt or messages so that a good part of the requests gets to generate."""
    names = draw(st.lists(st.sampled_from(_DRAWN_FIELDS), max_size=5, unique=True))
    params = {name: draw(field_strategy(name)) for name in names}
    if "prompt" not in params and "messages" not in params and draw(st.integers(0, 4)):
        params["prompt"] = draw(st.sampled_from(["Hi", "Once upon a time"]) | TEXT)
    params["n_predict"] = _bounded_predict(params.get("n_predict", draw(st.integers(0, MAX_PREDICT))))
    if not draw(st.integers(0, 15)):
        params[draw(st.sampled_from(["n_predicts", "temprature", "grammar_lazyy", "media_paths", "n_threads"]) | TEXT)] = \
            draw(JSON)
    return params


@st.composite
def chat_params(draw: Any) -> dict[str, Any]:
    """get_formatted_chat's params: a few of the completion params that shape a chat (params.CHAT_FIELDS)."""
    names = draw(st.lists(st.sampled_from(sorted(CHAT_FIELDS)), max_size=4, unique=True))
    return {name: draw(field_strategy(name)) for name in names}


# -- bridge requests -------------------------------------------------------------------------------
def _small(low: int) -> st.SearchStrategy[Any]:
    """A bench count: small, at its bound, or not a count (bench's own bounds allow runs far longer than a test)."""
    return st.integers(low - 1, 3) | st.sampled_from([-2**63, 2**63, 1.0, True, "2", None])


# Each method's params, as its server method reads them; random keys are added by ``requests``.
METHOD_PARAMS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "completion": st.fixed_dictionaries({"params": st.one_of(completion_params(), completion_params(), completion_params(), JSON)}),
    "embedding": st.fixed_dictionaries({}, optional={"text": TEXT | JSON, "params": st.fixed_dictionaries(
        {}, optional={"embd_normalize": INTS | JSON}) | JSON}),
    "bench": st.fixed_dictionaries({"pp": _small(1), "tg": _small(1)}, optional={"pl": _small(1), "nr": _small(1)}),
    "load_session": st.fixed_dictionaries({}, optional={"path": st.sampled_from(["s.bin", "../s.bin", "/etc/passwd", ".",
                                                                                  "s.bin.llamacompat.json"]) | TEXT | JSON}),
    "save_session": st.fixed_dictionaries({}, optional={"path": st.sampled_from(["s.bin", "../s.bin", ".", "d/s.bin",
                                                                                  "s.bin.llamacompat.json"]) | TEXT | JSON,
                                                        "token_size": INTS | JSON}),
    "load": st.fixed_dictionaries({}, optional={"path": st.sampled_from(["model.gguf", "nope.gguf", ".", "../x", "/"]) |
                                                TEXT | JSON}),
    "free": st.just({}),
    "rerank": st.fixed_dictionaries({"query": TEXT | TEXT | JSON, "documents": st.lists(TEXT, max_size=3) | JSON}, optional={
        "params": st.fixed_dictionaries({}, optional={"normalize": INTS | JSON}) | JSON}),
    "clear_cache": st.fixed_dictionaries({}, optional={"clear_data": st.booleans() | JSON}),
    "apply_lora_adapters": st.fixed_dictionaries({}, optional={"lora_list": st.lists(st.fixed_dictionaries(
        {"path": st.sampled_from(["model.gguf", "nope.gguf", "../x"]) | TEXT},
        optional={"scaled": FLOATS | JSON}), max_size=2) | JSON}),
    "remove_lora_adapters": st.just({}),
    "get_loaded_lora_adapters": st.just({}),
    "tokenize": st.fixed_dictionaries({"text": TEXT | JSON}, optional={"params": JSON}),
    "detokenize": st.fixed_dictionaries({"tokens": st.lists(INTS | st.sampled_from([49151, 49152]), max_size=4) | JSON}),
    "get_formatted_chat": st.fixed_dictionaries({"messages": st.one_of(MESSAGES, MESSAGES, MESSAGES, JSON)}, optional={
        "template": TEMPLATES | JSON, "params": chat_params() | chat_params() | JSON}),
    "model_info": st.just({}),
    "stop": st.fixed_dictionaries({}, optional={"id": INTS | TEXT | JSON}),
    "ping": st.just({}),
    "status": st.just({}),
    "auth": st.fixed_dictionaries({}, optional={"token": JSON}),
    "init_multimodal": st.fixed_dictionaries({}, optional={"params": st.fixed_dictionaries({}, optional={
        "path": st.sampled_from(["mmproj.gguf", "model.gguf", "../x", "/etc/passwd"]) | TEXT | JSON,
        "use_gpu": st.booleans() | JSON, "image_min_tokens": INTS | JSON, "image_max_tokens": INTS | JSON}) | JSON}),
    "release_multimodal": st.just({}),
    "is_multimodal_enabled": st.just({}),
    "get_multimodal_support": st.just({}),
}
assert set(METHOD_PARAMS) == set(METHODS), "a bridge method without a fuzz strategy: add it to METHOD_PARAMS"

IDS = INTS | TEXT | st.none() | st.booleans() | FLOATS | st.lists(INTS, max_size=2) | st.dictionaries(TEXT, INTS, max_size=1)


def _bounded_request(request: dict[str, Any]) -> dict[str, Any]:
    """A JSON request whose work is bounded: a completion's n_predict, at most MAX_PREDICT tokens."""
    params = request.get("params")
    if request.get("method") == "completion" and isinstance(params, dict) and isinstance(params.get("params"), dict):
        inner = params["params"]
        inner["n_predict"] = _bounded_predict(inner.get("n_predict", MAX_PREDICT))
    return request


@st.composite
def requests(draw: Any, methods: list[str]) -> dict[str, Any]:
    """A well-formed request for one of ``methods`` with random params (and now and then a random extra key)."""
    method = draw(st.sampled_from(methods))
    params = draw(METHOD_PARAMS[method])
    if not draw(st.integers(0, 7)):
        params[draw(TEXT)] = draw(JSON)
    request: dict[str, Any] = {"id": draw(st.integers(0, 2**53) | st.text(min_size=1, max_size=8) | ODD_TEXT), "method": method,
                               "params": params}
    if not draw(st.integers(0, 5)):
        request["strict"] = draw(st.booleans() | JSON)
    return _bounded_request(request)


@st.composite
def request_like(draw: Any, methods: list[str]) -> dict[str, Any]:
    """An object shaped more or less like a request: ids of every type, unknown methods, params of any type."""
    shape = draw(st.fixed_dictionaries({}, optional={
        "id": IDS, "method": st.sampled_from(methods) | st.sampled_from(["", "Completion", "tokenise", "__init__",
                                                                         "_m_ping", "shutdown"]) | JSON,
        "params": JSON | st.one_of(*(METHOD_PARAMS[m] for m in methods)), "strict": JSON}))
    return _bounded_request(shape)
