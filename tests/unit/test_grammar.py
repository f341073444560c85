"""GIVEN a JSON Schema WHEN compiled to GBNF THEN llama.cpp's own grammar engine, on the real
default model's vocabulary, accepts exactly the json.dumps texts of valid values."""

from __future__ import annotations

import ctypes
import enum
import json
import math
import re
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import pydantic
import pytest

from handler.engine import grammar
from handler.engine.grammar import (
    JSON_OBJECT_GRAMMAR,
    GrammarBuilder,
    UnsupportedSchema,
    check_strict,
    literal,
    schema_grammar,
)
from handler.engine.in_process import bindings as native
from tests.conftest import model_path


class GrammarEngine:
    """llama.cpp's grammar sampler walked over a text's tokens (no model evaluation)."""

    def __init__(self) -> None:
        native.init_backend(verbose=False)
        self.lib = native.bindings()
        self.model = native.Model(str(model_path()), 0)
        self.eos = self.lib.llama_vocab_eos(self.model.vocab)

    def sampler(self, gbnf: str) -> Any:
        sampler = self.lib.llama_sampler_init_grammar(self.model.vocab, gbnf.encode(), b"root")
        if not sampler:
            pytest.fail(f"llama.cpp could not parse the grammar:\n{gbnf}")
        return sampler

    def parses(self, gbnf: str) -> bool:
        self.lib.llama_sampler_free(self.sampler(gbnf))
        return True

    def accepts(self, gbnf: str, text: str) -> bool:
        """Every token of `text` allowed in turn, then end of generation."""
        sampler = self.sampler(gbnf)
        try:
            for token in self.model.tokenize(text, add_special=False, parse_special=False):
                if not self._allowed(sampler, token):
                    return False
                # Only ever accept an allowed token: accepting a forbidden one aborts.
                self.lib.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            self.lib.llama_sampler_free(sampler)

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (self.lib.llama_token_data * 1)(self.lib.llama_token_data(token, 0.0, 0.0))
        candidates = self.lib.llama_token_data_array(
            ctypes.cast(data, self.lib.llama_token_data_p), 1, -1, False
        )
        self.lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return not math.isinf(data[0].logit)

    def close(self) -> None:
        self.lib.llama_model_free(self.model.ptr)


@pytest.fixture(scope="module")
def llama() -> Iterator[GrammarEngine]:
    engine = GrammarEngine()
    yield engine
    engine.close()


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def check(llama, schema, accepted, rejected=(), validate=True):
    """Valid values (checked by jsonschema too, unless `validate` is false) accepted as
    json.dumps writes them; the texts in `rejected` refused."""
    gbnf = schema_grammar(schema)
    for value in accepted:
        if validate:
            jsonschema.validate(value, schema)
        assert llama.accepts(gbnf, dumps(value)), f"{dumps(value)} refused by\n{gbnf}"
    for text in rejected:
        assert not llama.accepts(gbnf, text), f"{text} accepted by\n{gbnf}"
    return gbnf


# -- the engine helper itself ------------------------------------------------------------------


def test_helper_tells_allowed_from_forbidden(llama):
    assert llama.accepts('root ::= "hello" " world"', "hello world")
    assert not llama.accepts('root ::= "hello"', "hello world")
    assert not llama.accepts('root ::= "hello" " world"', "hello")  # end not allowed yet


def test_json_object_grammar(llama):
    assert llama.accepts(JSON_OBJECT_GRAMMAR, '{"a": [1, -2.5e-05, "x\\"y", null, true, {}]}')
    assert llama.accepts(JSON_OBJECT_GRAMMAR, "{}")
    for text in ['{"a":1}', "[1]", '"x"', '{"a": 1', '{"a": 1} ', '{\n"a": 1}']:
        assert not llama.accepts(JSON_OBJECT_GRAMMAR, text)


