"""The response cache's key, bypass rules, and stream replay/assembly (pure functions)."""

from __future__ import annotations

import json

import msgspec

from proxy.cache import assemble, bypass, cache_key, replay, storable
from proxy.wire import ChatRequest


def _key(body: dict[str, object], alias: str = "m", op: str = "chat") -> str:
    return cache_key(alias, ChatRequest(json.dumps(body).encode()).fields, op)


MESSAGES = [{"role": "user", "content": "hi", "name": "a"}]


def test_the_key_ignores_order_and_delivery_fields_but_not_content() -> None:
    base = _key({"model": "m", "messages": MESSAGES, "temperature": 0})
    reordered = _key({"temperature": 0, "messages": [{"name": "a", "content": "hi",
                                                      "role": "user"}], "model": "m"})  # fmt: skip
    assert base == reordered and base.startswith("m/")
    delivery = {"stream": True, "stream_options": {"include_usage": True}, "user": "u1",
                "metadata": {"a": 1}}  # fmt: skip
    same = _key({"model": "m", "messages": MESSAGES, "temperature": 0, **delivery})
    assert same == base
    assert _key({"model": "m", "messages": MESSAGES, "temperature": 1}) != base
    assert _key({"model": "m", "messages": MESSAGES}) != base
    assert _key({"model": "m", "messages": MESSAGES, "temperature": 0}, alias="n") != base
    assert _key({"model": "m", "messages": MESSAGES, "temperature": 0}, op="completion") != base
    assert _key({"model": "x", "messages": MESSAGES, "temperature": 0}) == base  # alias decides


def test_cache_control_bypass() -> None:
    assert not bypass(None) and not bypass("") and not bypass("max-age=0")
    assert bypass("no-cache") and bypass("No-Store") and bypass("private, no-cache")
    assert storable(None) and storable("no-cache") and not storable("no-store")


COMPLETION = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "gpt",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris.",
                                         "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}  # fmt: skip


def test_replay_turns_an_answer_into_chunks_and_assemble_turns_them_back() -> None:
    chunks = [json.loads(c) for c in replay(json.dumps(COMPLETION).encode(), include_usage=True)]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Paris."}
    assert chunks[1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[2]["choices"] == [] and chunks[2]["usage"]["total_tokens"] == 7
    assert len(replay(json.dumps(COMPLETION).encode())) == 2  # no usage chunk unless asked
    body = assemble(replay(json.dumps(COMPLETION).encode(), include_usage=True))
    assert body is not None and json.loads(body) == COMPLETION


def test_tool_calls_survive_the_round_trip() -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}  # fmt: skip
    answer = json.loads(json.dumps(COMPLETION))
    answer["choices"][0]["message"].update(content=None, tool_calls=[call])
    answer["choices"][0]["finish_reason"] = "tool_calls"
    chunks = replay(json.dumps(answer).encode(), include_usage=True)
    assert json.loads(chunks[0])["choices"][0]["delta"]["tool_calls"] == [{"index": 0, **call}]
    # An upstream streams a call's arguments in pieces.
    pieces = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": 0, "id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": ""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '{"city":'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]  # fmt: skip
    body = assemble(json.dumps({"id": "x", "model": "gpt", **p}).encode() for p in pieces)
    assert body is not None
    message = json.loads(body)["choices"][0]["message"]
    assert message["tool_calls"] == [call] and message["content"] is None


def test_an_unfinished_or_broken_stream_is_not_cached() -> None:
    chunks = replay(json.dumps(COMPLETION).encode())
    assert assemble(chunks[:1]) is None  # no finish_reason: cut short
    assert assemble([chunks[0], b"{not json", chunks[1]]) is None
    assert assemble([]) is None
    assert msgspec.json.decode(assemble(chunks) or b"null")["usage"] is None
