"""Golden tests of the inbound Anthropic translation: request -> chat, chat -> message, and
error bodies (streams: test_translate_anthropic_stream.py). Messages are validated with the
official `anthropic` SDK's own type."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from anthropic.types import Message

from proxy.errors import InvalidRequest
from proxy.translate.anthropic import anthropic_error_body, decode_request, to_chat, to_message
from proxy.translate.chat import completion_decoder

PNG = "iVBORw0KGgo="


def chat_of(body: dict[str, Any]) -> dict[str, Any]:
    req = decode_request(json.dumps(body).encode())
    return msgspec.to_builtins(to_chat(req))  # type: ignore[no-any-return]


def test_request_golden() -> None:
    body = {
        "model": "omnimind-fast",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hm", "signature": "x"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "a cat"},
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_2",
                        "is_error": True,
                        "content": [{"type": "text", "text": "boom"}],
                    },
                    {"type": "text", "text": "And now?"},
                ],
            },
        ],
        "tools": [
            {"name": "look", "description": "Look", "input_schema": {"type": "object"}},
            {"name": "bare", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-1"},
    }
    assert chat_of(body) == {
        "model": "omnimind-fast",
        "messages": [
            {"role": "system", "content": "Be brief.\nBe kind."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "function": {"name": "look", "arguments": '{"q":1}'},
                        "type": "function",
                    }
                ],
            },
            {"role": "tool", "content": "a cat", "tool_call_id": "toolu_1"},
            {"role": "tool", "content": "Error: boom", "tool_call_id": "toolu_2"},
            {"role": "user", "content": "And now?"},
        ],
        "max_tokens": 100,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["END"],
        "tools": [
            {
                "function": {
                    "name": "look",
                    "description": "Look",
                    "parameters": {"type": "object"},
                },
                "type": "function",
            },
            {
                "function": {"name": "bare", "parameters": {"type": "object", "properties": {}}},
                "type": "function",
            },
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "user": "u-1",
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    assert chat_of({**body, "tools": tools, "tool_choice": choice})["tool_choice"] == expected


def test_stream_request_asks_for_usage() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    out = chat_of(body)
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},  # no max_tokens
        {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}],
        },
    ],
)
def test_bad_requests_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        chat_of(body)


def completion(message: dict[str, Any], finish: str, **extra: Any) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-abc",
            "object": "chat.completion",
            "created": 1,
            "model": "up-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish, **extra}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
        }
    ).encode()


def message_of(body: bytes, stops: list[str] | None = None) -> dict[str, Any]:
    out = msgspec.to_builtins(to_message(completion_decoder.decode(body), stops))
    Message.model_validate(out)  # the SDK's own type
    return out  # type: ignore[no-any-return]


def test_message_golden_text() -> None:
    body = completion({"role": "assistant", "content": "Hi."}, "stop")
    assert message_of(body) == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "up-model",
        "content": [{"type": "text", "text": "Hi."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 7},
    }


def test_message_golden_tool_calls() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
    ]
    out = message_of(
        completion({"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls")
    )
    assert out["content"] == [
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
        {"type": "tool_use", "id": "call_2", "name": "g", "input": {"_raw_arguments": "not json"}},
    ]
    assert out["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("finish", "extra", "stops", "reason", "sequence"),
    [
        ("length", {}, None, "max_tokens", None),
        ("content_filter", {}, None, "refusal", None),
        ("stop", {"stop_reason": "END"}, ["END"], "stop_sequence", "END"),
        ("stop", {"stop_reason": 2}, ["END"], "end_turn", None),
    ],
)
def test_stop_reasons(
    finish: str, extra: dict[str, Any], stops: list[str] | None, reason: str, sequence: str | None
) -> None:
    out = message_of(completion({"role": "assistant", "content": "x"}, finish, **extra), stops)
    assert (out["stop_reason"], out["stop_sequence"]) == (reason, sequence)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (529, "overloaded_error"),
        (422, "invalid_request_error"),
    ],
)
def test_error_bodies(status: int, kind: str) -> None:
    assert json.loads(anthropic_error_body(status, "nope")) == {
        "type": "error",
        "error": {"type": kind, "message": "nope"},
    }


def test_edges_chat_completions_would_refuse() -> None:
    body = {
        "model": "m",
        "max_tokens": 5,
        "tool_choice": {"type": "any"},  # no tools: nothing to choose, not sent
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "t"}]},
            {"role": "user", "content": "y"},
        ],
    }
    out = chat_of(body)
    assert "tool_choice" not in out
    assert out["messages"][1] == {"role": "assistant", "content": ""}