@pytest.mark.integration
def test_the_model_decodes_valid_json_under_the_grammar(llama):
    """Real decoding (greedy, grammar first in the chain) ends in a valid, compact value. Kept
    to a few tokens: everything else here runs the grammar engine without evaluating the model."""
    schema = {
        "type": "object",
        "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pet": {"enum": ["cat", "dog"]},
        },
        "required": ["age", "pet"],
        "additionalProperties": False,
    }
    lib, model = llama.lib, llama.model
    # One thread: on a busy 2-core machine two threads wait on each other (10x slower).
    context = native.Context(model, n_ctx=128, n_batch=32, n_threads=1)
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    lib.llama_sampler_chain_add(chain, llama.sampler(schema_grammar(schema)))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    try:
        context.evaluate_prompt(model.tokenize("A person as JSON: ", True, False))
        pieces = []
        for _ in range(40):
            token = lib.llama_sampler_sample(chain, context.ptr, -1)
            if model.is_end_of_generation(token):
                break
            pieces.append(model.piece(token))
            context.append(token)
        else:
            pytest.fail("the grammar did not end the value within 40 tokens")
    finally:
        lib.llama_sampler_free(chain)
        lib.llama_free(context.ptr)
    text = b"".join(pieces).decode()
    value = json.loads(text)
    jsonschema.validate(value, schema)
    assert text == dumps(value)


# -- scalars -----------------------------------------------------------------------------------


def test_string_escapes_and_control_characters(llama):
    check(
        llama,
        {"type": "string"},
        ["", "plain", 'a "quoted" \\ back', "line\nbreak\ttab", "héllo 日本 🎉", "\x01"],
        ['"raw\nnewline"', '"bad \\q escape"', "'single'", '"unterminated', "1", '"\\u12"'],
    )
    assert llama.accepts(schema_grammar({"type": "string"}), '"\\u00e9\\/"')


def test_string_lengths_count_characters(llama):
    schema = {"type": "string", "minLength": 2, "maxLength": 4}
    check(llama, schema, ["ab", "abcd", "日本", 'a"', "\n\n\n\n"], ['"a"', '"abcde"', '""'])
    check(llama, {"type": "string", "maxLength": 0}, [""], ['"a"'])
    check(llama, {"type": "string", "minLength": 3}, ["abc", "abcdefgh"], ['"ab"'])


def test_integer(llama):
    check(
        llama,
        {"type": "integer"},
        [0, 7, -12, 1234567890123456],
        ["01", "1.0", "+1", "1e3", '"1"', "-", "12345678901234567"],
    )


def test_number(llama):
    check(
        llama,
        {"type": "number"},
        [0, -3, 2.5, 1e-05, 1.5e300, 0.1 + 0.2, 0.00012345678901234567, 1e16],
        ["01.5", ".5", "1.", "1e", "NaN", "Infinity", '"1.5"'],
    )


@pytest.mark.parametrize(
    ("bounds", "low", "high"),
    [
        ({"minimum": 0, "maximum": 150}, 0, 150),
        ({"minimum": -5, "maximum": 5}, -5, 5),
        ({"minimum": -100, "maximum": -7}, -100, -7),
        ({"minimum": 17, "maximum": 1234}, 17, 1234),
        ({"exclusiveMinimum": 0, "exclusiveMaximum": 10}, 1, 9),
        ({"minimum": 0.5, "maximum": 20.5}, 1, 20),
        ({"minimum": 3, "exclusiveMinimum": True, "maximum": 8}, 4, 8),  # draft 4
        ({"minimum": 42, "maximum": 42}, 42, 42),
    ],
)
def test_integer_ranges(llama, bounds, low, high):
    gbnf = schema_grammar({"type": "integer"} | bounds)
    window = set(range(low - 25, low + 25)) | set(range(high - 25, high + 25))
    window |= {0, -1, 99, 100, 101, 999, 1000, 1001, -99, -100, -101}
    for n in sorted(window):
        assert llama.accepts(gbnf, str(n)) == (low <= n <= high), (n, gbnf)
    assert not llama.accepts(gbnf, f"0{low}") and not llama.accepts(gbnf, f"{low}.0")


def test_half_open_integer_ranges(llama):
    non_negative = schema_grammar({"type": "integer", "minimum": 0})
    for n in (0, 1, 9, 10, 12345, 10**15, 10**16 - 1):
        assert llama.accepts(non_negative, str(n))
    for text in ("-1", "-0", "007", str(10**16)):
        assert not llama.accepts(non_negative, text)
    below = schema_grammar({"type": "integer", "exclusiveMaximum": -2})
    assert llama.accepts(below, "-3") and llama.accepts(below, "-123456")
    assert not llama.accepts(below, "-2") and not llama.accepts(below, "0")


def test_boolean_null(llama):
    check(llama, {"type": "boolean"}, [True, False], ["True", "1", "null"])
    check(llama, {"type": "null"}, [None], ["None", "false", '"null"'])


# -- objects -----------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
    },
    "required": ["name"],
    "additionalProperties": False,
}


def test_object_required_and_optional_in_declared_order(llama):
    check(
        llama,
        PERSON,
        [
            {"name": "a"},
            {"name": "a", "age": 3},
            {"name": "a", "email": "e"},
            {"name": "a", "age": 1, "email": "e"},
        ],
        [
            '{"age": 3}',  # required missing
            '{"age": 3, "name": "a"}',  # order
            '{"name": "a", "email": "e", "age": 1}',
            '{"name": "a", "nick": "b"}',  # extra key
            '{"name": "a",}',
            "{}",
        ],
    )


def test_leading_optional_properties_need_no_comma(llama):
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "integer"},
            "c": {"type": "integer"},
            "d": {"type": "integer"},
        },
        "required": ["c"],
    }
    check(
        llama,
        schema,
        [
            {"c": 1},
            {"a": 1, "c": 1},
            {"b": 1, "c": 1},
            {"a": 1, "b": 2, "c": 3, "d": 4},
            {"c": 1, "d": 1},
        ],
        ['{, "c": 1}', '{"a": 1 "c": 1}', '{"a": 1, "b": 2}', '{"c": 1, "a": 1}'],
    )


def test_all_optional_properties(llama):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}}
    check(
        llama,
        schema,
        [{}, {"a": 1}, {"b": True}, {"a": 1, "b": False}],
        ['{"b": true, "a": 1}', '{, "b": true}', '{"a": 1, }'],
    )


def test_additional_properties_absent_means_declared_keys_only(llama):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    check(llama, schema, [{"a": 1}], ['{"a": 1, "b": 2}'])


def test_object_without_properties_is_any_object(llama):
    check(llama, {"type": "object"}, [{}, {"x": [1, {"y": None}]}], ["[]", '{"x": 1,}'])
    check(llama, {"type": "object", "additionalProperties": False}, [{}], ['{"x": 1}'])


def test_additional_properties_schema_is_a_map(llama):
    schema = {"type": "object", "additionalProperties": {"type": "integer"}}
    check(llama, schema, [{}, {"a": 1}, {"a": 1, "b 2": -3}], ['{"a": "x"}', '{"a": 1.5}'])


def test_required_but_undeclared_keys_are_written(llama):
    schema = {"type": "object", "required": ["id"], "additionalProperties": {"type": "integer"}}
    check(llama, schema, [{"id": 4}], ["{}", '{"id": "x"}'])
    with pytest.raises(UnsupportedSchema) as err:
        schema_grammar({"properties": {}, "required": ["id"], "additionalProperties": False})
    assert err.value.path == "required"


def test_property_false_is_never_written(llama):
    schema = {"properties": {"a": False, "b": {"type": "integer"}}}
    check(llama, schema, [{}, {"b": 1}], ['{"a": 1}'])


def test_keys_are_escaped_literals(llama):
    schema = {
        "properties": {'say "hi"': {"type": "integer"}, "ключ\\": {"const": "é"}},
        "required": ['say "hi"'],
    }
    check(llama, schema, [{'say "hi"': 1}, {'say "hi"': 1, "ключ\\": "é"}])


def test_nested_objects_and_arrays(llama):
    schema = {
        "type": "object",
        "properties": {
            "user": PERSON,
            "tags": {"type": "array", "items": {"type": "string"}},
            "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
        },
        "required": ["user", "tags", "matrix"],
        "additionalProperties": False,
    }
    check(
        llama,
        schema,
        [{"user": {"name": "x", "age": 2}, "tags": [], "matrix": [[1, 2.5], []]}],
        ['{"user": {"name": "x"}, "tags": [1], "matrix": []}'],
    )


# -- arrays ------------------------------------------------------------------------------------


def test_array_items_and_bounds(llama):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}
    check(llama, schema, [[1, 2], [1, 2, 3]], ["[1]", "[1, 2, 3, 4]", "[1,2]", '[1, "2"]', "[]"])
    check(llama, {"type": "array", "maxItems": 1}, [[], [{"a": None}]], ["[1, 2]"])
    check(llama, {"type": "array", "minItems": 1}, [[1], ["a", 2, [3]]], ["[]"])
    check(llama, {"type": "array", "items": False}, [[]], ["[1]"])
    check(llama, {"type": "array", "minItems": 1, "maxItems": 1}, [[7]], ["[]", "[1, 2]"])
    check(llama, {"type": "array", "minItems": 2, "maxItems": 2}, [[1, 2]], ["[1]", "[1, 2, 3]"])


