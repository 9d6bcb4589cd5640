"""Golden tests of the outbound translation: chat -> Anthropic request, Anthropic -> chat."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from proxy.errors import InvalidRequest, UpstreamError
from proxy.translate.from_anthropic import ChunkMaker, decode_message, to_completion
from proxy.translate.to_anthropic import ChatIn, to_anthropic

from . import schemas


def anthropic_of(body: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    chat = msgspec.json.decode(json.dumps(body).encode(), type=ChatIn)
    return msgspec.to_builtins(to_anthropic(chat, "claude-x", 1024, stream))  # type: ignore[no-any-return]


def test_request_golden() -> None:
    body = {
        "model": "alias",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
                ],
            },
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "g", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {
                "role": "tool",
                "tool_call_id": "call_2",
                "content": [{"type": "text", "text": "two"}],
            },
            {"role": "user", "content": "thanks"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "F", "parameters": {"type": "object"}},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_completion_tokens": 77,
        "stop": "END",
        "temperature": 1.5,
        "top_p": 0.9,
        "user": "u-9",
    }
    assert anthropic_of(body, stream=True) == {
        "model": "claude-x",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is it?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": "AAAA"},
                    },
                    {
                        "type": "image",
                        "source": {"type": "url", "url": "https://example.com/cat.png"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}},
                    {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "one"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "two"},
                    {"type": "text", "text": "thanks"},
                ],
            },
        ],
        "max_tokens": 77,
        "system": "Be brief.\n\nBe kind.",
        "stop_sequences": ["END"],
        "stream": True,
        "temperature": 1.0,
        "top_p": 0.9,
        "tools": [{"name": "f", "description": "F", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "metadata": {"user_id": "u-9"},
    }


def test_defaults_and_json_mode() -> None:
    out = anthropic_of(
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "c", "schema": {"type": "object"}},
            },
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        }
    )
    assert out["max_tokens"] == 1024 and "stream" not in out
    assert out["system"].startswith("Answer with a single JSON object only")
    assert out["system"].endswith('{"type":"object"}')
    assert "tool_choice" not in out  # no tools: nothing to choose


def test_n_is_unsupported_and_bad_arguments_are_400() -> None:
    with pytest.raises(UpstreamError) as err:
        anthropic_of({"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert err.value.reason == "unsupported"
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not"}}
    with pytest.raises(InvalidRequest):
        anthropic_of({"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]})
    with pytest.raises(InvalidRequest):
        anthropic_of(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}],
                    }
                ]
            }
        )


def message(content: list[dict[str, Any]], stop: str) -> bytes:
    return json.dumps(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 2},
        }
    ).encode()


def completion_of(body: bytes) -> dict[str, Any]:
    out = msgspec.to_builtins(to_completion(decode_message(body), "claude-x"))
    schemas.completion(out)
    return out  # type: ignore[no-any-return]


def test_completion_golden() -> None:
    out = completion_of(
        message(
            [
                {"type": "thinking", "thinking": "hm", "signature": "s"},
                {"type": "text", "text": "Let me check."},
                {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}},
            ],
            "tool_use",
        )
    )
    assert out["choices"] == [
        {
            "index": 0,
            "message": {
                "content": "Let me check.",
                "role": "assistant",
                "refusal": None,
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "function": {"name": "f", "arguments": '{"city":"Paris"}'},
                        "type": "function",
                    }
                ],
            },
            "finish_reason": "tool_calls",
            "logprobs": None,
        }
    ]
    assert out["usage"] == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    assert out["model"] == "claude-x" and out["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
    ],
)
def test_finish_reasons(stop: str, finish: str) -> None:
    out = completion_of(message([{"type": "text", "text": "x"}], stop))
    assert out["choices"][0]["finish_reason"] == finish


def test_not_a_message_is_bad_response() -> None:
    with pytest.raises(UpstreamError) as err:
        decode_message(b'{"type": "error", "error": {"type": "api_error", "message": "x"}}')
    assert err.value.reason == "bad_response"


def events(*objs: dict[str, Any]) -> list[bytes]:
    return [json.dumps(o).encode() for o in objs]


def test_chunks_golden() -> None:
    maker = ChunkMaker("claude-x", include_usage=True)
    start = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 9, "output_tokens": 1},
    }
    chunks: list[bytes] = []
    for data in events(
        {"type": "message_start", "message": start},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": '{"a"'},
        },
        {
            "type": "content_block_delta",
            "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": ": 1}"},
        },
        {"type": "content_block_stop", "index": 1},
        {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use", "stop_sequence": None},
            "usage": {"output_tokens": 12},
        },
        {"type": "message_stop"},
    ):
        chunks += maker.feed(data)
    assert maker.done
    objs = [json.loads(c) for c in chunks]
    for obj in objs:
        schemas.chunk(obj)
    deltas = [o["choices"][0]["delta"] if o["choices"] else None for o in objs]
    assert deltas[:5] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
    ]
    assert objs[5]["choices"][0]["finish_reason"] == "tool_calls"
    assert objs[6]["choices"] == [] and objs[6]["usage"] == {
        "prompt_tokens": 9,
        "completion_tokens": 12,
        "total_tokens": 21,
    }
    assert len({o["id"] for o in objs}) == 1


def test_error_event_raises() -> None:
    maker = ChunkMaker("m", include_usage=False)
    with pytest.raises(UpstreamError) as err:
        maker.feed(
            b'{"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}'
        )
    assert err.value.reason == "server_error" and "Overloaded" in err.value.message


def test_stop_sequence_is_named_like_vllm() -> None:
    body = json.loads(message([{"type": "text", "text": "x"}], "stop_sequence"))
    body["stop_sequence"] = "END"
    out = completion_of(json.dumps(body).encode())
    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["stop_reason"] == "END"
    assert (
        "stop_reason"
        not in completion_of(message([{"type": "text", "text": "x"}], "end_turn"))["choices"][0]
    )
    maker = ChunkMaker("m", include_usage=False)
    delta = {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    [chunk] = maker.feed(json.dumps({"type": "message_delta", "delta": delta}).encode())
    obj = json.loads(chunk)
    schemas.chunk(obj)
    assert obj["choices"][0]["stop_reason"] == "END"
