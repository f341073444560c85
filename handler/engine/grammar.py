"""JSON Schema -> llama.cpp GBNF, so constrained decoding yields JSON valid against the schema.

The grammar forces json.dumps' default layout (`{"a": 1, "b": [1, 2]}`, keys in `properties`
order): a small model fills a fixed frame far more reliably than it chooses its own whitespace.
The supported subset, and why each limit exists, is in docs/structured-outputs.md.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

# Keywords that say nothing about which values are valid.
ANNOTATIONS = frozenset(
    [
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
        "strict",
    ]
)
_COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_CONSTRAINTS = frozenset(
    [
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "format",
    ]
) | frozenset(_BOUNDS + _COMBINATORS)
_SUPPORTED = ANNOTATIONS | _CONSTRAINTS | {"$defs", "definitions", "nullable"}
_TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")
# A schema without `type` but with these keywords is taken to mean that type (a valid subset).
_IMPLIED_BY = {
    "object": ("properties", "required", "additionalProperties"),
    "array": ("items", "minItems", "maxItems"),
    "string": ("minLength", "maxLength", "format"),
    "number": _BOUNDS,
}
_MAX_DIGITS = 16  # integers are written with at most this many digits (2**53 has 16)

_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})'
_INTEGER = '"-"? ("0" | [1-9] [0-9]{0,15})'
# 20 fraction digits cover every float repr (0.00012345678901234567); exponents as repr writes them.
_NUMBER = _INTEGER + ' ("." [0-9]{1,20})? ([eE] [-+]? [0-9]{1,3})?'
# RFC 3339 shapes (the calendar is not checked: 02-31 passes).
_DATE = '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'
_TIME = (
    '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{1,9})? '
    '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'
)
_UUID = ' "-" '.join(f"[0-9a-f]{{{n}}}" for n in (8, 4, 4, 4, 12))
_FORMATS = {"date": _DATE, "time": _TIME, "date-time": f'{_DATE} "T" {_TIME}', "uuid": _UUID}
_QUOTE = '"\\""'

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9-]+")
_RULE_NAME = re.compile(r"[a-zA-Z0-9-]+")
_LITERAL_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class UnsupportedSchema(ValueError):
    """A schema we cannot enforce. `path` is the dotted location of the offending keyword inside
    the schema, e.g. "properties.age.minimum" ("" for the root)."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


def literal(text: str) -> str:
    """`text` as a GBNF string literal (quoted, escaped: backslash, quote, newlines, control
    chars)."""
    return '"' + "".join(_escape(char) for char in text) + '"'


def _escape(char: str) -> str:
    code = ord(char)
    if char in _LITERAL_ESCAPES:
        return _LITERAL_ESCAPES[char]
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02X}"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate cannot be encoded as UTF-8
        return f"\\u{code:04X}"
    return char


def _join(path: str, *keys: object) -> str:
    return ".".join([path, *map(str, keys)] if path else map(str, keys))


def _dump(value: Any, path: str) -> str:
    """`value` as json.dumps writes it (the layout the grammar forces)."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedSchema(f"{value!r} is not a JSON value", path) from exc


def _alternatives(options: list[str]) -> str:
    """One expression matching any of `options`, safe to place inside a sequence."""
    unique = list(dict.fromkeys(options))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


def _repeat(item: str, low: int, high: int | None) -> str:
    """`item` repeated low..high times (high None: unbounded), in GBNF's own operators."""
    if high is None:
        return {0: f"{item}*", 1: f"{item}+"}.get(low, f"{item}{{{low},}}")
    if (low, high) == (0, 1):
        return f"{item}?"
    if low == high:
        return {0: "", 1: item}.get(low, f"{item}{{{low}}}")
    return f"{item}{{{low},{high}}}"


class GrammarBuilder:
    """Collects GBNF rules; shared primitives (string, number, any value, ...) defined once,
    rule names unique."""

    def __init__(self) -> None:
        self._rules: dict[str, str] = {"root": ""}  # root's body is given to build()
        self._primitives: dict[str, str] = {}

    def schema(self, schema: dict[str, Any], *, name: str = "value", strict: bool = False) -> str:
        """Add rules matching JSON values valid against `schema` (with its $defs); return the
        rule name to reference."""
        if strict:
            check_strict(schema)
        saved = dict(self._rules), dict(self._primitives)
        try:
            rule_name = self._reserve(name)
            body = _SchemaVisitor(self, schema, rule_name).visit(schema, rule_name, "")
        except UnsupportedSchema:
            self._rules, self._primitives = saved  # leave no half-built rules behind
            raise
        self._rules[rule_name] = body
        return rule_name

    def rule(self, name: str, body: str) -> str:
        """Add a named rule with a GBNF body (name made unique if taken); return the name."""
        unique = self._reserve(name)
        self._rules[unique] = body
        return unique

    def build(self, root_body: str) -> str:
        """The grammar text: `root ::= <root_body>` followed by all rules."""
        lines = [f"root ::= {root_body}"]
        lines += [f"{name} ::= {body}" for name, body in self._rules.items() if name != "root"]
        return "\n".join(lines) + "\n"

    def any_object(self) -> str:
        """Rule name for any JSON object."""
        return self._primitive("object", lambda: self._map(self.any_value()))

    def any_value(self) -> str:
        """Rule name for any JSON value."""
        return self._primitive(
            "value",
            lambda: " | ".join(
                [
                    self.any_object(),
                    self._any_array(),
                    self.string(),
                    self.number(),
                    self.boolean(),
                    self.null(),
                ]
            ),
        )

    def string(self) -> str:
        """Rule name for any JSON string."""
        return self._primitive("string", lambda: f"{_QUOTE} {self._char()}* {_QUOTE}")

    def number(self) -> str:
        """Rule name for a JSON number (integers included)."""
        return self._primitive("number", lambda: _NUMBER)

    def integer(self) -> str:
        """Rule name for a JSON integer without leading zeros."""
        return self._primitive("integer", lambda: _INTEGER)

    def boolean(self) -> str:
        """Rule name for true or false."""
        return self._primitive("boolean", lambda: '"true" | "false"')

    def null(self) -> str:
        """Rule name for null."""
        return self._primitive("null", lambda: '"null"')

    def _any_array(self) -> str:
        return self._primitive("array", lambda: _array_body(self.any_value(), 0, None))

    def _char(self) -> str:
        return self._primitive("char", lambda: _CHAR)

    def _string(self, low: int, high: int | None) -> str:
        if (low, high) == (0, None):
            return self.string()
        if high == 0:
            return literal('""')
        return f"{_QUOTE} {_repeat(self._char(), low, high)} {_QUOTE}"

    def _format(self, name: str) -> str:
        return self._primitive(name, lambda: f"{_QUOTE} {_FORMATS[name]} {_QUOTE}")

    def _map(self, value: str) -> str:
        """An object whose keys are any strings and whose values match `value`."""
        pair = f'{self.string()} ": " {value}'
        return f'"{{" ({pair} (", " {pair})*)? "}}"'

    def _primitive(self, key: str, body: Callable[[], str]) -> str:
        # Reserved before the body is built: value, object and array refer to each other.
        if key not in self._primitives:
            self._primitives[key] = self._reserve(key)
            self._rules[self._primitives[key]] = body()
        return self._primitives[key]

    def _reserve(self, name: str) -> str:
        base = _INVALID_NAME_CHARS.sub("-", name).strip("-") or "rule"
        unique, n = base, 2
        while unique in self._rules:
            unique, n = f"{base}-{n}", n + 1
        self._rules[unique] = ""
        return unique

    def _named(self, name: str, expression: str) -> str:
        """`expression` as a rule reference (a new rule unless it already is one)."""
        return expression if _RULE_NAME.fullmatch(expression) else self.rule(name, expression)


def _array_body(item: str, low: int, high: int | None) -> str:
    if high == 0:
        return '"[]"'
    more = _repeat(f'(", " {item})', max(low - 1, 0), None if high is None else high - 1)
    inner = f"{item} {more}".strip()
    return f'"[" {inner} "]"' if low > 0 else f'"[" ({inner})? "]"'