# -- enum, const, unions -----------------------------------------------------------------------


def test_enum_of_any_json_values(llama):
    values = ['say "hi"', "naïve ☕", "back\\slash", 3, 2.5, None, True, [1, "a"], {"k": [None]}]
    check(llama, {"enum": values}, values, ['"say \\"hi\\" "', "4", "false", '[1,"a"]', '"other"'])


def test_const(llama):
    check(llama, {"const": "fixed"}, ["fixed"], ['"fixe"', '"fixedx"'])
    check(llama, {"const": {"a": [1, 2]}}, [{"a": [1, 2]}], ['{"a":[1,2]}'])


def test_enum_filtered_by_type_and_const():
    assert '"1"' not in schema_grammar({"type": "integer", "enum": [1, "1"]}).split("::=")[1]
    with pytest.raises(UnsupportedSchema):
        schema_grammar({"type": "string", "enum": [1, 2]})
    with pytest.raises(UnsupportedSchema):
        schema_grammar({"enum": [1, 2], "const": 3})


def test_type_list_is_a_union(llama):
    schema = {"type": ["string", "integer", "null"], "maxLength": 2}
    check(llama, schema, ["ab", 5, None], ['"abc"', "true", "1.5"])


def test_any_of_and_one_of(llama):
    for keyword in ("anyOf", "oneOf"):
        schema = {
            keyword: [
                {"type": "integer"},
                {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            ]
        }
        check(llama, schema, [1, {"a": "x"}], ['"x"', "{}", "[1]"])


def test_all_of_with_one_schema(llama):
    schema = {"allOf": [{"type": "boolean"}], "description": "pydantic v1 style"}
    check(llama, schema, [True], ["1"])


def test_nullable(llama):
    # OpenAPI's keyword: jsonschema knows nothing of it.
    check(llama, {"type": "string", "nullable": True}, ["x", None], ["1"], validate=False)
    check(llama, {"type": "string", "nullable": False}, ["x"], ["null"])
    check(
        llama,
        {"$ref": "#/$defs/A", "nullable": True, "$defs": {"A": {"const": 1}}},
        [1, None],
        ["2"],
        validate=False,
    )


def test_empty_schema_is_any_value(llama):
    for schema in ({}, True, {"title": "anything", "description": "goes"}):
        check(
            llama, schema, [1, "x", None, [True, {"a": {}}], {"k": -0.5}], ["", "nul", "{'a': 1}"]
        )


# -- $ref --------------------------------------------------------------------------------------


def test_linked_list_through_defs(llama):
    schema = {
        "$ref": "#/$defs/Node",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "value": {"type": "integer"},
                    "next": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]},
                },
                "required": ["value", "next"],
                "additionalProperties": False,
            }
        },
    }
    chain = {"value": 1, "next": {"value": 2, "next": {"value": 3, "next": None}}}
    check(llama, schema, [chain], ['{"value": 1, "next": {"value": 2}}'])


def test_tree_through_root_ref_and_definitions(llama):
    tree = {
        "type": "object",
        "properties": {
            "label": {"$ref": "#/definitions/label"},
            "children": {"type": "array", "items": {"$ref": "#"}},
        },
        "required": ["label", "children"],
        "definitions": {"label": {"type": "string", "maxLength": 5}},
    }
    value = {
        "label": "root",
        "children": [
            {"label": "a", "children": []},
            {"label": "b", "children": [{"label": "c", "children": []}]},
        ],
    }
    check(
        llama,
        tree,
        [value],
        ['{"label": "root", "children": [{"label": "toolong", "children": []}]}'],
    )


def test_ref_into_an_array_of_schemas(llama):
    schema = {"anyOf": [{"type": "boolean"}, {"type": "array", "items": {"$ref": "#/anyOf/0"}}]}
    check(llama, schema, [True, [False, True]], ["[1]"])


