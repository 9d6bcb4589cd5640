"""Validate our wire format against OpenAI's published spec (../shared/openai-openapi.yaml).

The spec is read where it lies (never copied into the project). It is OpenAPI 3.1 but
still carries some 3.0 `nullable: true`; we turn those into JSON Schema's `null` type.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi.yaml"


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
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SPEC.open(encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    return {"components": _nullable(spec["components"])}


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