class _SchemaVisitor:
    """Turns one schema (and the definitions its $refs reach) into rules of a builder."""

    def __init__(self, builder: GrammarBuilder, root: Any, root_rule: str) -> None:
        self.builder = builder
        self.root = root
        self.refs: dict[str, str] = {"#": root_rule}  # $ref -> its rule (recursion ends here)
        # Rules entered since the last character written: reaching one again is left
        # recursion, which llama.cpp refuses (and which could never end).
        self.left: set[str] = {root_rule}

    def visit(self, schema: Any, name: str, path: str) -> str:
        """A GBNF expression (safe inside a sequence) for values valid against `schema`."""
        if schema is True:
            return self.builder.any_value()
        if schema is False:
            raise UnsupportedSchema("the schema false matches no value", path)
        if not isinstance(schema, dict):
            raise UnsupportedSchema(
                f"a schema must be an object or a boolean, not {type(schema).__name__}", path
            )
        for key in schema:
            if key not in _SUPPORTED:
                raise UnsupportedSchema(
                    f"JSON Schema keyword {key!r} is not supported", _join(path, key)
                )
        nullable = schema.get("nullable", False)
        if not isinstance(nullable, bool):
            raise UnsupportedSchema("'nullable' must be a boolean", _join(path, "nullable"))
        if nullable:
            rest = {key: value for key, value in schema.items() if key != "nullable"}
            return _alternatives([self.visit(rest, name, path), self.builder.null()])
        for combinator in _COMBINATORS:
            if combinator in schema:
                return self._combinator(schema, combinator, name, path)
        if "enum" in schema or "const" in schema:
            return self._enum(schema, path)
        types = self._types(schema, path)
        if not types:
            return self.builder.any_value()
        return _alternatives([self._typed(kind, schema, name, path) for kind in types])

    def _combinator(self, schema: dict[str, Any], keyword: str, name: str, path: str) -> str:
        where = _join(path, keyword)
        for key in schema:
            if key in _CONSTRAINTS and key != keyword:
                raise UnsupportedSchema(
                    f"{key!r} next to {keyword!r} is not supported", _join(path, key)
                )
        value = schema[keyword]
        if keyword == "$ref":
            return self._ref(value, where)
        if not isinstance(value, list) or not value:
            raise UnsupportedSchema(f"{keyword!r} must be a non-empty array of schemas", where)
        if keyword == "allOf":
            if len(value) != 1:
                raise UnsupportedSchema("'allOf' with more than one schema is not supported", where)
            return self.visit(value[0], name, _join(where, 0))
        # oneOf is enforced as anyOf: exclusivity is not something a grammar can check cheaply.
        options = [
            self.builder._named(f"{name}-{i}", self.visit(member, f"{name}-{i}", _join(where, i)))
            for i, member in enumerate(value)
            if member is not False
        ]
        if not options:
            raise UnsupportedSchema(f"no schema of {keyword!r} matches any value", where)
        return _alternatives(options)

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchema(
                f"only local references ('#', '#/$defs/...') are supported, not {ref!r}", path
            )
        if ref in self.refs:
            if self.refs[ref] in self.left:
                raise UnsupportedSchema(
                    f"$ref {ref!r} refers back to itself before any character is written", path
                )
            return self.refs[ref]
        target, keys = _resolve(self.root, ref, path)
        name = self.refs[ref] = self.builder._reserve(keys[-1])
        self.left.add(name)
        self.builder._rules[name] = self.visit(target, name, ".".join(keys))
        self.left.discard(name)
        return name

    def _enum(self, schema: dict[str, Any], path: str) -> str:
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise UnsupportedSchema("'enum' must be a non-empty array", _join(path, "enum"))
            if "const" in schema:
                const = _dump(schema["const"], _join(path, "const"))
                values = [v for v in values if _dump(v, _join(path, "enum")) == const]
        else:
            values = [schema["const"]]
        if "type" in schema:
            types = self._types(schema, path)
            values = [v for v in values if _json_type(v) in types or _is_number(v, types)]
        if not values:
            raise UnsupportedSchema("no value satisfies 'enum', 'const' and 'type' together", path)
        return _alternatives([literal(_dump(v, _join(path, "enum"))) for v in values])

    def _types(self, schema: dict[str, Any], path: str) -> list[str]:
        if "type" not in schema:
            return [kind for kind, keys in _IMPLIED_BY.items() if any(k in schema for k in keys)]
        declared = schema["type"]
        kinds = declared if isinstance(declared, list) else [declared]
        if not kinds:
            raise UnsupportedSchema("'type' must not be an empty array", _join(path, "type"))
        for kind in kinds:
            if kind not in _TYPES:
                raise UnsupportedSchema(f"type {kind!r} is not supported", _join(path, "type"))
        return list(dict.fromkeys(kinds))

    def _typed(self, kind: str, schema: dict[str, Any], name: str, path: str) -> str:
        if kind == "string":
            return self._string(schema, path)
        if kind in ("array", "object"):
            left, self.left = self.left, set()  # "[" or "{" is written first
            try:
                if kind == "array":
                    return self._array(schema, name, path)
                return self._object(schema, name, path)
            finally:
                self.left = left
        bounds = [key for key in _BOUNDS if key in schema]
        if kind == "number" and bounds:
            raise UnsupportedSchema(
                f"{bounds[0]!r} is supported on integers only", _join(path, bounds[0])
            )
        if kind == "integer" and bounds:
            return _integer_range(*_integer_bounds(schema, path))
        return {
            "null": self.builder.null,
            "boolean": self.builder.boolean,
            "integer": self.builder.integer,
            "number": self.builder.number,
        }[kind]()

    def _string(self, schema: dict[str, Any], path: str) -> str:
        low = _count(schema, "minLength", path) or 0
        high = _count(schema, "maxLength", path)
        if "format" in schema:
            fmt = schema["format"]
            if not isinstance(fmt, str) or fmt not in _FORMATS:
                raise UnsupportedSchema(
                    f"string format {fmt!r} is not supported", _join(path, "format")
                )
            for key in ("minLength", "maxLength"):
                if key in schema:
                    raise UnsupportedSchema(
                        f"{key!r} next to 'format' is not supported", _join(path, key)
                    )
            return self.builder._format(fmt)
        if high is not None and low > high:
            raise UnsupportedSchema("'minLength' exceeds 'maxLength'", _join(path, "minLength"))
        return self.builder._string(low, high)

    def _array(self, schema: dict[str, Any], name: str, path: str) -> str:
        items = schema.get("items", True)
        low = _count(schema, "minItems", path) or 0
        high = _count(schema, "maxItems", path)
        if isinstance(items, list):
            raise UnsupportedSchema(
                "'items' as an array (tuple validation) is not supported", _join(path, "items")
            )
        if items is False:
            high = 0
        if high is not None and low > high:
            raise UnsupportedSchema("'minItems' exceeds 'maxItems'", _join(path, "minItems"))
        if high == 0:
            return _array_body("", 0, 0)
        item = self.visit(items, f"{name}-item", _join(path, "items"))
        return _array_body(self.builder._named(f"{name}-item", item), low, high)

    def _object(self, schema: dict[str, Any], name: str, path: str) -> str:
        additional = schema.get("additionalProperties", True)
        if not isinstance(additional, bool | dict):
            raise UnsupportedSchema(
                "'additionalProperties' must be a schema", _join(path, "additionalProperties")
            )
        members = self._object_members(schema, additional, path)
        if not members:
            if additional is False:
                return literal("{}")
            if additional is True:
                return self.builder.any_object()
            value = self.visit(additional, f"{name}-value", _join(path, "additionalProperties"))
            return self.builder._map(self.builder._named(f"{name}-value", value))
        pairs = []
        for key, sub, where, is_required in members:
            value = self.builder._named(f"{name}-{key}", self.visit(sub, f"{name}-{key}", where))
            pairs.append((f"{literal(_dump(key, where) + ': ')} {value}", is_required))
        return self._members(pairs, name)

    def _object_members(
        self, schema: dict[str, Any], additional: bool | dict[str, Any], path: str
    ) -> list[tuple[str, Any, str, bool]]:
        """(key, schema, its path, required) of the keys written: the declared ones only, even
        where others are allowed, plus required keys that are not declared."""
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise UnsupportedSchema("'properties' must be an object", _join(path, "properties"))
        if not isinstance(required, list) or not all(isinstance(k, str) for k in required):
            raise UnsupportedSchema(
                "'required' must be an array of strings", _join(path, "required")
            )
        members: list[tuple[str, Any, str, bool]] = []
        for key, sub in properties.items():
            where = _join(path, "properties", key)
            if sub is False and key in required:
                raise UnsupportedSchema(f"required property {key!r} has the schema false", where)
            if sub is not False:
                members.append((key, sub, where, key in required))
        for key in dict.fromkeys(required):
            if key in properties:
                continue
            if additional is False:
                raise UnsupportedSchema(
                    f"required property {key!r} is not in 'properties' and"
                    " 'additionalProperties' is false",
                    _join(path, "required"),
                )
            members.append((key, additional, _join(path, "additionalProperties"), True))
        return members

    def _members(self, pairs: list[tuple[str, bool]], name: str) -> str:
        """`{...}` with the pairs in order, optional ones omissible, ", " only between pairs."""
        n = len(pairs)
        first_required = next((i for i, (_, req) in enumerate(pairs) if req), n)

        def after(i: int) -> str:  # pair i, preceded by the separator
            pair, req = pairs[i]
            return f'", " {pair}' if req else f'(", " {pair})?'

        def inline_rest(start: int) -> str:
            return " ".join(after(i) for i in range(start, n))

        # The first pair written is any optional one before the first required, or that one.
        # Each choice continues with the pairs after it; those tails are shared rules, so the
        # grammar grows linearly with the number of optional pairs, not quadratically.
        last_first = min(first_required, n - 1)
        rest: dict[int, str] = {}
        for i in range(last_first, 0, -1):
            body = f"{after(i)} {rest.get(i + 1) or inline_rest(i + 1)}".strip()
            rest[i] = self.builder.rule(f"{name}-rest-{i}", body)
        firsts = [
            f"{pairs[j][0]} {rest.get(j + 1) or inline_rest(j + 1)}".strip()
            for j in range(last_first + 1)
        ]
        inner = firsts[0] if len(firsts) == 1 else "(" + " | ".join(firsts) + ")"
        if first_required == n:  # every pair optional: the object may be empty
            inner = "(" + " | ".join(firsts) + ")?"
        return f'"{{" {inner} "}}"'