def test_enum_values_filtered_by_json_type(llama):
    values = [None, True, 3, 2.0, 2.5, "s", [1], {"k": 1}]
    for kind, kept in [
        ("null", [None]),
        ("boolean", [True]),
        ("integer", [3, 2.0]),
        ("number", [3, 2.0, 2.5]),
        ("string", ["s"]),
        ("array", [[1]]),
        ("object", [{"k": 1}]),
    ]:
        schema = {"type": kind, "enum": values}
        dropped = [dumps(v) for v in values if dumps(v) not in map(dumps, kept)]
        check(llama, schema, kept, dropped)


def test_ref_pointer_escapes(llama):
    schema = {
        "$defs": {"a/b": {"type": "integer"}, "c d": {"type": "null"}},
        "anyOf": [{"$ref": "#/$defs/a~1b"}, {"$ref": "#/$defs/c%20d"}],
    }
    check(llama, schema, [1, None], ['"x"'])


# -- formats -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        (
            "date",
            ["2024-02-29", "1999-12-31"],
            ["2024-13-01", "2024-1-01", "24-01-01", "2024-01-32"],
        ),
        (
            "time",
            ["23:59:59Z", "08:00:00.123+02:00", "12:30:00-05:30"],
            ["24:00:00Z", "12:30:00", "12:60:00Z"],
        ),
        (
            "date-time",
            ["2024-05-01T12:00:00Z", "2024-05-01T12:00:00.000001+00:00"],
            ["2024-05-01 12:00:00Z", "2024-05-01T12:00Z"],
        ),
        (
            "uuid",
            ["123e4567-e89b-12d3-a456-426614174000"],
            ["123e4567e89b12d3a456426614174000", "123E4567-E89B-12D3-A456-426614174000"],
        ),
    ],
)
def test_string_formats(llama, fmt, good, bad):
    check(llama, {"type": "string", "format": fmt}, good, [dumps(text) for text in bad])


# -- layout ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '{"a":1,"b":[1,2]}',
        '{"a": 1,"b": [1, 2]}',
        '{ "a": 1, "b": [1, 2] }',
        '{"a": 1, "b": [1,2]}',
        '{\n  "a": 1,\n  "b": [1, 2]\n}',
        ' {"a": 1, "b": [1, 2]}',
        '{"a": 1, "b": [1, 2]}\n',
    ],
)
def test_only_json_dumps_layout_is_accepted(llama, text):
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "array", "items": {"type": "integer"}},
        },
        "required": ["a", "b"],
    }
    gbnf = check(llama, schema, [{"a": 1, "b": [1, 2]}])
    assert not llama.accepts(gbnf, text)


