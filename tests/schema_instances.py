"""Helpers for the schema property tests: ECMA-262 pattern validation and the converter's canonical JSON form."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Any

import jsonschema

# ECMA-262 meanings of the escapes Python's re reads differently (Python's are Unicode-aware, and its
# '$' also matches before a final newline).
_ECMA_SPACE = "\\t\\n\\x0b\\x0c\\r \\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000\\ufeff"
_IN_CLASS = {"d": "0-9", "w": "A-Za-z0-9_", "s": _ECMA_SPACE}
_OUTSIDE = {"d": "[0-9]", "D": "[^0-9]", "w": "[A-Za-z0-9_]", "W": "[^A-Za-z0-9_]", "s": f"[{_ECMA_SPACE}]",
            "S": f"[^{_ECMA_SPACE}]"}


def ecma_to_python(pattern: str) -> str:
    out, in_class, index = [], False, 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            escaped = pattern[index + 1]
            if in_class and escaped in _IN_CLASS:
                out.append(_IN_CLASS[escaped])
            elif not in_class and escaped in _OUTSIDE:
                out.append(_OUTSIDE[escaped])
            else:
                out.append(char + escaped)
            index += 2
            continue
        if char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class and out and out[-1] not in ("[", "[^"):
            in_class = False
        elif char == "." and not in_class:
            char = "[^\\n\\r\\u2028\\u2029]"
        elif char == "$" and not in_class:
            char = "\\Z"
        out.append(char)
        index += 1
    return "".join(out)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any):
    if isinstance(instance, str) and not re.search(ecma_to_python(pattern), instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


def is_valid(instance: Any, schema: Any, root: Any = None) -> bool:
    """jsonschema's verdict under the schema's own draft (2020-12 by default), formats checked, patterns as
    ECMA-262, and OpenAPI's ``nullable``. ``schema`` may be a part of ``root``, the document its $refs name."""
    root = schema if root is None else root
    base = jsonschema.validators.validator_for(root, default=jsonschema.Draft202012Validator)
    check_type = base.VALIDATORS["type"]

    def nullable_type(validator: Any, types: Any, instance: Any, schema: Any):
        if not (instance is None and schema.get("nullable") is True):
            yield from check_type(validator, types, instance, schema)

    validator = jsonschema.validators.extend(base, {"pattern": _ecma_pattern, "type": nullable_type})
    return validator(root, format_checker=base.FORMAT_CHECKER).evolve(schema=schema).is_valid(instance)


# -- the converter's canonical form -----------------------------------------------------------------------


class OutsideLanguage(Exception):
    """The instance is valid but outside the grammar's documented conventions (README, "Grammars")."""


def _resolve(schema: Any, root: Any) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        target = root
        for part in schema["$ref"][2:].split("/") if schema["$ref"] != "#" else []:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        rest = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {"allOf": [target, rest]} if rest else target
    return schema


def _merged_properties(schema: Any, root: Any) -> tuple[list[str], dict[str, Any], Any]:
    """Declared property names in grammar order, their schemas, and the schema of extra properties."""
    schema = _resolve(schema, root)
    if not isinstance(schema, dict):
        return [], {}, True
    names: list[str] = []
    subs: dict[str, Any] = {}
    extra: Any = schema.get("additionalProperties", True)
    for part in [schema, *schema.get("allOf", [])]:
        part = _resolve(part, root)
        if part is not schema and isinstance(part, dict):
            inner_names, inner_subs, inner_extra = _merged_properties(part, root)
            extra = False if inner_extra is False or extra is False else extra
        else:
            inner_names = list(part.get("properties", {})) + [r for r in part.get("required", [])
                                                              if r not in part.get("properties", {})]
            inner_subs = dict(part.get("properties", {}))
        for name in inner_names:
            if name not in names:
                names.append(name)
            subs.setdefault(name, inner_subs.get(name, {}))
    return names, subs, extra


def _branch(schema: dict[str, Any], value: Any, root: Any) -> Any:
    for key in ("anyOf", "oneOf"):
        if key in schema:
            siblings = {k: v for k, v in schema.items() if k != key}
            for branch in schema[key]:
                candidate = {"allOf": [siblings, branch]} if siblings else branch
                if is_valid(value, candidate, root):
                    return candidate
    return schema