def _resolve(root: Any, ref: str, path: str) -> tuple[Any, list[str]]:
    """The schema a local $ref points to, and the keys leading to it."""
    pointer = unquote(ref[1:])
    if not pointer.startswith("/"):
        raise UnsupportedSchema(f"$ref {ref!r} is not a JSON pointer ('#/$defs/...')", path)
    keys = [key.replace("~1", "/").replace("~0", "~") for key in pointer[1:].split("/")]
    node = root
    for key in keys:
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise UnsupportedSchema(f"$ref {ref!r} points to nothing in the schema", path)
    return node, keys


def _count(schema: dict[str, Any], key: str, path: str) -> int | None:
    value = schema.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsupportedSchema(f"{key!r} must be a non-negative integer", _join(path, key))
    return value


def _integer_bounds(schema: dict[str, Any], path: str) -> tuple[int, int]:
    """The inclusive integer range the bound keywords allow (clamped to what is written)."""
    limit = 10**_MAX_DIGITS - 1
    low, high = -limit, limit
    for key in _BOUNDS:
        value = schema.get(key)
        if key not in schema or (isinstance(value, bool) and key.startswith("exclusive")):
            continue  # draft 4's boolean exclusiveMinimum/Maximum is read with minimum/maximum
        if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
            raise UnsupportedSchema(f"{key!r} must be a number", _join(path, key))
        exclusive = key.startswith("exclusive") or schema.get("exclusive" + key.title()) is True
        if key.endswith("inimum"):
            bound = math.floor(value) + 1 if exclusive else math.ceil(value)
            low = max(low, bound)
        else:
            bound = math.ceil(value) - 1 if exclusive else math.floor(value)
            high = min(high, bound)
    if low > high:
        raise UnsupportedSchema(
            "no integer of at most 16 digits satisfies the bounds", _join(path, "minimum")
        )
    return low, high