# -- what cannot be enforced -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        (
            {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}},
            "properties.zip.pattern",
        ),
        ({"properties": {"age": {"type": "number", "minimum": 0}}}, "properties.age.minimum"),
        ({"type": "number", "maximum": 9}, "maximum"),
        ({"minimum": 0}, "minimum"),
        ({"type": ["integer", "number"], "maximum": 9}, "maximum"),
        ({"type": "integer", "minimum": 5, "maximum": 4}, "minimum"),
        ({"type": "integer", "minimum": 10**17}, "minimum"),
        ({"type": "integer", "minimum": "0"}, "minimum"),
        ({"type": "number", "exclusiveMinimum": 0}, "exclusiveMinimum"),
        ({"type": "number", "exclusiveMaximum": 0}, "exclusiveMaximum"),
        ({"type": "number", "multipleOf": 2}, "multipleOf"),
        ({"type": "array", "prefixItems": [{"type": "integer"}]}, "prefixItems"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
        ({"type": "array", "items": {"uniqueItems": True}}, "items.uniqueItems"),
        ({"type": "array", "additionalItems": False}, "additionalItems"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "patternProperties"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "propertyNames"),
        ({"if": {"type": "string"}, "then": {"maxLength": 2}}, "if"),
        ({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]}, "anyOf.1.not"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "minProperties": 1}, "minProperties"),
        ({"type": "object", "maxProperties": 1}, "maxProperties"),
        ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
        ({"$dynamicRef": "#meta"}, "$dynamicRef"),
        (
            {"$defs": {"A": {"type": "string", "pattern": "x"}}, "$ref": "#/$defs/A"},
            "$defs.A.pattern",
        ),
        ({"type": "date"}, "type"),
        ({"type": ["string", "decimal"]}, "type"),
        ({"type": "string", "format": "email"}, "format"),
        ({"type": "string", "format": "date", "maxLength": 3}, "maxLength"),
        ({"type": "array", "items": [{"type": "integer"}]}, "items"),
        ({"allOf": [{"type": "string"}, {"maxLength": 3}]}, "allOf"),
        ({"anyOf": [{"type": "string"}], "type": "string"}, "type"),
        ({"$ref": "#/$defs/Missing", "$defs": {}}, "$ref"),
        ({"$ref": "https://example.com/schema.json"}, "$ref"),
        ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, "$defs.A.$ref"),
        ({"$ref": "#"}, "$ref"),
        ({"anyOf": [{"type": "null"}, {"$ref": "#"}]}, "anyOf.1.$ref"),
        (
            {
                "$ref": "#/$defs/A",
                "$defs": {
                    "A": {"nullable": True, "$ref": "#/$defs/B"},
                    "B": {"allOf": [{"$ref": "#/$defs/A"}]},
                },
            },
            "$defs.B.allOf.0.$ref",
        ),
        ({"properties": {"a": "string"}}, "properties.a"),
        ({"type": "string", "minLength": -1}, "minLength"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength"),
        ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems"),
        ({"type": "object", "required": "a"}, "required"),
        ({"anyOf": [False]}, "anyOf"),
        ({"nullable": "yes"}, "nullable"),
        ({"anyOf": []}, "anyOf"),
        ({"enum": []}, "enum"),
        ({"type": []}, "type"),
        ({"additionalProperties": "no"}, "additionalProperties"),
        ({"properties": []}, "properties"),
        ({"properties": {"a": False}, "required": ["a"]}, "properties.a"),
        ({"$ref": "#Node"}, "$ref"),
        ({"type": "null", "enum": [1]}, ""),
        (False, ""),
        ([], ""),
    ],
)
def test_unsupported_schemas_name_the_keyword(schema, path):
    with pytest.raises(UnsupportedSchema) as err:
        schema_grammar(schema)
    assert err.value.path == path
    assert isinstance(err.value, ValueError) and str(err.value)


def test_unsupported_message_names_the_keyword():
    with pytest.raises(UnsupportedSchema, match="JSON Schema keyword 'pattern' is not supported"):
        schema_grammar({"properties": {"zip": {"type": "string", "pattern": "x"}}})


def test_annotations_are_ignored(llama):
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:x",
        "$comment": "c",
        "title": "T",
        "description": "D",
        "type": "integer",
        "default": 1,
        "examples": [1],
        "deprecated": False,
        "readOnly": True,
        "writeOnly": False,
        "strict": True,
    }
    check(llama, schema, [5], ['"5"'])
    check(
        llama,
        {"oneOf": [{"const": 1}, {"const": 2}], "discriminator": {"propertyName": "x"}},
        [1, 2],
    )


# -- strict mode -------------------------------------------------------------------------------


def test_check_strict_accepts_openai_style_schemas():
    check_strict(PERSON | {"required": ["name", "age", "email"]})
    check_strict({"type": "object", "properties": {}, "additionalProperties": False})
    nested = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "required": ["items"],
        "additionalProperties": False,
        "$defs": {
            "Item": {
                "type": ["object", "null"],
                "properties": {"x": {"type": "string"}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
    }
    check_strict(nested)
    body = {key: value for key, value in nested.items() if key != "$defs"}
    check_strict({"$ref": "#/$defs/Root", "$defs": {"Root": body, **nested["$defs"]}})
    assert schema_grammar(nested, strict=True)


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"type": "array"}, "type"),
        ({"$ref": "#/$defs/A", "$defs": {"A": {"type": "string"}}}, "$defs.A.type"),
        ({"anyOf": [{"type": "object"}]}, ""),
        (
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            "additionalProperties",
        ),
        (PERSON, "required"),
        (
            {
                "type": "object",
                "properties": {"p": PERSON | {"additionalProperties": True}},
                "required": ["p"],
                "additionalProperties": False,
            },
            "properties.p.additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "l": {"type": "array", "items": {"type": "object", "properties": {}}}
                },
                "required": ["l"],
                "additionalProperties": False,
            },
            "properties.l.items.additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {},
                "additionalProperties": False,
                "$defs": {"A": {"type": "object"}},
            },
            "$defs.A.additionalProperties",
        ),
        (
            {
                "type": "object",
                "properties": {
                    "u": {
                        "anyOf": [
                            {"type": "null"},
                            {
                                "type": "object",
                                "properties": {"a": {}},
                                "additionalProperties": False,
                            },
                        ]
                    }
                },
                "required": ["u"],
                "additionalProperties": False,
            },
            "properties.u.anyOf.1.required",
        ),
    ],
)
def test_check_strict_rejections(schema, path):
    with pytest.raises(UnsupportedSchema) as err:
        check_strict(schema)
    assert err.value.path == path
    with pytest.raises(UnsupportedSchema):
        schema_grammar(schema, strict=True)


