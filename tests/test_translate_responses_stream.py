"""Golden tests of chat chunks -> the Responses API's stream events. Every event is validated
against OpenAI's published schema (its own event schema, then the ResponseStreamEvent union)
and parsed by the official `openai` SDK's types."""

from __future__ import annotations

import json
from typing import Any

import pydantic
from openai.types.responses import Response, ResponseStreamEvent

from proxy.translate.responses import decode_request, skeleton
from proxy.translate.responses_stream import ResponsesStream

from . import schemas

_events = pydantic.TypeAdapter(ResponseStreamEvent)
EVENT_SCHEMAS = {
    "response.created": "ResponseCreatedEvent",
    "response.in_progress": "ResponseInProgressEvent",
    "response.completed": "ResponseCompletedEvent",
    "response.incomplete": "ResponseIncompleteEvent",
    "response.failed": "ResponseFailedEvent",
    "response.output_item.added": "ResponseOutputItemAddedEvent",
    "response.output_item.done": "ResponseOutputItemDoneEvent",
    "response.content_part.added": "ResponseContentPartAddedEvent",
    "response.content_part.done": "ResponseContentPartDoneEvent",
    "response.output_text.delta": "ResponseTextDeltaEvent",
    "response.output_text.done": "ResponseTextDoneEvent",
    "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
    "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
    "error": "ResponseErrorEvent",
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}


def chunk(
    delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None
) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    obj: dict[str, Any] = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "up",
        "choices": choices,
    }
    if usage:
        obj["usage"] = usage
    return json.dumps(obj).encode()


def events_of(frames: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for frame in frames:
        head, data = frame.decode().rstrip("\n").split("\n")
        obj = json.loads(data.removeprefix("data: "))
        assert head == f"event: {obj['type']}"
        schemas.validate(obj, EVENT_SCHEMAS[obj["type"]])  # precise errors first
        schemas.response_event(obj)
        _events.validate_python(obj)
        out.append(obj)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def run_stream(
    body: dict[str, Any], payloads: list[bytes]
) -> tuple[list[dict[str, Any]], ResponsesStream]:
    translator = ResponsesStream(skeleton(decode_request(json.dumps(body).encode())))
    frames = translator.start()
    for payload in payloads:
        frames += translator.feed(payload)
    frames += translator.finish()
    return events_of(frames), translator


def test_stream_golden_text_then_call() -> None:
    events, translator = run_stream(
        {"model": "omnimind-fast", "input": "x", "tools": [WEATHER]},
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Let me "}),
            chunk({"content": "look."}),
            chunk(
                {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_7",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": ""},
                        }
                    ]
                }
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk({}, "tool_calls"),
            chunk({}, usage={"prompt_tokens": 6, "completion_tokens": 8, "total_tokens": 14}),
        ],
    )
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert (
        events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    )
    assert events[6]["text"] == "Let me look."
    assert events[8]["item"]["content"][0]["text"] == "Let me look."
    assert events[9]["output_index"] == 1 and events[9]["item"]["arguments"] == ""
    assert events[12]["arguments"] == '{"city":"Paris"}' and events[12]["name"] == "get_weather"
    final = events[-1]["response"]
    assert final["status"] == "completed" and final["usage"]["total_tokens"] == 14
    assert final["output"][1]["call_id"] == "call_7" and final["output"][1]["status"] == "completed"
    Response.model_validate(final)
    assert translator.response.id == final["id"]


def test_stream_incomplete() -> None:
    events, _ = run_stream(
        {"model": "m", "input": "x", "max_output_tokens": 1},
        [chunk({"content": "a"}), chunk({}, "length")],
    )
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert "usage" not in events[-1]["response"]  # the upstream sent none


def test_stream_failure_after_start() -> None:
    translator = ResponsesStream(skeleton(decode_request(b'{"model": "m", "input": "x"}')))
    frames = translator.start() + translator.feed(chunk({"content": "a"}))
    frames.append(translator.fail("All providers for model 'm' failed"))
    events = events_of(frames)
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["response"]["status"] == "failed"
    assert failed["response"]["error"] == {
        "code": "server_error",
        "message": "All providers for model 'm' failed",
    }
