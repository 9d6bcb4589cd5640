"""Golden tests of the inbound Anthropic translation: request -> chat, chat -> message/events.

The message and every event are validated with the official `anthropic` SDK's own types,
and the events are accumulated by the SDK's own stream accumulator.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent

from proxy.errors import InvalidRequest
from proxy.translate.anthropic import anthropic_error_body, decode_request, to_chat, to_message
from proxy.translate.anthropic_stream import AnthropicStream, error_frame
from proxy.translate.chat import completion_decoder

_events = pydantic.TypeAdapter(RawMessageStreamEvent)
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


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    obj: dict[str, Any] = {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": choices,
    }
    if usage:
        obj["usage"] = usage
    return json.dumps(obj).encode()


def parse_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    """Each frame: `event: X` matching its data's type, validated by the SDK's event type."""
    out = []
    for frame in frames:
        assert frame.endswith(b"\n\n")
        head, data = frame.decode().rstrip("\n").split("\n")
        obj = json.loads(data.removeprefix("data: "))
        assert head == f"event: {obj['type']}"
        if obj["type"] not in ("error", "ping"):  # the SDK handles these two apart
            _events.validate_python(obj)
        out.append(obj)
    return out


def accumulate(events: list[dict[str, Any]]) -> Any:
    snapshot = None
    bufs: dict[int, bytes] = {}
    for event in events:
        if event["type"] == "ping":
            continue
        snapshot = accumulate_event(
            event=_events.validate_python(event), current_snapshot=snapshot, json_bufs=bufs
        )
    return snapshot


def test_stream_golden_text_then_tool() -> None:
    translator = AnthropicStream("omnimind-fast")
    frames = []
    for payload in [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}),
        chunk({"content": "look."}),
        chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            }
        ),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": '}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        chunk({}, "tool_calls"),
        chunk({}, usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
    ]:
        frames += translator.feed(payload)
    frames += translator.finish()
    events = parse_frames(frames)
    assert [e["type"] for e in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["id"] == "msg_s1" and events[0]["message"]["model"] == "up"
    assert events[6]["content_block"] == {
        "type": "tool_use",
        "id": "call_9",
        "name": "f",
        "input": {},
    }
    assert events[7]["delta"] == {"type": "input_json_delta", "partial_json": '{"a": '}
    assert events[10] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 9, "input_tokens": 5},
    }
    final = accumulate(events)
    assert final.content[0].text == "Let me look."
    assert final.content[1].input == {"a": 1} and final.content[1].id == "call_9"
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 9)


def test_stream_without_chunks_or_usage_still_closes() -> None:
    translator = AnthropicStream("alias")
    events = parse_frames(translator.finish())
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[0]["message"]["model"] == "alias"
    assert events[2]["delta"]["stop_reason"] == "end_turn"
    assert events[2]["usage"] == {"output_tokens": 0}


def test_stream_length_finish() -> None:
    translator = AnthropicStream("m")
    frames = translator.feed(chunk({"content": "a"})) + translator.feed(chunk({}, "length"))
    events = parse_frames(frames + translator.finish())
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert accumulate(events).content[0].text == "a"


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


def test_error_frame() -> None:
    frame = error_frame(529, "Overloaded")
    assert frame == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )


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