def _number(value: float | int) -> str:
    if isinstance(value, int):
        text = str(value)
    else:
        text = format(Decimal(repr(value)), "f")
    whole, _, fraction = text.lstrip("-").partition(".")
    if len(whole) > 16 or len(fraction) > 19:
        raise OutsideLanguage(f"{text} has more digits than the grammar writes")
    return text


_KEYWORD_TYPES = {"properties": dict, "required": dict, "additionalProperties": dict, "items": list, "prefixItems": list,
                  "minItems": list, "maxItems": list, "minLength": str, "maxLength": str, "pattern": str, "format": str,
                  "minimum": (int, float), "maximum": (int, float)}


def _declares(schema: Any, kind: str) -> bool:
    declared = schema.get("type") if isinstance(schema, dict) else None
    return declared == kind or (isinstance(declared, list) and kind in declared)


def _check_inferred_type(value: Any, schema: Any) -> None:
    """A schema without 'type' takes its types from its keywords (README, "Grammars")."""
    if not isinstance(schema, dict) or "type" in schema or "anyOf" in schema or "oneOf" in schema:
        return
    kinds = {_KEYWORD_TYPES[k] for k in schema if k in _KEYWORD_TYPES}
    if kinds and not (isinstance(value, tuple(t for k in kinds for t in (k if isinstance(k, tuple) else (k,))))
                      and not isinstance(value, bool)):
        raise OutsideLanguage(f"{value!r} does not have the type the schema's keywords imply")


def canonical(value: Any, schema: Any, root: Any, prop_order: tuple[str, ...] = (), indent: bool = False) -> str:
    """``value`` written the way the grammar writes it: properties in grammar order, plain decimals."""
    newline = "\n" if indent else ""

    def write(value: Any, schema: Any, depth: int) -> str:
        schema = _resolve(schema, root)
        if isinstance(schema, dict):
            schema = _resolve(_branch(schema, value, root), root)
        pad = newline + "  " * (depth + 1) if indent else ""
        end = newline + "  " * depth if indent else ""
        _check_inferred_type(value, schema)
        if isinstance(value, bool) or value is None:
            return json.dumps(value)
        if isinstance(schema, dict) and ("enum" in schema or "const" in schema):  # the schema's own spelling
            options = [schema["const"]] if "const" in schema else schema["enum"]
            same = [o for o in options if o == value and type(o) is type(value)] or [o for o in options if o == value]
            return json.dumps(same[0], ensure_ascii=False, separators=(",", ":"))
        if isinstance(value, float) and value.is_integer() and _declares(schema, "integer"):
            value = int(value)
        if isinstance(value, (int, float)):
            return _number(value)
        if isinstance(value, str):
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, list):
            items = schema.get("items", True) if isinstance(schema, dict) else True
            prefix = schema.get("prefixItems", []) if isinstance(schema, dict) else []
            if isinstance(items, list):
                prefix, items = items, schema.get("additionalItems", True)
            parts = [write(v, prefix[i] if i < len(prefix) else items, depth + 1) for i, v in enumerate(value)]
            return "[" + ",".join(pad + p for p in parts) + (end if parts else "") + "]"
        names, subs, extra = _merged_properties(schema, root)
        rank = {n: i for i, n in enumerate(names)}
        order = {n: i for i, n in enumerate(prop_order)}
        declared = sorted((n for n in value if n in rank), key=lambda n: (order.get(n, len(order)), rank[n]))
        extras = [n for n in value if n not in rank]
        if any(any(c in '"\\' or ord(c) < 0x20 for c in n) for n in extras):
            raise OutsideLanguage("an additional property's key needs escapes")
        parts = [json.dumps(n, ensure_ascii=False) + ": " + write(value[n], subs[n], depth + 1) for n in declared]
        parts += [json.dumps(n, ensure_ascii=False) + ": " + write(value[n], extra, depth + 1) for n in extras]
        return "{" + ",".join(pad + p for p in parts) + (end if parts else "") + "}"

    return write(value, schema, 0)