def test_strict_flag_only_adds_the_check():
    strict_person = PERSON | {"required": ["name", "age", "email"]}
    assert schema_grammar(strict_person, strict=True) == schema_grammar(strict_person)
    with pytest.raises(UnsupportedSchema):
        schema_grammar(PERSON, strict=True)
    with pytest.raises(UnsupportedSchema):
        GrammarBuilder().schema(PERSON, strict=True)


# -- cache -------------------------------------------------------------------------------------


def test_repeated_schema_is_a_cache_hit():
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}}
    first = schema_grammar(schema)
    hits = grammar._cached_grammar.cache_info().hits
    assert schema_grammar(json.loads(json.dumps(schema))) is first  # equal, not the same dict
    assert grammar._cached_grammar.cache_info().hits == hits + 1
    misses = grammar._cached_grammar.cache_info().misses
    schema_grammar(schema | {"required": ["cached"], "additionalProperties": False}, strict=True)
    assert grammar._cached_grammar.cache_info().misses == misses + 1  # strict: a key of its own
    assert grammar._cached_grammar.cache_info().maxsize == 256


def test_property_order_is_part_of_the_cache_key(llama):
    ab = {
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
    }
    ba = {
        "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}},
        "required": ["a", "b"],
    }
    assert llama.accepts(schema_grammar(ab), '{"a": 1, "b": 2}')
    assert llama.accepts(schema_grammar(ba), '{"b": 2, "a": 1}')


def test_non_json_schema_is_unsupported():
    with pytest.raises(UnsupportedSchema):
        schema_grammar({"enum": [{1, 2}]})


# -- pydantic ----------------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"
    DARK_BLUE = 'dark "blue"'


class Address(pydantic.BaseModel):
    street: str
    zip_code: str | None = None
    country: Literal["FR", "DE", "日本"] = "FR"


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(min_length=1, max_length=20, description="the pet's name")
    legs: int = pydantic.Field(default=4, ge=0, le=8)
    kind: Literal["cat", "dog"]
    color: Color = Color.RED


class Person(pydantic.BaseModel):
    name: str
    age: int | None = None
    height_m: float
    home: Address
    pets: list[Pet] = pydantic.Field(default_factory=list, max_length=3)
    nicknames: list[str] = []
    scores: dict[str, int] = {}
    best_friend: Person | None = None


PEOPLE = [
    Person(name="Ann", height_m=1.7, home=Address(street="1 rue X")),
    Person(
        name='Bob "the" Builder',
        age=42,
        height_m=1.85,
        home=Address(street="Hauptstr. 5", zip_code="10115", country="DE"),
        pets=[Pet(name="Rex", kind="dog"), Pet(name="Mi", kind="cat", color=Color.DARK_BLUE)],
        nicknames=["bob", "b\\b"],
        scores={"chess": 1200, "go": -1},
        best_friend=Person(name="Ann", height_m=1.7, home=Address(street="s", country="日本")),
    ),
]


@pytest.mark.parametrize("person", PEOPLE, ids=["minimal", "full"])
def test_pydantic_models_compile_and_accept_their_dumps(llama, person):
    schema = Person.model_json_schema()
    gbnf = schema_grammar(schema)
    text = dumps(person.model_dump(mode="json"))
    assert llama.accepts(gbnf, text), f"{text} refused by\n{gbnf}"
    assert Person.model_validate_json(text) == person


def test_pydantic_grammar_refuses_invalid_instances(llama):
    gbnf = schema_grammar(Person.model_json_schema())
    valid = PEOPLE[1].model_dump(mode="json")
    for change in (
        {"pets": [{"name": "", "kind": "dog", "color": "red"}]},
        {"home": {"street": "s", "country": "US"}},
        {"age": 1.5},
        {"pets": [valid["pets"][0] | {"legs": 9}]},
        {"pets": [valid["pets"][0]] * 4},
    ):
        assert not llama.accepts(gbnf, dumps(valid | change)), change


