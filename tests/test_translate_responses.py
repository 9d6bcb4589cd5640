"""Golden tests of the Responses translation: request -> chat, chat -> response object.

Every response object is validated against OpenAI's published schema (`tests/schemas.py`)
and parsed by the official `openai` SDK's own type (streams: test_translate_responses_stream.py).
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from openai.types.responses import Response

from proxy.errors import InvalidRequest
from proxy.translate.chat import ChatMessage, completion_decoder
from proxy.translate.responses import (
    decode_request,
    output_messages,
    skeleton,
    to_chat,
    to_response,
)
from proxy.translate.responses_store import ResponseStore

from . import schemas

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}


def chat_of(body: dict[str, Any], history: list[ChatMessage] | None = None) -> dict[str, Any]:
    req = decode_request(json.dumps(body).encode())
    return msgspec.to_builtins(to_chat(req, history))  # type: ignore[no-any-return]


def test_request_string_input() -> None:
    body = {"model": "omnimind-fast", "input": "hi", "instructions": "Be brief."}
    assert chat_of(body) == {
        "model": "omnimind-fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
    }


def test_request_items_golden() -> None:
    body = {
        "model": "m",
        "input": [
            {"role": "developer", "content": "Rules."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is it?"},
                    {
                        "type": "input_image",
                        "image_url": "data:image/png;base64,AAA",
                        "detail": "low",
                    },
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Looking."}],
            },
            {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call", "call_id": "call_2", "name": "g", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "one"},
            {
                "type": "function_call_output",
                "call_id": "call_2",
                "output": [{"type": "input_text", "text": "two"}],
            },
        ],
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
        "text": {
            "format": {
                "type": "json_schema",
                "name": "city",
                "schema": {"type": "object"},
                "strict": True,
            }
        },
        "max_output_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.8,
        "user": "u1",
        "metadata": {"k": "v"},
    }
    assert chat_of(body) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Rules."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,AAA", "detail": "low"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": "Looking.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                        "type": "function",
                    },
                    {
                        "id": "call_2",
                        "function": {"name": "g", "arguments": "{}"},
                        "type": "function",
                    },
                ],
            },
            {"role": "tool", "content": "one", "tool_call_id": "call_1"},
            {"role": "tool", "content": "two", "tool_call_id": "call_2"},
        ],
        "max_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.8,
        "tools": [
            {
                "function": {
                    "name": "get_weather",
                    "description": "Weather in a city",
                    "parameters": WEATHER["parameters"],
                    "strict": False,
                },
                "type": "function",
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": {"type": "object"}, "strict": True},
        },
        "user": "u1",
    }


def test_json_object_and_stream() -> None:
    out = chat_of(
        {"model": "m", "input": "x", "stream": True, "text": {"format": {"type": "json_object"}}}
    )
    assert out["response_format"] == {"type": "json_object"}
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


def test_history_goes_between_instructions_and_input() -> None:
    history = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b")]
    out = chat_of({"model": "m", "input": "c", "instructions": "I"}, history)
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("system", "I"),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},  # no input
        {"model": "m", "input": "x", "tools": [{"type": "web_search"}]},
        {"model": "m", "input": "x", "background": True},
        {"model": "m", "input": [{"type": "item_reference", "id": "x"}]},
        {
            "model": "m",
            "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}],
        },
        {"model": "m", "input": [{"role": "robot", "content": "x"}]},
        {"model": "m", "input": "x", "tool_choice": "sometimes"},
        {"model": "m", "input": 5},
    ],
)
def test_bad_requests_are_400(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        chat_of(body)


def completion(message: dict[str, Any], finish: str) -> bytes:
    return json.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": 4,
                "total_tokens": 14,
                "prompt_tokens_details": {"cached_tokens": 3},
            },
        }
    ).encode()


def response_of(body: dict[str, Any], answer: bytes) -> dict[str, Any]:
    req = decode_request(json.dumps(body).encode())
    out = msgspec.to_builtins(to_response(completion_decoder.decode(answer), skeleton(req)))
    schemas.response(out)
    Response.model_validate(out)
    return out  # type: ignore[no-any-return]


def test_response_golden_text() -> None:
    body = {"model": "omnimind-fast", "input": "hi", "metadata": {"k": "v"}, "tools": [WEATHER]}
    out = response_of(body, completion({"role": "assistant", "content": "Hello."}, "stop"))
    assert out["id"].startswith("resp_") and out["object"] == "response"
    assert out["status"] == "completed" and isinstance(out["completed_at"], int)
    assert out["model"] == "omnimind-fast" and out["metadata"] == {"k": "v"}
    assert out["incomplete_details"] is None and out["error"] is None
    [item] = out["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    assert item["content"] == [
        {"type": "output_text", "text": "Hello.", "annotations": [], "logprobs": []}
    ]
    assert out["usage"] == {
        "input_tokens": 10,
        "output_tokens": 4,
        "total_tokens": 14,
        "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }
    assert out["tools"][0]["name"] == "get_weather" and out["tools"][0]["type"] == "function"


def test_response_golden_function_calls() -> None:
    calls = [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    message = {"role": "assistant", "content": None, "tool_calls": calls}
    out = response_of({"model": "m", "input": "x"}, completion(message, "tool_calls"))
    assert [
        (i["type"], i["call_id"], i["name"], i["arguments"], i["status"]) for i in out["output"]
    ] == [
        ("function_call", "call_1", "f", '{"a": 1}', "completed"),
        ("function_call", "call_2", "g", "{}", "completed"),
    ]
    assert all(i["id"].startswith("fc_") for i in out["output"])


def test_response_incomplete_on_length() -> None:
    body = {"model": "m", "input": "x", "max_output_tokens": 3}
    out = response_of(body, completion({"role": "assistant", "content": "a b c"}, "length"))
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out["output"][0]["status"] == "incomplete" and out["max_output_tokens"] == 3


def test_output_messages_continue_a_conversation() -> None:
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    answer = completion({"role": "assistant", "content": "ok", "tool_calls": calls}, "tool_calls")
    req = decode_request(b'{"model": "m", "input": "x"}')
    response = to_response(completion_decoder.decode(answer), skeleton(req))
    assert msgspec.to_builtins(output_messages(response)) == [
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [
                {"id": "call_1", "function": {"name": "f", "arguments": "{}"}, "type": "function"}
            ],
        }
    ]


def test_store_is_bounded_and_scoped() -> None:
    store = ResponseStore(max_responses=2, max_bytes=10_000)
    one = [ChatMessage(role="user", content="1")]
    assert store.put("r1", "key-a", one) and store.put("r2", "key-a", one)
    assert store.get("r1", "key-b") is None  # another key never sees it
    assert store.get("r1", "key-a") == one  # r1 is now the most recent
    store.put("r3", "key-a", one)
    assert store.get("r2", "key-a") is None and len(store) == 2
    assert not store.put("big", "key-a", [ChatMessage(role="user", content="x" * 20_000)])
    small = ResponseStore(max_responses=10, max_bytes=100)
    for i in range(5):
        small.put(f"r{i}", "k", [ChatMessage(role="user", content="y" * 30)])
    assert small.size <= 100 and small.get("r4", "k") is not None and small.get("r0", "k") is None


def test_tool_choice_without_tools_and_tools_without_parameters() -> None:
    assert "tool_choice" not in chat_of({"model": "m", "input": "x", "tool_choice": "required"})
    out = chat_of({"model": "m", "input": "x", "tools": [{"type": "function", "name": "now"}]})
    assert out["tools"][0]["function"]["parameters"] == {"type": "object", "properties": {}}
