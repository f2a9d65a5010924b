"""JSON Schema to GBNF: ``convert_json_schema_to_grammar``, the function llama.rn used to export.

Hand-written rather than borrowed: llama-cpp-python's port of llama.cpp's
converter exists only with that backend, drops unknown keywords silently and
ignores number bounds; MLX and RKLLM need the same converter without it.

The grammar accepts the schema's instances, written as JSON with these
conventions (documented in the README, "Grammars"):

- properties in a fixed order: ``prop_order`` first, then the schema's order;
  additional properties after the declared ones, with escape-free keys;
- at most one whitespace run between tokens (``ws``), none around the value;
- integers without fraction or exponent; numbers with bounds in plain decimal;
  unbounded integer parts up to 16 digits, fractions up to 20 digits;
- enum and const values in compact ``json.dumps`` form;
- a schema without ``type`` takes its types from its keywords (``properties``
  means an object), as llama.cpp and OpenAI do.

A keyword whose loss only widens the language (``uniqueItems``, ``multipleOf``,
``not``, an unknown ``format``, ...) gives a ``LlamaCompatWarning`` naming it and
its JSON pointer (``strict=True`` makes it an error); anything the converter
cannot honour raises ``SchemaError``, a ``GrammarError``. No remote ``$ref``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import urllib.parse
from decimal import Decimal
from typing import Any, Iterable, Iterator, Mapping, Sequence

from ..errors import GrammarError, compat_warning
from .emit import char_class, literal
from .gbnf import MAX_REPETITIONS, GbnfError, parse_gbnf
from .numbers import INTEGER, NUMBER, integer_range, number_range
from .pattern import JSON_STRING_CHAR, PatternError, pattern_to_gbnf

__all__ = ["convert_json_schema_to_grammar", "SchemaError", "FORMATS", "MAX_SCHEMA_DEPTH"]

MAX_SCHEMA_DEPTH = 64  # nested subschemas (properties, items, anyOf, allOf, $ref chains)
_MEMBERS_PER_RULE = 8  # object members written inline before the rest moves into a rule

ANNOTATIONS = frozenset({
    "$schema", "$id", "$anchor", "$comment", "$vocabulary", "$dynamicAnchor", "title", "description", "default",
    "examples", "example", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
    "contentSchema", "discriminator", "xml", "externalDocs", "$defs", "definitions",
})
# Ignoring these only lets through more than the schema allows.
WIDENING = {
    "multipleOf": "any number is allowed", "uniqueItems": "items may repeat", "contains": "no item is required to match",
    "minContains": "no item is required to match", "maxContains": "no item is required to match",
    "not": "it is not excluded", "if": "the condition is not applied", "then": "the condition is not applied",
    "else": "the condition is not applied", "dependentRequired": "the dependency is not enforced",
    "dependentSchemas": "the dependency is not enforced", "dependencies": "the dependency is not enforced",
    "patternProperties": "matching keys are not constrained", "propertyNames": "key names are not constrained",
    "minProperties": "the count is not enforced", "maxProperties": "the count is not enforced",
    "unevaluatedProperties": "extra properties are not constrained",
    "unevaluatedItems": "extra items are not constrained",
}
_HANDLED = frozenset({
    "type", "enum", "const", "properties", "required", "additionalProperties", "items", "prefixItems",
    "additionalItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "anyOf", "oneOf", "allOf", "$ref", "nullable",
})
_TYPES = ("null", "boolean", "object", "array", "string", "number", "integer")
_TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
               "maxProperties", "propertyNames", "dependentRequired", "dependentSchemas"},
    "array": {"items", "prefixItems", "additionalItems", "minItems", "maxItems", "uniqueItems", "contains"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
}

_YEAR = '([1-9] [0-9]{3} | "0" [1-9] [0-9]{2} | "00" [1-9] [0-9] | "000" [1-9])'
_LEAP_YEAR = '([0-9]{2} ("0" [48] | [2468] [048] | [13579] [26]) | ("0" [48] | [2468] [048] | [13579] [26]) "00")'
_MONTH_DAY = ('(("0" [13578] | "1" [02]) "-" ("0" [1-9] | [12] [0-9] | "3" [01]) | ("0" [469] | "11") "-" '
              '("0" [1-9] | [12] [0-9] | "30") | "02-" ("0" [1-9] | "1" [0-9] | "2" [0-8]))')
_HOUR, _MINUTE = '([01] [0-9] | "2" [0-3])', "[0-5] [0-9]"
_HEX = "[0-9a-fA-F]"
FORMATS = {
    "date": f'{_YEAR} "-" {_MONTH_DAY} | {_LEAP_YEAR} "-02-29"',
    "time": f'{_HOUR} ":" {_MINUTE} ":" {_MINUTE} ("." [0-9]{{1,9}})? ("Z" | [+-] {_HOUR} ":" {_MINUTE})',
    "date-time": 'format-date "T" format-time',
    "uuid": f'{_HEX}{{8}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{4}} "-" {_HEX}{{12}}',
    "email": 'email-atom ("." email-atom)* "@" email-label ("." email-label)+',
    "ipv4": 'ipv4-octet ("." ipv4-octet){3}',
}
_KEY_EXCLUDED = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # what a key writes only as an escape
_PRIMITIVES = {
    "ws": '"" | " " | "\\n" [ \\t]{0,20}',
    "json-char": JSON_STRING_CHAR,
    "string": '"\\"" json-char* "\\""',
    "number": NUMBER,
    "integer": INTEGER,
    "boolean": '"true" | "false"',
    "null": '"null"',
    "value": "object | array | string | number | boolean | null",
    "object": '"{" ws (string ws ":" ws value ws ("," ws string ws ":" ws value ws)*)? "}"',
    "array": '"[" ws (value ws ("," ws value ws)*)? "]"',
    "key-char": char_class(_KEY_EXCLUDED, negated=True),
    "email-atom": "[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]{1,64}",
    "email-label": "[A-Za-z0-9] ([A-Za-z0-9-]{0,61} [A-Za-z0-9])?",
    "ipv4-octet": '[0-9] | [1-9] [0-9] | "1" [0-9]{2} | "2" [0-4] [0-9] | "25" [0-5]',
    **{f"format-{name}": body for name, body in FORMATS.items()},
}
_PRIMITIVE_NEEDS = {"string": ["json-char"], "value": ["object", "array", "string", "number", "boolean", "null"],
                    "object": ["ws", "string", "value"], "array": ["ws", "value"], "format-date-time":
                    ["format-date", "format-time"], "format-ipv4": ["ipv4-octet"],
                    "format-email": ["email-atom", "email-label"]}
_COMMA = '"," ws'
_EMPTY = '""'


class SchemaError(GrammarError):
    """A JSON schema the converter cannot honour; ``pointer`` says where (``#/properties/age/minimum``)."""

    def __init__(self, problem: str, pointer: str, keyword: str | None = None) -> None:
        self.problem, self.pointer, self.keyword = problem, pointer, keyword
        super().__init__(f"Failed to initialize sampling: JSON schema at {pointer}: {problem}")


def _pointer(base: str, *parts: Any) -> str:
    return base + "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _json_type(value: Any) -> set[str]:
    if value is None:
        return {"null"}
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"}
    return {"string"} if isinstance(value, str) else {"array"} if isinstance(value, list) else {"object"}


def _repeat(expression: str, low: int, high: int | None) -> str:
    if high == 0:
        return ""
    if (low, high) == (1, 1):
        return expression
    suffix = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((low, high))
    if suffix is None:
        suffix = f"{{{low}}}" if low == high else f"{{{low},{'' if high is None else high}}}"
    return f"({expression}){suffix}"


class _Converter:
    def __init__(self, root: Any, prop_order: Mapping[str, int], dotall: bool, strict: bool, root_name: str) -> None:
        self.root, self.prop_order, self.dotall, self.strict = root, prop_order, dotall, strict
        self.root_name = root_name
        self.rules: dict[str, str] = {"root": "", root_name: ""}  # "root" stays reserved when embedded
        self.by_body: dict[str, str] = {}
        self.ref_rules: dict[str, str] = {}
        self.merging: list[str] = []
        self.warnings: list[str] = []
        self.depth = 0  # nested visit / flatten calls

    # -- rules -----------------------------------------------------------------------------------
    def name_for(self, hint: str) -> str:
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-") or "schema"
        name, index = base, 1
        while name in self.rules or name in _PRIMITIVES:
            index += 1
            name = f"{base}-{index}"
        self.rules[name] = ""
        return name

    def add(self, hint: str, body: str) -> str:
        """A rule with ``body`` (reused when one with the same body exists); returns its name."""
        if re.fullmatch(r"[a-zA-Z0-9-]+", body):
            return body
        if body not in self.by_body:
            name = hint if hint == self.root_name and self.rules[hint] == "" else self.name_for(hint)
            self.rules[name] = body
            self.by_body[body] = name
        return self.by_body[body]

    def primitive(self, name: str) -> str:
        if not self.rules.get(name):
            self.rules[name] = _PRIMITIVES[name]
            for needed in _PRIMITIVE_NEEDS.get(name, ()):
                self.primitive(needed)
        return name

    def warn(self, pointer: str, message: str, keyword: str) -> None:
        if self.strict:
            raise SchemaError(message + " (strict mode refuses a widened grammar)", pointer, keyword)
        self.warnings.append(f"JSON schema at {pointer}: {message}")

    # -- schemas ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def deeper(self, ptr: str) -> Iterator[None]:
        """One level of nesting; past MAX_SCHEMA_DEPTH a SchemaError (not Python's RecursionError)."""
        if self.depth >= MAX_SCHEMA_DEPTH:
            raise SchemaError(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep (the limit)", ptr)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def visit(self, schema: Any, ptr: str, hint: str) -> str:
        """A GBNF expression (usually a rule name) for the instances of ``schema``."""
        with self.deeper(ptr):
            return self.visit_here(schema, ptr, hint)

    def visit_here(self, schema: Any, ptr: str, hint: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise SchemaError("the schema 'false' matches nothing", ptr)
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or a boolean, got {type(schema).__name__}", ptr)
        self.check_keywords(schema, ptr)
        active = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        if "$ref" in active:
            if len(active) == 1:
                return self.ref(active["$ref"], ptr)
            return self.visit(self.merge([active], ptr), ptr, hint)
        if "allOf" in active:
            return self.visit(self.merge([active], ptr), ptr, hint)
        for key in ("anyOf", "oneOf"):
            if key in active:
                return self.alternatives(active, key, ptr, hint)
        if "const" in active or "enum" in active:
            return self.enum(active, ptr, hint)
        kinds = self.types(active, ptr)
        alternatives = [self.typed(kind, active, ptr, f"{hint}-{kind}" if len(kinds) > 1 else hint) for kind in kinds]
        return self.add(hint, " | ".join(alternatives))

    def check_keywords(self, schema: dict[str, Any], ptr: str) -> None:
        for key, value in schema.items():
            if key in _HANDLED or key in ANNOTATIONS or key.startswith("x-"):
                continue
            if key in ("$dynamicRef", "$recursiveRef"):
                raise SchemaError(f"'{key}' is not supported; use a local '$ref'", _pointer(ptr, key), key)
            if key in WIDENING:
                if self.keyword_is_noop(key, value, schema):
                    continue
                self.warn(_pointer(ptr, key), f"'{key}' is not enforced by the grammar ({WIDENING[key]})", key)
            else:
                self.warn(_pointer(ptr, key), f"unknown keyword '{key}' ignored (check its spelling)", key)

    @staticmethod
    def keyword_is_noop(key: str, value: Any, schema: dict[str, Any]) -> bool:
        if key == "uniqueItems":
            return value is False
        if key == "minProperties":
            return isinstance(value, int) and value <= len(set(schema.get("required", [])))
        if key == "maxProperties":  # exact when nothing optional is declared: the extras are then counted
            declared = set(schema.get("properties", {})) | set(schema.get("required", []))
            return isinstance(value, int) and value >= 0 and (
                (schema.get("additionalProperties") is False and len(declared) <= value)
                or declared <= set(schema.get("required", [])))
        if key == "multipleOf":
            return value == 1 and schema.get("type") == "integer"
        return False

    def types(self, schema: dict[str, Any], ptr: str) -> list[str]:
        declared = schema.get("type")
        if declared is None:
            kinds = [kind for kind, keys in _TYPE_KEYWORDS.items() if keys & schema.keys()]
            if not kinds:
                return ["value"]
        else:
            kinds = [declared] if isinstance(declared, str) else declared
            if not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds):
                raise SchemaError("'type' must be a type name or a non-empty list of them", _pointer(ptr, "type"), "type")
            for kind in kinds:
                if kind not in _TYPES:
                    raise SchemaError(f"unknown type {kind!r} (types: {', '.join(_TYPES)})", _pointer(ptr, "type"), "type")
        if schema.get("nullable") is True and "null" not in kinds:
            kinds = [*kinds, "null"]
        return list(dict.fromkeys(kinds))

    def typed(self, kind: str, schema: dict[str, Any], ptr: str, hint: str) -> str:
        if kind in ("value", "null", "boolean"):
            return self.primitive(kind)
        if kind == "string":
            return self.string(schema, ptr, hint)
        if kind in ("number", "integer"):
            return self.number(schema, ptr, hint, kind == "integer")
        if kind == "object":
            return self.object(schema, ptr, hint)
        return self.array(schema, ptr, hint)

    def ref(self, ref: Any, ptr: str) -> str:
        if ref not in self.ref_rules:
            target = self.resolve(ref, ptr)
            name = self.name_for(ref.rsplit("/", 1)[-1])
            self.ref_rules[ref] = name
            self.rules[name] = self.visit(target, ref, name)
        return self.ref_rules[ref]

    def resolve(self, ref: Any, ptr: str) -> Any:
        where = _pointer(ptr, "$ref")
        if not isinstance(ref, str):
            raise SchemaError("'$ref' must be a string", where, "$ref")
        if not ref.startswith("#"):
            raise SchemaError(f"remote $ref {ref!r} is not supported: only local references ('#/...') are resolved; "
                              "inline the schema or move it under '$defs'", where, "$ref")
        node = self.root
        path = urllib.parse.unquote(ref[1:])
        for part in path.split("/")[1:] if path else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise SchemaError(f"$ref {ref!r} points nowhere (no {part!r})", where, "$ref")
        return node

    # -- combinations ----------------------------------------------------------------------------
    def alternatives(self, schema: dict[str, Any], key: str, ptr: str, hint: str) -> str:
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"'{key}' must be a non-empty list of schemas", _pointer(ptr, key), key)
        siblings = {k: v for k, v in schema.items() if k != key}
        # Siblings apply to every branch; without them a branch is visited as written (a $ref stays a rule).
        merged = [self.merge([siblings, b], ptr) for b in branches] if siblings or key == "oneOf" else branches
        options = [self.visit(merged[i] if siblings else branch, _pointer(ptr, key, i), f"{hint}-{i}")
                   for i, branch in enumerate(branches)]
        if key == "oneOf" and not self.disjoint(merged):
            self.warn(_pointer(ptr, key), "'oneOf' branches may overlap; the grammar allows an instance that "
                      "matches several (use 'anyOf', or give each branch a distinct 'type' or 'const')", key)
        return self.add(hint, " | ".join(dict.fromkeys(options)))

    def disjoint(self, branches: list[dict[str, Any]]) -> bool:
        """True when no instance can match two branches: distinct types, or distinct constants somewhere."""
        def type_set(branch: dict[str, Any]) -> set[str] | None:
            declared = branch.get("type")
            if declared is None:
                return None
            kinds = {declared} if isinstance(declared, str) else set(declared)
            return kinds | ({"number"} if "integer" in kinds else set()) | ({"integer"} if "number" in kinds else set())

        def constants(branch: dict[str, Any]) -> dict[str, set[str]]:
            out = {}
            for name, sub in branch.get("properties", {}).items():
                if isinstance(sub, dict) and ("const" in sub or "enum" in sub) and name in branch.get("required", []):
                    out[name] = {_compact(v) for v in ([sub["const"]] if "const" in sub else sub["enum"])}
            return out

        for i, first in enumerate(branches):
            for second in branches[i + 1:]:
                a, b = type_set(first), type_set(second)
                if a is not None and b is not None and not a & b:
                    continue
                if "const" in first and "const" in second and first["const"] != second["const"]:
                    continue
                ca, cb = constants(first), constants(second)
                if any(name in cb and not ca[name] & cb[name] for name in ca):
                    continue
                return False
        return True

    def merge(self, schemas: Iterable[Any], ptr: str) -> dict[str, Any]:
        """One schema equivalent to all of ``schemas`` (allOf), with local $refs resolved."""
        out: dict[str, Any] = {}
        for schema in schemas:
            for flat in self.flatten(schema, ptr):
                self.merge_into(out, flat, ptr)
        return out

    def flatten(self, schema: Any, ptr: str) -> list[dict[str, Any]]:
        with self.deeper(ptr):
            return self.flatten_here(schema, ptr)

    def flatten_here(self, schema: Any, ptr: str) -> list[dict[str, Any]]:
        if schema is True:
            return []
        if schema is False:
            raise SchemaError("'allOf' includes the schema 'false', which matches nothing", ptr, "allOf")
        if not isinstance(schema, dict):
            raise SchemaError(f"a schema must be an object or a boolean, got {type(schema).__name__}", ptr)
        schema = {k: v for k, v in schema.items() if k not in ANNOTATIONS}
        parts: list[dict[str, Any]] = []
        if "$ref" in schema:
            ref = schema.pop("$ref")
            if ref in self.merging:
                raise SchemaError(f"$ref {ref!r} refers to itself inside 'allOf'; the grammar cannot merge a "
                                  "recursive schema", ptr, "$ref")
            self.merging.append(ref)
            try:
                parts.extend(self.flatten(self.resolve(ref, ptr), ref))
            finally:
                self.merging.pop()
        branches = schema.pop("allOf", [])
        if not isinstance(branches, list):
            raise SchemaError("'allOf' must be a list of schemas", _pointer(ptr, "allOf"), "allOf")
        for index, branch in enumerate(branches):
            parts.extend(self.flatten(branch, _pointer(ptr, "allOf", index)))
        return [schema, *parts]

    def merge_into(self, out: dict[str, Any], schema: dict[str, Any], ptr: str) -> None:
        # additionalProperties: false in one part forbids the keys that part does not declare.
        for closed, other in ((out, schema), (schema, out)):
            if closed.get("additionalProperties") is False and "properties" in other:
                allowed = closed.get("properties", {})
                for name in other.get("required", []):
                    if name not in allowed:
                        raise SchemaError(f"'allOf' requires property {name!r}, which another part forbids with "
                                          "additionalProperties: false", ptr, "allOf")
                other["properties"] = {k: v for k, v in other["properties"].items() if k in allowed}
        for key, value in schema.items():
            if key not in out:
                out[key] = value
            elif out[key] != value:
                out[key] = self.merge_keyword(key, out[key], value, ptr)

    def merge_keyword(self, key: str, a: Any, b: Any, ptr: str) -> Any:
        if key == "type":
            first, second = ({x} if isinstance(x, str) else set(x) for x in (a, b))
            covered = [kinds | {"integer"} if "number" in kinds else kinds for kinds in (first, second)]
            both = covered[0] & covered[1]  # every integer is a number
            if not both:
                raise SchemaError(f"'allOf' needs types {sorted(first)} and {sorted(second)} at once", ptr, "type")
            return sorted(both - {"integer"} if "number" in both else both)
        if key == "properties":
            return {**a, **b, **{k: {"allOf": [a[k], b[k]]} for k in a.keys() & b.keys()}}
        if key == "required":
            return list(dict.fromkeys([*a, *b]))
        if key in ("minimum", "exclusiveMinimum", "minLength", "minItems", "minProperties"):
            return max(a, b)
        if key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems", "maxProperties"):
            return min(a, b)
        if key in ("additionalProperties", "items"):
            if a is False or b is False:
                return False
            return b if a is True else a if b is True else {"allOf": [a, b]}
        if key in ("enum", "const"):
            values_a = [a] if key == "const" else a
            common = [v for v in values_a if _compact(v) in {_compact(w) for w in ([b] if key == "const" else b)}]
            if not common:
                raise SchemaError(f"'allOf' has no value common to its '{key}' lists", ptr, key)
            return common[0] if key == "const" else common
        raise SchemaError(f"'allOf' combines two different '{key}' values, which the grammar cannot intersect", ptr, key)

    # -- values ----------------------------------------------------------------------------------
    def enum(self, schema: dict[str, Any], ptr: str, hint: str) -> str:
        key = "const" if "const" in schema else "enum"
        values = [schema["const"]] if key == "const" else schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError("'enum' must be a non-empty list", _pointer(ptr, key), key)
        if "type" in schema:
            allowed = set(self.types(schema, ptr))
            values = [v for v in values if _json_type(v) & allowed]
            if not values:
                raise SchemaError(f"no '{key}' value has the type {schema['type']!r}", _pointer(ptr, key), key)
        others = set(schema) - {"type", "enum", "const", "nullable"}
        if others:
            self.warn(_pointer(ptr, key), f"the '{key}' values are not checked against {sorted(others)}", key)
        return self.add(hint, " | ".join(dict.fromkeys(literal(_compact(v)) for v in values)))

    def length(self, schema: dict[str, Any], ptr: str, low_key: str, high_key: str) -> tuple[int, int | None]:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise SchemaError(f"'{key}' must be a non-negative integer, got {value!r}", _pointer(ptr, key), key)
        if high is not None and high < low:
            raise SchemaError(f"'{low_key}' {low} is above '{high_key}' {high}: nothing matches", ptr, low_key)
        if low > MAX_REPETITIONS:
            raise SchemaError(f"'{low_key}' {low} is above llama.cpp's repetition limit of {MAX_REPETITIONS}",
                              _pointer(ptr, low_key), low_key)
        if high is not None and high > MAX_REPETITIONS:
            self.warn(_pointer(ptr, high_key), f"'{high_key}' {high} is above llama.cpp's repetition limit of "
                      f"{MAX_REPETITIONS}; the grammar does not bound the length", high_key)
            high = None
        return low, high

    def string(self, schema: dict[str, Any], ptr: str, hint: str) -> str:
        low, high = self.length(schema, ptr, "minLength", "maxLength")
        pattern, fmt = schema.get("pattern"), schema.get("format")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise SchemaError("'pattern' must be a string", _pointer(ptr, "pattern"), "pattern")
            try:
                content = pattern_to_gbnf(pattern, self.dotall)
            except PatternError as err:
                raise SchemaError(f"pattern {pattern!r}: {err}", _pointer(ptr, "pattern"), "pattern") from None
            ignored = [k for k in ("minLength", "maxLength", "format") if k in schema]
        elif fmt is not None and fmt in FORMATS:
            content = self.primitive(f"format-{fmt}")
            ignored = [k for k in ("minLength", "maxLength") if k in schema]
        else:
            if fmt is not None:
                self.warn(_pointer(ptr, "format"), f"format {fmt!r} is not enforced (known: {', '.join(FORMATS)})",
                          "format")
            if (low, high) == (0, None):
                return self.primitive("string")
            content = _repeat(self.primitive("json-char"), low, high)
            ignored = []
        for key in ignored:
            self.warn(_pointer(ptr, key), f"'{key}' is not enforced next to "
                      f"{'pattern' if pattern is not None else 'format'}", key)
        return self.add(hint, f'"\\"" {content} "\\""' if content else '"\\"\\""')

    def bound(self, schema: dict[str, Any], ptr: str, key: str) -> Decimal | None:
        value = schema.get(key)
        if value is None or isinstance(value, bool) and key.startswith("exclusive"):
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SchemaError(f"'{key}' must be a finite number, got {value!r}", _pointer(ptr, key), key)
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)

    def number(self, schema: dict[str, Any], ptr: str, hint: str, integer: bool) -> str:
        lo, hi = self.bound(schema, ptr, "minimum"), self.bound(schema, ptr, "maximum")
        lo_strict = hi_strict = False
        for key, is_low in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
            value = schema.get(key)
            if isinstance(value, bool):  # draft 4: a flag on minimum / maximum
                lo_strict, hi_strict = (value, hi_strict) if is_low else (lo_strict, value)
                continue
            bound = self.bound(schema, ptr, key)
            if bound is None:
                continue
            if is_low and (lo is None or bound >= lo):
                lo, lo_strict = bound, True
            elif not is_low and (hi is None or bound <= hi):
                hi, hi_strict = bound, True
        if lo is None and hi is None:
            return self.primitive("integer" if integer else "number")
        if integer:
            low = None if lo is None else math.floor(lo) + 1 if lo_strict else math.ceil(lo)
            high = None if hi is None else math.ceil(hi) - 1 if hi_strict else math.floor(hi)
            body = integer_range(low, high)
        else:
            body = number_range(lo, hi, lo_strict, hi_strict)
        if body is None:
            raise SchemaError(f"no {'integer' if integer else 'number'} lies between the bounds", ptr, "minimum")
        return self.add(hint, body)

    def object(self, schema: dict[str, Any], ptr: str, hint: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        extra = schema.get("additionalProperties", True)
        if not isinstance(properties, dict):
            raise SchemaError("'properties' must be an object", _pointer(ptr, "properties"), "properties")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise SchemaError("'required' must be a list of property names", _pointer(ptr, "required"), "required")
        declared = {name: sub for name, sub in properties.items()}
        for name in required:
            if name not in declared:
                if extra is False:
                    raise SchemaError(f"property {name!r} is required but additionalProperties is false and "
                                      "'properties' does not declare it", _pointer(ptr, "required"), "required")
                declared[name] = extra if isinstance(extra, dict) else {}
        rank = {name: index for index, name in enumerate(declared)}
        ordered = sorted(declared, key=lambda n: (self.prop_order.get(n, len(self.prop_order)), rank[n]))
        members = []
        for name in ordered:
            sub = declared[name]
            if sub is False:
                if name in required:
                    raise SchemaError(f"property {name!r} is required but its schema is false",
                                      _pointer(ptr, "properties", name), "required")
                continue
            value = self.visit(sub, _pointer(ptr, "properties", name), f"{hint}-{name}")
            ws = self.primitive("ws")
            members.append((f'{literal(_compact(name))} {ws} ":" {ws} {value} {ws}', name in required))
        extra_member = None
        # maxProperties bounds the additional properties (past the required ones), so none can run on forever.
        most = schema.get("maxProperties")
        room = max(0, most - len(set(required))) if isinstance(most, int) and not isinstance(most, bool) else None
        if extra is not False and room != 0:
            value = self.visit(extra, _pointer(ptr, "additionalProperties"), f"{hint}-additional")
            key = self.add(f"{hint}-additional-key", self.key_except(set(declared)))
            extra_member = self.add(f"{hint}-additional-kv", f'{key} ws ":" ws {value} ws')
        body = self.members(members, extra_member, hint, room)
        return self.add(hint, _sequence('"{"', self.primitive("ws"), body, '"}"'))

    def members(self, members: list[tuple[str, bool]], extra: str | None, hint: str, room: int | None = None) -> str:
        """The members: each ends with ws, all but the first of the object start with a comma; at most ``room``
        additional properties (None: any number).

        Built from the last one back: ``following`` is what may come after a member (every part starts with
        a comma), ``from_here`` the members from this one on when none came before. Every
        ``_MEMBERS_PER_RULE`` members both become rules, so that a long object gives neither parentheses
        nested once per optional member nor a grammar quadratic in their number.
        """
        following = from_here = ""
        if extra is not None:
            if room is None:
                following = f"({_COMMA} {extra})*"
                from_here = f"({extra} {following})?"
            else:
                following = f"({_COMMA} {extra}){{0,{room}}}"
                from_here = f"({extra} ({_COMMA} {extra}){{0,{room - 1}}})?" if room > 1 else f"({extra})?"
        for index in range(len(members) - 1, -1, -1):
            member, is_required = members[index]
            taken = f"{member} {following}".strip()
            from_here = taken if is_required else f"({taken} | {from_here or _EMPTY})"
            following = f"{_COMMA} {member} {following}" if is_required else f"({_COMMA} {member})? {following}"
            following = following.strip()
            if index and index % _MEMBERS_PER_RULE == 0:
                following, from_here = self.add(f"{hint}-rest", following), self.add(f"{hint}-from", from_here)
        return from_here

    def key_except(self, names: set[str]) -> str:
        """A key with no escapes that is none of ``names`` (those are declared properties)."""
        self.primitive("key-char")
        trie: dict[str, Any] = {}
        for name in names:
            node = trie
            for char in name:
                node = node.setdefault(char, {})
            node[""] = {}

        def after(node: dict[str, Any]) -> str:
            """Having read a prefix of some names (``node`` in the trie): the rest of the key and its quote."""
            options = [] if "" in node else ['"\\""']  # ending here is fine unless the prefix is a name
            children = [c for c in node if c and c not in '"\\' and ord(c) >= 0x20]
            other = char_class(_KEY_EXCLUDED + [(ord(c), ord(c)) for c in children], negated=True) \
                if children else "key-char"
            options.append(f'{other} key-char* "\\""')
            options.extend(f"{literal(c)} {after(node[c])}" for c in children)
            return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

        return f'"\\"" {after(trie)}'

    def array(self, schema: dict[str, Any], ptr: str, hint: str) -> str:
        items, prefix = schema.get("items"), schema.get("prefixItems", [])
        if isinstance(items, list):  # draft 4-2019 tuple form
            prefix, rest, rest_key = items, schema.get("additionalItems", True), "additionalItems"
        else:
            rest, rest_key = (True if items is None else items), "items"
        if not isinstance(prefix, list):
            raise SchemaError("'prefixItems' must be a list of schemas", _pointer(ptr, "prefixItems"), "prefixItems")
        low, high = self.length(schema, ptr, "minItems", "maxItems")
        if high is not None and high < len(prefix):
            prefix = prefix[:high]
        prefix_key = "items" if isinstance(items, list) else "prefixItems"
        elements = [self.visit(sub, _pointer(ptr, prefix_key, i), f"{hint}-{i}") for i, sub in enumerate(prefix)]
        count = len(elements)
        if rest is False and low > count:
            raise SchemaError(f"'minItems' {low} needs more items than the {count} that '{prefix_key}' allows",
                              _pointer(ptr, "minItems"), "minItems")
        ws = self.primitive("ws")
        tail = ""
        if rest is not False and (high is None or high > count):
            element = self.visit(rest, _pointer(ptr, rest_key), f"{hint}-item")
            more_low, more_high = max(0, low - count), None if high is None else high - count
            if count:
                tail = _repeat(f"{_COMMA} {element} {ws}", more_low, more_high)
            else:
                repeated = _repeat(f"{_COMMA} {element} {ws}", max(0, more_low - 1),
                                   None if more_high is None else more_high - 1)
                tail = f"{element} {ws} {repeated}".strip()
                tail = tail if more_low > 0 else f"({tail})?"
        body = tail
        for index in range(count - 1, -1, -1):
            part = f"{_COMMA + ' ' if index else ''}{elements[index]} {ws} {body}".strip()
            body = f"({part})?" if index >= low else part
        return self.add(hint, _sequence('"["', ws, body, '"]"'))


def _sequence(*parts: str) -> str:
    return " ".join(part for part in parts if part)


def _order(prop_order: Sequence[str] | Mapping[str, int] | None) -> dict[str, int]:
    if prop_order is None:
        return {}
    if isinstance(prop_order, Mapping):
        if not all(isinstance(k, str) and isinstance(v, int) for k, v in prop_order.items()):
            raise GrammarError("Failed to initialize sampling: prop_order must map property names to integers")
        return dict(prop_order)
    if isinstance(prop_order, (list, tuple)) and all(isinstance(k, str) for k in prop_order):
        return {name: index for index, name in enumerate(prop_order)}
    raise GrammarError("Failed to initialize sampling: prop_order must be a list of property names "
                       "or a mapping of names to positions")


def convert_json_schema_to_grammar(schema: Any, prop_order: Sequence[str] | Mapping[str, int] | None = None,
                                   dotall: bool = False, *, strict: bool = False, root_name: str = "root") -> str:
    """GBNF whose language is the JSON instances of ``schema`` (a dict, a bool, or JSON text).

    ``prop_order`` puts these properties first, in this order (a list, or llama.cpp's name -> position
    mapping); ``dotall`` lets ``.`` in patterns match line breaks. Raises ``SchemaError`` for what the
    grammar cannot honour; warns (``LlamaCompatWarning``) where a keyword is dropped, or raises with ``strict``.
    With ``root_name``, the schema's rule gets that name and no ``root`` rule is written, so the
    text can be embedded in a larger grammar that defines ``root`` itself.
    """
    if not isinstance(schema, (str, bytes)):
        try:
            schema = json.dumps(schema, sort_keys=False)
        except (TypeError, ValueError) as err:
            raise SchemaError(f"the schema is not JSON data: {err}", "#") from None
        except RecursionError:
            raise SchemaError(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep (the limit)", "#") from None
    order = _order(prop_order)
    text, dropped = _convert(schema, tuple(order.items()), dotall, strict, root_name)
    for message in dropped:
        compat_warning(message)
    return text


@functools.lru_cache(maxsize=64)
def _convert(schema_text: str | bytes, prop_order: tuple[tuple[str, int], ...], dotall: bool,
             strict: bool, root_name: str) -> tuple[str, tuple[str, ...]]:
    """The grammar and the warnings for one schema, cached: apps send the same schema with every request."""
    try:
        schema = json.loads(schema_text)
    except ValueError as err:
        raise SchemaError(f"the schema is not valid JSON: {err}", "#") from None
    except RecursionError:
        raise SchemaError(f"the schema nests more than {MAX_SCHEMA_DEPTH} levels deep (the limit)", "#") from None
    converter = _Converter(schema, dict(prop_order), dotall, strict, root_name)
    root = converter.visit(schema, "#", root_name)
    if root != root_name:
        converter.rules[root_name] = root
    text = "\n".join(f"{name} ::= {body}" for name, body in converter.rules.items() if body) + "\n"
    try:
        parse_gbnf(text if root_name == "root" else f"root ::= {root_name}\n{text}")
    except GbnfError as err:
        problem = "it refers to itself without any text in between" if "left recursion" in err.problem else err.problem
        raise SchemaError(f"no grammar can express this schema: {problem}", "#") from None
    return text, tuple(dict.fromkeys(converter.warnings))  # a merged schema can repeat a sibling's warning