def _integer_range(low: int, high: int) -> str:
    """GBNF for the integers low..high, written without leading zeros."""
    options = []
    if low < 0:  # -1..-x is "-" and 1..x
        options.append('"-" ' + _digits_range(max(1, -high), -low))
    if high >= 0:
        options.append(_digits_range(max(0, low), high))
    return _alternatives(options)


def _digits_range(low: int, high: int) -> str:
    """The naturals low..high, split by number of digits (each part has no leading zero)."""
    options, full = [], []
    for width in range(len(str(low)), len(str(high)) + 1):
        first = max(low, 10 ** (width - 1) if width > 1 else 0)
        last = min(high, 10**width - 1)
        if width > 1 and (first, last) == (10 ** (width - 1), 10**width - 1):
            full.append(width - 1)  # every number of this width: one repetition covers them all
        else:
            options += _same_width(str(first), str(last))
    if full:
        options.append(f"[1-9] {_repeat('[0-9]', full[0], full[-1])}")
    return _alternatives(options)


def _same_width(low: str, high: str) -> list[str]:
    """Sequences matching the digit strings low..high, all of one width."""
    if low == high:
        return [f'"{low}"']
    if low[0] == high[0]:
        return [f'"{low[0]}" {_alternatives(_same_width(low[1:], high[1:]))}']
    rest = len(low) - 1
    any_rest = f" {_repeat('[0-9]', rest, rest)}" if rest else ""
    # The first digits whose every continuation is in range form one class.
    first = int(low[0]) + (0 if low[1:] == "0" * rest else 1)
    last = int(high[0]) - (0 if high[1:] == "9" * rest else 1)
    options = []
    if first > int(low[0]):
        options.append(f'"{low[0]}" {_alternatives(_same_width(low[1:], "9" * rest))}')
    if first <= last:
        options.append(f"[{first}-{last}]{any_rest}")
    if last < int(high[0]):
        options.append(f'"{high[0]}" {_alternatives(_same_width("0" * rest, high[1:]))}')
    return options


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _is_number(value: Any, types: list[str]) -> bool:
    return "number" in types and _json_type(value) == "integer"


