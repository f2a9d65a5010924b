"""Candidate instances of a JSON schema, as a hypothesis strategy, for the grammar property tests.

Built on hypothesis's public strategies only. (hypothesis-jsonschema, unmaintained since 2024, reaches into
hypothesis internals and broke with hypothesis 6.170.10.) Each keyword is drawn from what it asks for; the
tests keep only the draws jsonschema accepts (``is_valid``), so a keyword drawn loosely here (``allOf`` is
merged, not solved; ``uniqueItems`` and ``maxProperties`` are left to the filter) costs draws, never
correctness. Unlike hypothesis-jsonschema it follows recursive ``$ref`` s (a few levels deep), ``prefixItems``, and
reads ``\\d \\w \\s`` in patterns as ECMA-262 does (ASCII).
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import strategies as st

from .schema_instances import ecma_to_python

__all__ = ["instances"]

MAX_REFS = 4  # how many $refs deep a recursive schema is followed before its optional parts are left out
MAX_ITEMS = 4  # arrays and extra properties stay short unless the schema asks for more

_two = lambda low, high: st.integers(low, high).map("{:02d}".format)  # noqa: E731
_OFFSET = st.just("Z") | st.tuples(st.sampled_from("+-"), _two(0, 23), _two(0, 59)).map("{0[0]}{0[1]}:{0[2]}".format)
_FRACTION = st.just("") | st.integers(1, 9).flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n)).map(".{}".format)
_DATE = st.dates().map(lambda d: d.isoformat())  # RFC 3339 full-date
_TIME = st.tuples(_two(0, 23), _two(0, 59), _two(0, 59), _FRACTION, _OFFSET).map("{0[0]}:{0[1]}:{0[2]}{0[3]}{0[4]}".format)

# RFC 3339 in the form the grammar writes (README, "Grammars": upper-case T and Z, fractions of 1 to 9 digits),
# and the other formats jsonschema checks; unknown formats are plain strings (jsonschema ignores them).
FORMATS: dict[str, st.SearchStrategy[str]] = {
    "date": _DATE,
    "time": _TIME,
    "date-time": st.tuples(_DATE, _TIME).map("T".join),
    "email": st.emails(),
    "uuid": st.uuids().map(str),
    "ipv4": st.ip_addresses(v=4).map(str),
    "ipv6": st.ip_addresses(v=6).map(str),
}

_SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(-1e6, 1e6, allow_nan=False)
            | st.text(max_size=8))
ANY_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                        max_leaves=6)

# A schema without "type" takes its types from its keywords (as the converter reads it).
_IMPLIED = {"properties": "object", "required": "object", "additionalProperties": "object", "minProperties": "object",
            "maxProperties": "object", "items": "array", "prefixItems": "array", "minItems": "array", "maxItems": "array",
            "minLength": "string", "maxLength": "string", "pattern": "string", "format": "string",
            "minimum": "number", "maximum": "number", "exclusiveMinimum": "number", "exclusiveMaximum": "number",
            "multipleOf": "number"}


def instances(schema: Any) -> st.SearchStrategy[Any]:
    """Values shaped by ``schema`` (a superset of its instances: filter them with ``is_valid``)."""
    drawn = _Drawer(schema).draw(schema, 0)
    return st.nothing() if drawn is None else drawn


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Both schemas' keywords in one (``allOf``): properties and required united, bounds tightened, types met."""
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties":
            out[key] = {**out[key], **{k: {"allOf": [out[key][k], v]} if k in out[key] else v for k, v in value.items()}}
        elif key == "required":
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            out[key] = min(out[key], value)
        elif key == "type":
            mine = set(out[key] if isinstance(out[key], list) else [out[key]])
            theirs = set(value if isinstance(value, list) else [value])
            both = mine & theirs or ({"integer"} if {"integer", "number"} <= mine | theirs else set())
            out[key] = sorted(both) if both else out[key]
        else:
            out[key] = value
    return out


