"""Validate our wire format against OpenAI's published spec.

The schemas lie in tests/openai_schemas/openai-schemas.json: the `components` closure of the
response shapes below, extracted from OpenAI's MIT-licensed OpenAPI document (license beside it)
by scripts/extract_openai_schemas.py. The spec is OpenAPI 3.1 but still carries some 3.0
`nullable: true`; we turn those into JSON Schema's `null` type when loading.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema

SCHEMAS = Path(__file__).resolve().parent / "openai_schemas" / "openai-schemas.json"


def _nullable(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: _nullable(v) for k, v in node.items()}
        if node.pop("nullable", False):
            if "type" in node:
                types = node["type"] if isinstance(node["type"], list) else [node["type"]]
                node["type"] = [*types, "null"]
                if "enum" in node:
                    node["enum"] = [*node["enum"], None]
            else:
                node = {"anyOf": [node, {"type": "null"}]}
        return node
    if isinstance(node, list):
        return [_nullable(v) for v in node]
    return node


@functools.cache
def _components() -> dict[str, Any]:
    doc = json.loads(SCHEMAS.read_text(encoding="utf-8"))
    return {"components": _nullable(doc["components"])}


@functools.cache
def _validator(name: str) -> jsonschema.Validator:
    schema = {"$ref": f"#/components/schemas/{name}", **_components()}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def validate(obj: Any, name: str) -> None:
    """Raise jsonschema.ValidationError unless `obj` matches the named spec schema."""
    _validator(name).validate(obj)


def completion(obj: Any) -> None:
    validate(obj, "CreateChatCompletionResponse")


def chunk(obj: Any) -> None:
    validate(obj, "CreateChatCompletionStreamResponse")


def error(obj: Any) -> None:
    validate(obj, "ErrorResponse")


def embedding(obj: Any) -> None:
    validate(obj, "CreateEmbeddingResponse")


def text_completion(obj: Any) -> None:
    validate(obj, "CreateCompletionResponse")


def response(obj: Any) -> None:
    """A Responses API `response` object."""
    validate(obj, "Response")


def response_event(obj: Any) -> None:
    """One event of a streamed Responses API answer."""
    validate(obj, "ResponseStreamEvent")