def check_strict(schema: dict[str, Any]) -> None:
    """OpenAI's strict-mode rules (every object: additionalProperties false, every property in
    required; root an object); raise UnsupportedSchema naming the path."""
    root, where = schema, ""
    if isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and "type" not in schema:
        root, keys = _resolve(schema, schema["$ref"], "$ref")
        where = ".".join(keys)
    if not isinstance(root, dict) or root.get("type") != "object":
        if isinstance(root, dict) and "type" in root:
            where = _join(where, "type")
        raise UnsupportedSchema("strict mode: the root schema must be an object", where)
    _check_strict(schema, "")


def _check_strict(schema: Any, path: str) -> None:
    if not isinstance(schema, dict):
        return
    kinds = schema.get("type")
    if "object" in (kinds if isinstance(kinds, list) else [kinds]) or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            raise UnsupportedSchema(
                "strict mode: every object needs 'additionalProperties': false",
                _join(path, "additionalProperties"),
            )
        required = schema.get("required")
        properties = schema.get("properties")
        for key in properties if isinstance(properties, dict) else ():
            if not isinstance(required, list) or key not in required:
                raise UnsupportedSchema(
                    f"strict mode: property {key!r} must be listed in 'required'",
                    _join(path, "required"),
                )
    for keyword in ("properties", "$defs", "definitions"):
        members = schema.get(keyword)
        for key, sub in members.items() if isinstance(members, dict) else ():
            _check_strict(sub, _join(path, keyword, key))
    for keyword in ("anyOf", "oneOf", "allOf"):
        options = schema.get(keyword)
        for i, sub in enumerate(options if isinstance(options, list) else ()):
            _check_strict(sub, _join(path, keyword, i))
    for keyword in ("items", "additionalProperties"):
        _check_strict(schema.get(keyword), _join(path, keyword))


def schema_grammar(schema: dict[str, Any], strict: bool = False) -> str:
    """GBNF whose root is a value valid against `schema`; cached (LRU, 256 entries, keyed by the
    canonical JSON of the schema + strict), so a repeated schema costs a dict lookup."""
    # Not sort_keys: the order of `properties` is the order of the keys in the output.
    key = _dump(schema, "")
    return _cached_grammar(key, bool(strict))


@functools.lru_cache(maxsize=256)
def _cached_grammar(schema_json: str, strict: bool) -> str:
    builder = GrammarBuilder()
    return builder.build(builder.schema(json.loads(schema_json), strict=strict))


def _json_object_grammar() -> str:
    builder = GrammarBuilder()
    return builder.build(builder.any_object())


JSON_OBJECT_GRAMMAR = _json_object_grammar()