def _ceil(bound: float | None, step: float) -> int | None:
    return None if bound is None else int(-(-bound // step))


def _floor(bound: float | None, step: float) -> int | None:
    return None if bound is None else int(bound // step)


class _Drawer:
    def __init__(self, root: Any) -> None:
        self.root = root

    def _target(self, ref: str) -> Any:
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return target

    def _resolved(self, schema: Any) -> Any:
        while isinstance(schema, dict) and "$ref" in schema:
            target = self._target(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            schema = _merge(target, rest) if isinstance(target, dict) else target
        return schema

    def draw(self, schema: Any, refs: int) -> st.SearchStrategy[Any] | None:
        if schema is True or schema == {}:
            return ANY_JSON
        if schema is False or not isinstance(schema, dict):
            return None
        if "$ref" in schema:
            return self.draw(self._resolved(schema), refs + 1) if refs < MAX_REFS else None
        if "allOf" in schema:
            merged: Any = {k: v for k, v in schema.items() if k != "allOf"}
            for part in map(self._resolved, schema["allOf"]):
                if part is False:
                    return None
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.draw(merged, refs)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                siblings = {k: v for k, v in schema.items() if k != key}
                return _either([self.draw(_merge(siblings, b) if isinstance(b, dict) else b, refs) for b in schema[key]])
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        declared = schema.get("type")
        if declared is None:
            declared = sorted({kind for key, kind in _IMPLIED.items() if key in schema}) or None
        if declared is None:
            return ANY_JSON
        kinds = declared if isinstance(declared, list) else [declared]
        drawn = _either([self._of_type(kind, schema, refs) for kind in kinds])
        return _either([drawn, st.none()]) if schema.get("nullable") is True else drawn

    def _of_type(self, kind: str, schema: dict[str, Any], refs: int) -> st.SearchStrategy[Any] | None:
        if kind == "null":
            return st.none()
        if kind == "boolean":
            return st.booleans()
        if kind in ("integer", "number"):
            return _number(kind, schema)
        if kind == "string":
            return _string(schema)
        if kind == "array":
            return self._array(schema, refs)
        if kind == "object":
            return self._object(schema, refs)
        return None

    def _array(self, schema: dict[str, Any], refs: int) -> st.SearchStrategy[list[Any]] | None:
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if isinstance(items, list):  # drafts 4 to 2019-09: the tuple form
            prefix, items = items, schema.get("additionalItems", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        high = high if high is not None else max(low, len(prefix)) + MAX_ITEMS
        element = self.draw(items, refs)
        if not prefix:
            return st.lists(element, min_size=low, max_size=high) if element is not None else st.just([])
        heads = [self.draw(p, refs) for p in prefix]
        if None in heads:  # the items after the first impossible one cannot be drawn
            heads = heads[:heads.index(None)]
        head = st.tuples(*heads).map(list)
        n_rest = (max(0, low - len(prefix)), max(0, high - len(prefix))) if len(heads) == len(prefix) else (0, 0)
        rest = st.lists(element, min_size=n_rest[0], max_size=n_rest[1]) if element is not None else st.just([])
        cut = st.integers(min(len(heads), low), min(len(heads), high))
        # The whole prefix and more items, or the prefix cut short.
        return (st.tuples(head, rest).map(lambda pair: pair[0] + pair[1])
                | st.tuples(head, cut).map(lambda pair: pair[0][:pair[1]]))

    def _object(self, schema: dict[str, Any], refs: int) -> st.SearchStrategy[dict[str, Any]] | None:
        properties: dict[str, Any] = schema.get("properties", {})
        extra_schema = schema.get("additionalProperties", True)
        required = list(dict.fromkeys(schema.get("required", [])))
        named = {name: self.draw(properties.get(name, extra_schema), refs) for name in dict.fromkeys([*properties, *required])}
        if any(named[name] is None for name in required):
            return None
        must = st.fixed_dictionaries({name: named[name] for name in required},
                                     optional={name: s for name, s in named.items() if name not in required and s is not None})
        extra = self.draw(extra_schema, refs)
        if extra is None:
            return must
        keys = st.text(max_size=6).filter(lambda k: k not in properties)
        return st.tuples(must, st.dictionaries(keys, extra, max_size=2)).map(lambda pair: {**pair[1], **pair[0]})


def _either(options: list[st.SearchStrategy[Any] | None]) -> st.SearchStrategy[Any] | None:
    present = [option for option in options if option is not None]
    return st.one_of(present) if present else None


def _ceil(bound: float | None, step: float) -> int | None:
    return None if bound is None else int(-(-bound // step))


def _floor(bound: float | None, step: float) -> int | None:
    return None if bound is None else int(bound // step)


def _number(kind: str, schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low, high = schema.get("minimum"), schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, (int, float)) and not isinstance(ex_low, bool):
        low = ex_low if low is None else max(low, ex_low)
    if isinstance(ex_high, (int, float)) and not isinstance(ex_high, bool):
        high = ex_high if high is None else min(high, ex_high)
    step = schema.get("multipleOf")
    if step:
        return st.integers(_ceil(low, step), _floor(high, step)).map(lambda n: n * step)
    integers = st.integers(_ceil(low, 1), _floor(high, 1))
    if kind == "integer":
        return integers
    # Exclusive bounds are drawn as if inclusive: the filter refuses the bound itself.
    return integers | st.floats(low, high, allow_nan=False, allow_infinity=False)


def _string(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if schema.get("format") in FORMATS:
        return FORMATS[schema["format"]]
    if "pattern" in schema:
        # A JSON-schema pattern searches (it is not anchored): what surrounds a match is drawn too.
        return st.from_regex(re.compile(ecma_to_python(schema["pattern"])), fullmatch=False).filter(
            lambda s: low <= len(s) <= (high if high is not None else len(s)))
    return st.text(min_size=low, max_size=high if high is not None else max(low, 12))
