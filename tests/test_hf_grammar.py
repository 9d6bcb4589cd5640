"""Constrained decoding (proxy/providers/hf_grammar.py) with SmolLM2's real tokenizer.

Random logits stand in for a model: each step the matcher masks them and the best allowed
token is taken. A few structural tokens get a head start so that strings and arrays close
within a couple of hundred steps, as a trained model's would.
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import jsonschema
import pytest
import torch

from proxy.providers.hf_grammar import (
    GrammarError,
    Grammars,
    Matcher,
    OutputRule,
    output_rule,
    tool_call_from_text,
)

PADDING = 64  # models often have more logits than their tokenizer has tokens
MAX_STEPS = 200

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "height": {"type": "number"},
        "member": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "integer"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "height", "member", "color", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# pydantic-style: its $ref points into its own $defs
BOOKING = {
    "type": "object",
    "properties": {"guest": {"$ref": "#/$defs/Guest"}, "nights": {"type": "integer"}},
    "required": ["guest", "nights"],
    "additionalProperties": False,
    "$defs": {
        "Guest": {
            "type": "object",
            "properties": {"name": {"type": "string"}},
            "required": ["name"],
            "additionalProperties": False,
        }
    },
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "book_hotel", "parameters": BOOKING}},
]


@pytest.fixture(scope="module")
def grammars(tokenizer: Any) -> Grammars:
    return Grammars(tokenizer, vocab_size=len(tokenizer) + PADDING)


def schema_format(schema: dict[str, Any], strict: bool = True) -> dict[str, Any]:
    json_schema = {"name": "answer", "schema": schema, "strict": strict}
    return {"type": "json_schema", "json_schema": json_schema}


def generate(grammars: Grammars, tokenizer: Any, rule: OutputRule, seed: int) -> str:
    """Drive a matcher with random logits until it finishes; the generated text."""
    matcher = grammars.matcher(rule)
    vocab = len(tokenizer)
    head_start = tokenizer.convert_tokens_to_ids(['"', "}", "]", ",", "1"])
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    for _ in range(MAX_STEPS):
        logits = torch.randn(vocab + PADDING, generator=generator)
        logits[head_start] += 3.0
        matcher.mask(logits)
        assert torch.isneginf(logits[vocab:]).all(), "a padding id was allowed"
        tokens.append(int(logits.argmax()))
        matcher.accept(tokens[-1])
        if matcher.finished():
            return str(tokenizer.decode(tokens))
    raise AssertionError(f"not finished after {MAX_STEPS} steps: {tokenizer.decode(tokens)!r}")


def assert_compact(text: str) -> None:
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    assert not re.search(r"\s", outside_strings), f"whitespace in {text!r}"


def follow(matcher: Matcher, tokenizer: Any, text: str) -> None:
    """Feed `text` token by token, checking that the mask allows each token."""
    for token in tokenizer.encode(text, add_special_tokens=False):
        logits = torch.zeros(len(tokenizer) + PADDING)
        matcher.mask(logits)
        assert logits[token] == 0, f"{tokenizer.decode([token])!r} was masked in {text!r}"
        matcher.accept(token)


def test_json_object_is_any_object(grammars: Grammars, tokenizer: Any) -> None:
    rule = output_rule({"type": "json_object"}, None, None)
    assert rule is not None and rule.kind == "json_object"
    for seed in range(3):
        text = generate(grammars, tokenizer, rule, seed)
        assert isinstance(json.loads(text), dict)
        assert_compact(text)


@pytest.mark.parametrize("strict", [True, False])
def test_json_schema_output_validates(grammars: Grammars, tokenizer: Any, strict: bool) -> None:
    rule = output_rule(schema_format(PERSON, strict), None, None)
    assert rule is not None and rule.kind == "json_schema" and rule.schema == PERSON
    for seed in range(4):
        text = generate(grammars, tokenizer, rule, seed)
        jsonschema.validate(json.loads(text), PERSON)
        assert_compact(text)


def test_named_tool_call_generates_its_arguments(grammars: Grammars, tokenizer: Any) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    rule = output_rule({"type": "json_object"}, TOOLS, choice)  # the forced call wins
    assert rule is not None and rule.kind == "tool_call" and rule.schema == WEATHER
    assert rule.tool_names == ("get_weather",) and rule.lenient  # the function is not strict
    for seed in range(3):
        name, arguments = tool_call_from_text(rule, generate(grammars, tokenizer, rule, seed))
        assert name == "get_weather"
        jsonschema.validate(json.loads(arguments), WEATHER)


def test_required_with_two_tools_names_one(grammars: Grammars, tokenizer: Any) -> None:
    rule = output_rule(None, TOOLS, "required")
    assert rule is not None and rule.tool_names == ("get_weather", "book_hotel")
    parameters = {"get_weather": WEATHER, "book_hotel": BOOKING}
    for seed in range(4):
        name, arguments = tool_call_from_text(rule, generate(grammars, tokenizer, rule, seed))
        jsonschema.validate(json.loads(arguments), parameters[name])


@pytest.mark.parametrize(
    "text",
    [
        '{"name":"get_weather","arguments":{"city":"Oslo","unit":"celsius"}}',
        '{"name":"book_hotel","arguments":{"guest":{"name":"Ada"},"nights":2}}',
    ],
)
def test_required_allows_every_tool(grammars: Grammars, tokenizer: Any, text: str) -> None:
    rule = output_rule(None, TOOLS, "required")
    assert rule is not None
    matcher = grammars.matcher(rule)
    follow(matcher, tokenizer, text)
    assert matcher.finished()
    name, arguments = tool_call_from_text(rule, text)
    assert json.loads(text) == {"name": name, "arguments": json.loads(arguments)}


def test_required_with_one_tool_generates_arguments_only(grammars: Grammars) -> None:
    rule = output_rule(None, TOOLS[:1], "required")
    assert rule is not None and rule.tool_names == ("get_weather",) and rule.schema == WEATHER
    assert tool_call_from_text(rule, '{"city":"Oslo","unit":"celsius"}') == (
        "get_weather",
        '{"city":"Oslo","unit":"celsius"}',
    )


def test_tool_without_parameters_takes_an_empty_object(grammars: Grammars, tokenizer: Any) -> None:
    tools = [{"type": "function", "function": {"name": "ping"}}]
    rule = output_rule(None, tools, {"type": "function", "function": {"name": "ping"}})
    assert rule is not None
    assert tool_call_from_text(rule, generate(grammars, tokenizer, rule, 0)) == ("ping", "{}")


def test_eos_is_allowed_once_the_output_may_end(grammars: Grammars, tokenizer: Any) -> None:
    matcher = grammars.matcher(OutputRule("json_schema", '{"type":"integer"}'))
    follow(matcher, tokenizer, "12")
    logits = torch.zeros(len(tokenizer) + PADDING)
    matcher.mask(logits)
    assert logits[tokenizer.eos_token_id] == 0 and not matcher.finished()  # "123" could follow
    matcher.accept(tokenizer.eos_token_id)
    assert matcher.finished()


def test_a_forbidden_token_is_refused(grammars: Grammars, tokenizer: Any) -> None:
    matcher = grammars.matcher(OutputRule("json_object", '{"type":"object"}'))
    with pytest.raises(GrammarError):
        matcher.accept(tokenizer.convert_tokens_to_ids("]"))


def test_matchers_of_one_rule_are_independent(grammars: Grammars, tokenizer: Any) -> None:
    rule = OutputRule("json_object", '{"type":"object"}')
    first, second = grammars.matcher(rule), grammars.matcher(rule)
    follow(first, tokenizer, "{}")
    assert first.finished() and not second.finished()
    follow(second, tokenizer, '{"a":[1,2]}')
    assert second.finished()


def test_matchers_compile_from_several_threads(grammars: Grammars, tokenizer: Any) -> None:
    errors: list[Exception] = []

    def compile_range(start: int) -> None:
        try:
            for n in range(start, start + 40):  # 160 schemas in all: past the cache's 64
                schema = {"type": "object", "properties": {f"k{n}": {"const": n}}}
                follow(
                    grammars.matcher(OutputRule("json_schema", json.dumps(schema))), tokenizer, "{"
                )
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=compile_range, args=(i * 40,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "strin"},
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
        {"type": "string", "pattern": "(("},
        {"type": "integer", "minimum": 5, "maximum": 3},
        {"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
    ],
)
def test_an_uncompilable_schema_raises_grammar_error(
    grammars: Grammars, schema: dict[str, Any]
) -> None:
    rule = output_rule(schema_format(schema), None, None)
    assert rule is not None
    with pytest.raises(GrammarError):
        grammars.matcher(rule)


def test_non_strict_schemas_ignore_unimplemented_keywords(grammars: Grammars) -> None:
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    rule = output_rule(schema_format(schema, strict=False), None, None)
    assert rule is not None and rule.lenient
    grammars.matcher(rule)


@pytest.mark.parametrize(
    ("response_format", "tools", "tool_choice"),
    [
        (None, TOOLS, {"type": "function", "function": {"name": "missing"}}),
        (None, None, {"type": "function", "function": {"name": "get_weather"}}),
        (None, TOOLS, {"type": "function"}),
        (None, None, "required"),
        (None, TOOLS, "sometimes"),
        (None, [{"type": "function"}], "required"),
        (None, [{"type": "function", "function": {"parameters": WEATHER}}], "required"),
        (None, [{"type": "function", "function": {"name": "f", "parameters": []}}], "required"),
        ({"type": "json_schema"}, None, None),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, None, None),
        ({"type": "json_schema", "json_schema": {"schema": "object"}}, None, None),
        ({"type": "yaml"}, None, None),
        ("json", None, None),
    ],
)
def test_malformed_requests_raise_value_error(
    response_format: Any, tools: Any, tool_choice: Any
) -> None:
    with pytest.raises(ValueError):
        output_rule(response_format, tools, tool_choice)


def test_which_rule_applies() -> None:
    json_object = OutputRule("json_object", '{"type":"object"}')
    assert output_rule(None, None, None) is None
    assert output_rule({"type": "text"}, TOOLS, "auto") is None
    assert output_rule({"type": "json_object"}, TOOLS, "auto") == json_object
    assert output_rule({"type": "json_object"}, TOOLS, None) == json_object
    assert output_rule({"type": "json_object"}, TOOLS, "none") == json_object
    assert output_rule(None, None, "none") is None


def test_an_unfinished_tool_call_raises_value_error() -> None:
    rule = output_rule(None, TOOLS, "required")
    assert rule is not None
    with pytest.raises(ValueError):
        tool_call_from_text(rule, '{"name":"get_weather","argu')
    with pytest.raises(ValueError):
        tool_call_from_text(rule, '{"name":"other","arguments":{}}')
