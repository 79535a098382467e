"""Checks that a `response_format` JSON schema is one the engine's grammar can be
built from, so that a bad schema is a 400 naming what is wrong instead of an engine
failure."""

from __future__ import annotations

import math
import re
from typing import Any

_JSON_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


_SCHEMA_ONE = (
    "additionalProperties",
    "additionalItems",
    "not",
    "contains",
    "propertyNames",
    "if",
    "then",
    "else",
    "unevaluatedProperties",
    "unevaluatedItems",
)


_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")


_COUNTS = (
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "minContains",
    "maxContains",
)


_BOUNDS = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minimum", "maximum"),
)


_MAX_SCHEMA_NODES = 5000


_MAX_SCHEMA_DEPTH = 64


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_json_schema(schema: Any) -> None:
    """Refuse a JSON schema the structured-output grammar cannot be built from.

    A structural check (types, references, bounds, regular expressions), so a
    malformed schema is a 400 naming the spot instead of a failed generation.
    """
    nodes = 0

    def resolve(ref: str, where: str) -> None:
        if not ref.startswith("#"):
            raise ValueError(f"{where}: only local references ('#/...') are supported")
        node: Any = schema
        for token in ref[1:].split("/")[1:] if ref != "#" else []:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise ValueError(f"{where}: the reference '{ref}' does not resolve")
        if not isinstance(node, dict | bool):
            raise ValueError(f"{where}: the reference '{ref}' is not a schema")

    def walk(node: Any, where: str, depth: int) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > _MAX_SCHEMA_NODES or depth > _MAX_SCHEMA_DEPTH:
            raise ValueError("the schema is too large or too deeply nested")
        if isinstance(node, bool):
            return
        if not isinstance(node, dict):
            raise ValueError(f"{where}: a schema must be an object or a boolean")
        kind = node.get("type")
        if kind is not None:
            kinds = kind if isinstance(kind, list) else [kind]
            if not kinds or any(not isinstance(k, str) or k not in _JSON_TYPES for k in kinds):
                raise ValueError(f"{where}.type: {kind!r} is not a JSON schema type")
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str):
                raise ValueError(f"{where}.$ref must be a string")
            resolve(ref, f"{where}.$ref")
        for key in _SCHEMA_MAPS:
            if key in node:
                children = node[key]
                if not isinstance(children, dict):
                    raise ValueError(f"{where}.{key} must be an object")
                for name, child in children.items():
                    if key == "patternProperties":
                        _check_regex(name, f"{where}.{key}")
                    walk(child, f"{where}.{key}.{name}", depth + 1)
        for key in _SCHEMA_ONE:
            if key in node:
                walk(node[key], f"{where}.{key}", depth + 1)
        if "items" in node:
            items = node["items"]
            for k, child in enumerate(items) if isinstance(items, list) else [(None, items)]:
                walk(child, f"{where}.items" + ("" if k is None else f"[{k}]"), depth + 1)
        for key in _SCHEMA_LISTS:
            if key in node:
                children = node[key]
                if not isinstance(children, list) or not children:
                    raise ValueError(f"{where}.{key} must be a non-empty list of schemas")
                for k, child in enumerate(children):
                    walk(child, f"{where}.{key}[{k}]", depth + 1)
        if "enum" in node and (not isinstance(node["enum"], list) or not node["enum"]):
            raise ValueError(f"{where}.enum must be a non-empty list")
        required = node.get("required")
        if required is not None and (
            not isinstance(required, list) or not all(isinstance(r, str) for r in required)
        ):
            raise ValueError(f"{where}.required must be a list of property names")
        for key in _COUNTS:
            value = node.get(key)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 0
            ):
                raise ValueError(f"{where}.{key} must be a non-negative integer")
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"):
            if key in node and not _is_number(node[key]):
                raise ValueError(f"{where}.{key} must be a number")
        if "multipleOf" in node and node["multipleOf"] <= 0:
            raise ValueError(f"{where}.multipleOf must be positive")
        for low, high in _BOUNDS:
            if _is_number(node.get(low)) and _is_number(node.get(high)) and node[low] > node[high]:
                raise ValueError(f"{where}: {low} is larger than {high}")
        if _empty_range(node):
            raise ValueError(f"{where}: no number fits the minimum and maximum")
        if "pattern" in node:
            _check_regex(node["pattern"], f"{where}.pattern")
        if "format" in node and not isinstance(node["format"], str):
            raise ValueError(f"{where}.format must be a string")

    walk(schema, "schema", 0)


def _empty_range(node: dict[str, Any]) -> bool:
    """Whether the numeric bounds of `node` admit no value."""
    bounds: dict[str, Any] = {
        k: node.get(k) for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
    }
    if not any(_is_number(v) for v in bounds.values()):
        return False
    if node.get("type") == "integer":
        lows = [math.ceil(bounds["minimum"])] if _is_number(bounds["minimum"]) else []
        if _is_number(bounds["exclusiveMinimum"]):
            lows.append(math.floor(bounds["exclusiveMinimum"]) + 1)
        highs = [math.floor(bounds["maximum"])] if _is_number(bounds["maximum"]) else []
        if _is_number(bounds["exclusiveMaximum"]):
            highs.append(math.ceil(bounds["exclusiveMaximum"]) - 1)
        return bool(lows and highs) and max(lows) > min(highs)
    for low_key, low_open in (("minimum", False), ("exclusiveMinimum", True)):
        for high_key, high_open in (("maximum", False), ("exclusiveMaximum", True)):
            low, high = bounds[low_key], bounds[high_key]
            if (
                _is_number(low)
                and _is_number(high)
                and (low > high or (low == high and (low_open or high_open)))
            ):
                return True
    return False


def _check_regex(pattern: Any, where: str) -> None:
    if not isinstance(pattern, str):
        raise ValueError(f"{where} must be a string")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{where}: invalid regular expression ({exc})") from None
    if re.search(r"\(\?[=!]|\(\?<[=!]|\(\?P=|\\[1-9]|\\k<", pattern):
        raise ValueError(f"{where}: lookarounds and backreferences are not supported")
