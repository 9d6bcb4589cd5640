"""The `anthropic` provider against the Anthropic fake over a real socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from proxy.config import Entry, ProviderConfig, Secret
from proxy.errors import UpstreamError
from proxy.providers.anthropic import Adapter, Spec, probe
from proxy.providers.base import Call, Op
from proxy.reasons import Reason
from proxy.wire import ChatRequest

from . import schemas
from .fake_anthropic import FakeAnthropic
from .servers import AiohttpServer

KEY = "sk-ant-provider-test"
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic(api_key=KEY)
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def config(url: str, key: str = KEY) -> ProviderConfig:
    spec = Spec(base_url=url, max_tokens=321, headers={"x-extra": "1"})
    return ProviderConfig("claude", spec, Secret(key), {"x-extra": "1"})


def call(model: str, **body: Any) -> Call:
    body.setdefault("messages", [{"role": "user", "content": "hello there"}])
    raw = json.dumps({"model": "omnimind-hq", **body}).encode()
    entry = Entry("claude", model, timeout=10, connect_timeout=2, first_token_timeout=5)
    return Call(ChatRequest(raw), entry, "req-1")


async def collect(provider: Adapter, c: Call) -> list[dict[str, Any]]:
    out = []
    async for payload in provider.stream(c):
        obj = json.loads(payload)
        schemas.chunk(obj)
        out.append(obj)
    return out


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_complete(fake_server: tuple[FakeAnthropic, str]) -> None:
    fake, url = fake_server
    provider = Adapter(config(url))
    try:
        answer = await provider.complete(call("claude-echo"))
    finally:
        await provider.aclose()
    body = json.loads(answer.body)
    schemas.completion(body)
    assert body["choices"][0]["message"]["content"] == "echo: hello there"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    seen = fake.seen[-1]
    assert seen.body["max_tokens"] == 321 and seen.body["model"] == "claude-echo"
    assert seen.headers["x-api-key"] == KEY and seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["x-extra"] == "1" and "authorization" not in seen.headers


async def test_stream_with_usage_and_stop_sequence(fake_server: tuple[FakeAnthropic, str]) -> None:
    provider = Adapter(config(fake_server[1]))
    try:
        chunks = await collect(
            provider,
            call(
                "claude-echo",
                stream=True,
                stream_options={"include_usage": True},
                stop=["friend"],
                messages=[{"role": "user", "content": "hello there friend"}],
            ),
        )
    finally:
        await provider.aclose()
    assert text_of(chunks) == "echo: hello there "
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert fake_server[0].seen[-1].body["stop_sequences"] == ["friend"]


async def test_tool_round_trip(fake_server: tuple[FakeAnthropic, str]) -> None:
    provider = Adapter(config(fake_server[1]))
    try:
        chunks = await collect(provider, call("tools", stream=True, tools=[WEATHER]))
        calls = [
            tc
            for c in chunks
            if c["choices"]
            for tc in c["choices"][0]["delta"].get("tool_calls") or []
        ]
        call_id = calls[0]["id"]
        arguments = "".join(tc["function"].get("arguments") or "" for tc in calls)
        assert calls[0]["function"]["name"] == "get_weather" and json.loads(arguments) == {
            "city": "Paris"
        }
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assistant = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": arguments},
                }
            ],
        }
        messages = [
            {"role": "user", "content": "weather?"},
            assistant,
            {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
        ]
        answer = await provider.complete(call("tools", tools=[WEATHER], messages=messages))
    finally:
        await provider.aclose()
    body = json.loads(answer.body)
    assert body["choices"][0]["message"]["content"] == f"tool {call_id} said: sunny"


@pytest.mark.parametrize(
    ("model", "reason", "status"),
    [
        ("status-529", "server_error", 529),
        ("status-500", "server_error", 500),
        ("status-429", "rate_limited", 429),
        ("status-400", "client_error", 400),
        ("status-413", "client_error", 413),
        ("status-403", "upstream_auth", 403),
        ("status-404", "model_missing", 404),
    ],
)
async def test_status_errors(
    fake_server: tuple[FakeAnthropic, str], model: str, reason: str, status: int
) -> None:
    provider = Adapter(config(fake_server[1]))
    try:
        with pytest.raises(UpstreamError) as err:
            await provider.complete(call(model))
        with pytest.raises(UpstreamError) as streamed:
            await collect(provider, call(model, stream=True))
    finally:
        await provider.aclose()
    for e in (err.value, streamed.value):
        assert (e.reason, e.status) == (reason, status)
    if status == 429:
        assert err.value.retry_after == 7.0
    if status == 400:
        assert err.value.code == "invalid_request_error"


async def test_wrong_key_is_upstream_auth_and_never_leaks(
    fake_server: tuple[FakeAnthropic, str],
) -> None:
    provider = Adapter(config(fake_server[1], key="sk-ant-wrong"))
    try:
        with pytest.raises(UpstreamError) as err:
            await provider.complete(call("claude-echo"))
    finally:
        await provider.aclose()
    assert err.value.reason == "upstream_auth" and "sk-ant-wrong" not in str(err.value)


async def test_error_event_and_truncation_mid_stream(
    fake_server: tuple[FakeAnthropic, str],
) -> None:
    provider = Adapter(config(fake_server[1]))
    body = {"stream": True, "messages": [{"role": "user", "content": "a b c d"}]}
    try:
        for model, reason in (("error-mid", "server_error"), ("truncated", "bad_response")):
            got: list[bytes] = []
            with pytest.raises(UpstreamError) as err:
                async for payload in provider.stream(call(model, **body)):
                    got.append(payload)
            assert err.value.reason == reason and len(got) >= 2  # it failed after chunks
    finally:
        await provider.aclose()


async def test_bad_client_request_is_client_error(fake_server: tuple[FakeAnthropic, str]) -> None:
    provider = Adapter(config(fake_server[1]))
    bad = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
    try:
        with pytest.raises(UpstreamError) as err:
            await provider.complete(
                call(
                    "claude-echo",
                    messages=[{"role": "assistant", "content": None, "tool_calls": [bad]}],
                )
            )
    finally:
        await provider.aclose()
    assert err.value.reason == "client_error"


async def test_redirects_are_never_followed(fake_server: tuple[FakeAnthropic, str]) -> None:
    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(fake_server[1] + "/v1/messages")

    app = web.Application()
    app.router.add_post("/v1/messages", moved)
    redirector = AiohttpServer(app)
    before = len(fake_server[0].seen)
    provider = Adapter(config(redirector.url))
    try:
        with pytest.raises(UpstreamError) as err:
            await provider.complete(call("claude-echo"))
    finally:
        await provider.aclose()
        redirector.close()
    assert err.value.status == 307 and len(fake_server[0].seen) == before


async def test_probe(fake_server: tuple[FakeAnthropic, str]) -> None:
    seen = await probe(config(fake_server[1]))
    assert seen.ok and seen.models is not None and "claude-echo" in seen.models
    wrong = await probe(config(fake_server[1], key="sk-ant-wrong"))
    assert not wrong.ok and "401" in wrong.detail and "sk-ant-wrong" not in wrong.detail


async def test_entry_max_tokens_and_other_ops(fake_server: tuple[FakeAnthropic, str]) -> None:
    provider = Adapter(config(fake_server[1]))
    c = call("claude-echo")
    c.entry = Entry("claude", "claude-echo", 10, 2, 5, max_tokens=55)
    try:
        await provider.complete(c)
        assert fake_server[0].seen[-1].body["max_tokens"] == 55
        c.op = Op.EMBEDDING
        with pytest.raises(UpstreamError) as err:
            await provider.complete(c)
    finally:
        await provider.aclose()
    assert err.value.reason is Reason.UNSUPPORTED