def test_pydantic_v1_style_all_of_refs(llama):
    schema = {
        "type": "object",
        "properties": {"color": {"allOf": [{"$ref": "#/definitions/Color"}], "description": "c"}},
        "required": ["color"],
        "definitions": {"Color": {"title": "Color", "enum": ["red", "green"], "type": "string"}},
    }
    check(llama, schema, [{"color": "green"}], ['{"color": "blue"}'])


# -- the builder, for several schemas in one grammar -------------------------------------------


def test_builder_combines_schemas_without_name_clashes(llama):
    builder = GrammarBuilder()
    defs = {
        "$defs": {
            "Place": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            }
        }
    }
    weather = builder.schema(
        defs
        | {
            "type": "object",
            "properties": {"where": {"$ref": "#/$defs/Place"}},
            "required": ["where"],
        },
        name="get-weather-args",
    )
    # Same definition names, another meaning: each schema keeps its own rules.
    defs2 = {"$defs": {"Place": {"type": "integer"}}}
    count = builder.schema(
        defs2
        | {"type": "object", "properties": {"n": {"$ref": "#/$defs/Place"}}, "required": ["n"]},
        name="get_weather_args",
    )
    assert weather == "get-weather-args" and count != weather
    call_a = builder.rule(
        "call", '"{\\"name\\": \\"get_weather\\", \\"arguments\\": " ' + weather + ' "}"'
    )
    call_b = builder.rule("call", literal('{"name": "count", "arguments": ') + f' {count} "}}"')
    assert call_b != call_a
    gbnf = builder.build(f'"<tool_call>" ({call_a} | {call_b}) "</tool_call>"')
    names = re.findall(r"^(\S+) ::=", gbnf, re.MULTILINE)
    assert len(names) == len(set(names)) and all(re.fullmatch(r"[a-zA-Z0-9-]+", n) for n in names)
    assert llama.accepts(
        gbnf,
        '<tool_call>{"name": "get_weather", "arguments": {"where": {"city": "Paris"}}}</tool_call>',
    )
    assert llama.accepts(gbnf, '<tool_call>{"name": "count", "arguments": {"n": 3}}</tool_call>')
    assert not llama.accepts(
        gbnf, '<tool_call>{"name": "count", "arguments": {"n": {"city": "Paris"}}}</tool_call>'
    )


def test_builder_primitives_never_clash_with_user_names(llama):
    builder = GrammarBuilder()
    mine = builder.rule("string", '"mine"')
    value = builder.schema({"type": "array", "items": {"type": "string"}}, name="value")
    assert mine == "string" and value == "value"
    gbnf = builder.build(f"{value} | {mine} | {builder.any_value()}")
    assert llama.parses(gbnf)
    assert llama.accepts(gbnf, '["a"]') and llama.accepts(gbnf, "mine") and llama.accepts(gbnf, "3")


def test_failed_schema_leaves_the_builder_unchanged():
    builder = GrammarBuilder()
    before = builder.build("x")
    with pytest.raises(UnsupportedSchema):
        builder.schema({"properties": {"a": {"type": "string"}, "b": {"pattern": "x"}}})
    assert builder.build("x") == before


def test_lone_surrogates_stay_encodable(llama):
    gbnf = schema_grammar({"enum": ["ok", "\ud800"]})
    assert llama.accepts(gbnf, '"ok"')


def test_open_ended_item_counts(llama):
    check(llama, {"type": "array", "minItems": 3}, [[1, 2, 3], [1, 2, 3, 4, 5]], ["[1, 2]"])
    check(llama, {"type": "array", "minItems": 0, "maxItems": 1}, [[], [1]], ["[1, 2]"])
    check(llama, {"type": "array", "maxItems": 2}, [[], [1], [1, 2]], ["[1, 2, 3]"])


def test_literal_escapes(llama):
    text = 'q"b\\n\nr\rt\tc\x01d\x7fé🎉'
    assert literal(text) == '"q\\"b\\\\n\\nr\\rt\\tc\\x01d\\x7Fé🎉"'
    assert llama.accepts(f"root ::= {literal(text)}", text)
