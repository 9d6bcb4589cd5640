"""Golden tests of chat chunks -> Anthropic's stream events. Every event is validated with
the official `anthropic` SDK's own types and accumulated by the SDK's own accumulator."""

from __future__ import annotations

import json
from typing import Any

import pydantic
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent

from proxy.translate.anthropic_stream import AnthropicStream, error_frame

_events = pydantic.TypeAdapter(RawMessageStreamEvent)


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


def test_error_frame() -> None:
    frame = error_frame(529, "Overloaded")
    assert frame == (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )
