"""Ollama's native API: the emulator checked with the official `ollama` client, then the
gateway translating it for the official `openai` SDK."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from proxy.app import create_app
from proxy.config import load

from . import schemas
from .conftest import GatewayFactory
from .fake_ollama import BIG, FakeOllama
from .fake_openai import FakeOpenAI
from .servers import AiohttpServer, UvicornServer

ROOT = Path(__file__).resolve().parents[1]
USER: list[Any] = [{"role": "user", "content": "hello there"}]
TOOLS: Any = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]  # fmt: skip


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


# ---- the emulator is faithful: the official ollama client accepts it ------------------------


def test_official_ollama_client_against_the_emulator(emulator: tuple[FakeOllama, str]) -> None:
    _, url = emulator
    with ollama.Client(host=url) as client:
        _official_client_calls(client)


async def test_official_async_ollama_client(emulator: tuple[FakeOllama, str]) -> None:
    async with ollama.AsyncClient(host=emulator[1]) as client:
        answer = await client.chat(model="echo", messages=USER)
        assert answer.message.content == "echo: hello there"
        parts = [p async for p in await client.chat(model="long", messages=USER, stream=True)]
        assert "".join(p.message.content or "" for p in parts) == " ".join(
            f"w{i}" for i in range(10)
        )
        assert parts[-1].done and parts[-1].eval_count == 10
        called = await client.chat(model="tools", messages=USER, tools=TOOLS)
        assert called.message.tool_calls is not None
        with pytest.raises(ollama.ResponseError) as err:
            await client.chat(model="status-503", messages=USER)
        assert err.value.status_code == 503 and "server busy" in err.value.error


def _official_client_calls(client: ollama.Client) -> None:
    answer = client.chat(model="echo", messages=USER)
    assert answer.message.content == "echo: hello there" and answer.done
    assert answer.eval_count == 3 and answer.prompt_eval_count == 2
    parts = list(client.chat(model="echo", messages=USER, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "echo: hello there"
    assert parts[-1].done and parts[-1].done_reason == "stop"
    called = client.chat(model="tools", messages=USER, tools=TOOLS)
    assert called.message.tool_calls[0].function.arguments == {"city": "Paris"}  # type: ignore[index]
    assert "echo:latest" in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="not-pulled", messages=USER)
    assert err.value.status_code == 404


# ---- through the gateway ----------------------------------------------------------------------

OLLAMA_KEY = "ollama-proxy-canary-9z8y"
BEHAVIOURS = ("echo", "tools", "long", "big", "status-500", "status-503", "status-400",
              "error-first", "error-mid", "truncated", "bad-json", "not-pulled")  # fmt: skip


def _pair(alias: str, provider: str, model: str) -> str:
    """An alias served by `provider` first, then by the OpenAI backup's echo."""
    return (
        f"  {alias}:\n    - {{provider: {provider}, model: {model}}}\n"
        "    - {provider: backup, model: echo}\n"
    )


def _config(ollama_url: str, fake_url: str) -> str:
    return (
        f"""
providers:
  ollama:
    type: ollama
    base_url: {ollama_url}
    headers: {{Authorization: Bearer {OLLAMA_KEY}}}
    options: {{num_ctx: 4096}}
    keep_alive: 5m
    breaker: {{failures: 1000000}}
  nocheck:
    type: ollama
    base_url: {ollama_url}
    check_models: false
    breaker: {{failures: 1000000}}
  backup:
    type: openai
    base_url: {fake_url}/backup/v1
models:
"""
        + "".join(_pair(m, "ollama", m) for m in BEHAVIOURS)
        + _pair("nocheck-not-pulled", "nocheck", "not-pulled")
        + "  ollama-only:\n    - {provider: ollama, model: echo}\n"
    )


@pytest.fixture(scope="module")
def gw(
    start_gateway: GatewayFactory, fake_url: str, emulator: tuple[FakeOllama, str]
) -> UvicornServer:
    return start_gateway(_config(emulator[1], fake_url))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-client-key", max_retries=0) as c:
        yield c


def _last(emulator: tuple[FakeOllama, str]) -> dict[str, Any]:
    return emulator[0].seen[-1]


def _events(resp: httpx.Response) -> list[str]:
    return [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]


def test_non_stream_answer_and_usage(client: openai.OpenAI, gw: UvicornServer) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=USER)
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == "echo" and answer.id.startswith("chatcmpl-")
    assert answer.usage is not None and answer.usage.prompt_tokens == 2
    assert answer.usage.completion_tokens == 3 and answer.usage.total_tokens == 5
    assert raw.headers["x-omnimind-provider"] == "ollama"
    body = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "echo", "messages": USER})
    schemas.completion(body.json())


def test_stream_answer_usage_and_schema(client: openai.OpenAI, gw: UvicornServer) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: hello there"
    )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len({c.id for c in chunks}) == 1
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "echo", "messages": USER, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    events = _events(resp)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        schemas.chunk(json.loads(event))
    plain = client.chat.completions.create(model="echo", messages=USER, stream=True)
    assert all(c.usage is None for c in plain)  # usage only when asked for


def test_options_format_and_keep_alive_are_translated(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str]
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    client.chat.completions.create(
        model="echo", messages=USER, temperature=0.3, top_p=0.9, seed=42, stop=["x"],
        max_tokens=50, presence_penalty=0.1, frequency_penalty=0.2,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )  # fmt: skip
    sent = _last(emulator)
    assert sent["model"] == "echo" and sent["stream"] is False and sent["keep_alive"] == "5m"
    assert sent["format"] == schema
    assert sent["options"] == {
        "num_ctx": 4096, "temperature": 0.3, "top_p": 0.9, "seed": 42, "stop": ["x"],
        "num_predict": 50, "presence_penalty": 0.1, "frequency_penalty": 0.2,
    }  # fmt: skip
    client.chat.completions.create(
        model="echo", messages=USER, response_format={"type": "json_object"}, stream=True,
        max_completion_tokens=7, stop="END",
    ).close()  # fmt: skip
    sent = _last(emulator)
    assert sent["format"] == "json" and sent["stream"] is True
    assert sent["options"] == {"num_ctx": 4096, "num_predict": 7, "stop": ["END"]}


def test_roles_and_tool_choice_none_are_translated(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str]
) -> None:
    messages: Any = [
        {"role": "developer", "content": "be brief"},
        {"role": "system", "content": [{"type": "text", "text": "a "},
                                       {"type": "text", "text": "b"}]},
        *USER,
    ]  # fmt: skip
    answer = client.chat.completions.create(
        model="echo", messages=messages, tools=TOOLS, tool_choice="none"
    )
    assert answer.choices[0].message.content == "echo: hello there"
    sent = _last(emulator)
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "system", "content": "a b"},
        {"role": "user", "content": "hello there"},
    ]
    assert "tools" not in sent  # Ollama has no tool_choice: "none" means no tools at all


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="long", messages=USER, max_tokens=3)
    assert answer.choices[0].message.content == "w0 w1 w2"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    chunks = list(client.chat.completions.create(
        model="long", messages=USER, max_tokens=3, stream=True))  # fmt: skip
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str], stream: bool
) -> None:
    if stream:
        chunks = list(client.chat.completions.create(
            model="tools", messages=USER, tools=TOOLS, stream=True))  # fmt: skip
        delta = next(
            c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls
        )
        call: Any = delta.tool_calls[0]  # type: ignore[index]
        assert call.index == 0 and call.type == "function"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    else:
        answer = client.chat.completions.create(model="tools", messages=USER, tools=TOOLS)
        assert answer.choices[0].finish_reason == "tool_calls"
        assert answer.choices[0].message.content is None
        call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.id.startswith("call_") and call.function.name == "weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert _last(emulator)["tools"] == TOOLS
    followup: Any = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]  # fmt: skip
    answer = client.chat.completions.create(model="tools", messages=followup, tools=TOOLS)
    assert answer.choices[0].message.content == "tool weather said: sunny"
    sent = _last(emulator)["messages"]
    assert sent[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "weather", "arguments": {"city": "Paris"}}}]}  # fmt: skip
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_name": "weather"}


def test_tool_calls_stream_like_openai(client: openai.OpenAI, fake_url: str) -> None:
    """The same tool call, streamed by the OpenAI fake and by Ollama through the gateway."""
    with openai.OpenAI(base_url=f"{fake_url}/direct/v1", api_key="k") as direct:
        reference = list(
            direct.chat.completions.create(model="tools", messages=USER, tools=TOOLS, stream=True)
        )
    ours = list(client.chat.completions.create(
        model="tools", messages=USER, tools=TOOLS, stream=True))  # fmt: skip

    def calls(chunks: list[Any]) -> list[tuple[int, str, Any]]:
        return [
            (t.index, t.function.name, json.loads(t.function.arguments))
            for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []
        ]  # fmt: skip

    assert calls(ours) == calls(reference) == [(0, "weather", {"city": "Paris"})]


def test_image_message(client: openai.OpenAI, emulator: tuple[FakeOllama, str]) -> None:
    png = base64.b64encode(b"\x89PNG fake image bytes").decode()
    content: Any = [
        {"type": "text", "text": "what is this"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
    ]
    answer = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": content}]
    )
    assert answer.choices[0].message.content == "echo: what is this [images: 1]"
    assert _last(emulator)["messages"][0] == {
        "role": "user", "content": "what is this", "images": [png]
    }  # fmt: skip


def test_remote_image_url_passes_to_a_provider_that_can_fetch_it(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str]
) -> None:
    before = len(emulator[0].seen)
    remote: Any = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": remote}]
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == "ollama:unsupported"
    assert len(emulator[0].seen) == before  # Ollama was never called
    with pytest.raises(openai.BadRequestError) as err:  # no entry can: the client's error
        client.chat.completions.create(
            model="ollama-only", messages=[{"role": "user", "content": remote}]
        )
    assert "base64 data URL" in err.value.message


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_body_is_the_clients_error(gw: UvicornServer, stream: bool) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": 5}], "stream": stream}
    resp = httpx.post(f"{gw.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400  # not a fallback to the backup, which would accept it
    schemas.error(resp.json())
    assert resp.json()["error"]["param"] == "messages[0].content"


def test_only_configured_headers_go_upstream(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str]
) -> None:
    client.chat.completions.create(
        model="echo", messages=USER, extra_headers={"X-Secret-Client-Header": "nope"}
    )
    seen = emulator[0].requests
    chat = [r for r in seen if r.path == "/api/chat"][-1]
    assert chat.headers["authorization"] == f"Bearer {OLLAMA_KEY}"
    assert "x-secret-client-header" not in chat.headers
    assert "sk-client-key" not in json.dumps(chat.headers)
    tags = [r.headers for r in seen if r.path == "/api/tags"]  # the official client's too
    assert any(h.get("authorization") == f"Bearer {OLLAMA_KEY}" for h in tags)
    assert "sk-client-key" not in json.dumps(tags)


# The faults every adapter shares (refused, 5xx, bad JSON, errors before and after the
# first line, truncation) are in test_contract.py's fault matrix; these are Ollama's own.
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("not-pulled", "ollama:model_missing"),  # known from /api/tags
        ("nocheck-not-pulled", "nocheck:model_missing"),  # from /api/chat's 404
    ],
)
def test_unpulled_model_falls_back(
    client: openai.OpenAI, emulator: tuple[FakeOllama, str], alias: str, reason: str,
    stream: bool,
) -> None:  # fmt: skip
    chats = len(emulator[0].chats("not-pulled"))
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=USER, stream=stream
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == reason
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices) == (
            "echo: hello there"
        )
    else:
        assert raw.parse().choices[0].message.content == "echo: hello there"
    if alias == "not-pulled":
        assert len(emulator[0].chats("not-pulled")) == chats  # /api/chat never called
    if alias == "nocheck-not-pulled":
        assert len(emulator[0].chats("not-pulled")) == chats + 1


@pytest.mark.parametrize("alias", ["error-mid", "truncated"])
def test_failure_after_content_ends_with_an_error_event(gw: UvicornServer, alias: str) -> None:
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": alias, "messages": USER, "stream": True}
    )
    assert resp.headers["x-omnimind-provider"] == "ollama"  # committed at the first chunk
    assert "x-omnimind-fallbacks" not in resp.headers
    events = _events(resp)
    assert "[DONE]" not in events
    error = json.loads(events[-1])
    schemas.error(error)
    assert error["error"]["code"] == ("server_error" if alias == "error-mid" else "bad_response")
    chunks = [json.loads(e) for e in events[:-1]]
    for chunk in chunks:
        schemas.chunk(chunk)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "w0 w1"


def test_failure_after_content_raises_in_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="error-mid", messages=USER, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_long_line_streams(client: openai.OpenAI) -> None:
    """A line over aiohttp's line limit (a long tool call comes as one line too)."""
    stream = client.chat.completions.create(model="big", messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == BIG


@pytest.mark.parametrize("stream", [False, True])
def test_bad_request_is_returned(gw: UvicornServer, fake: FakeOpenAI, stream: bool) -> None:
    before = len(fake.calls("backup"))
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "status-400", "messages": USER, "stream": stream},
    )
    assert resp.status_code == 400
    schemas.error(resp.json())
    assert resp.json()["error"]["message"] == "emulated 400"
    assert len(fake.calls("backup")) == before  # never retried elsewhere


async def test_failed_tags_call_never_fails_a_request(
    start_gateway: GatewayFactory, fake_url: str
) -> None:
    fake = FakeOllama(tags_status=500)
    server = AiohttpServer(fake.app())
    try:
        gateway = start_gateway(
            f"""
            providers:
              ollama: {{type: ollama, base_url: "{server.url}"}}
            models:
              echo: [{{provider: ollama, model: echo}}]
            """
        )
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="k") as aclient:
            raw = await aclient.chat.completions.with_raw_response.create(
                model="echo", messages=USER
            )
        assert raw.headers["x-omnimind-provider"] == "ollama"
        assert raw.parse().choices[0].message.content == "echo: hello there"
        assert [r.path for r in fake.requests] == ["/api/tags", "/api/chat"]
    finally:
        server.close()


def test_default_models_yaml_serves_fast_tier_from_ollama(
    emulator: tuple[FakeOllama, str],
) -> None:
    """The shipped models.yaml, unchanged, with OLLAMA_BASE_URL at an Ollama: ollama answers."""
    fake, url = emulator
    old = os.environ.get("OLLAMA_BASE_URL")
    os.environ["OLLAMA_BASE_URL"] = url
    try:
        config = load(ROOT / "models.yaml")
    finally:
        if old is None:
            del os.environ["OLLAMA_BASE_URL"]
        else:
            os.environ["OLLAMA_BASE_URL"] = old
    server = UvicornServer(create_app(config))
    try:
        resp = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "omnimind-fast", "messages": USER}, timeout=30,
        )  # fmt: skip
        assert resp.status_code == 200
        assert resp.headers["x-omnimind-provider"] == "ollama"
        assert resp.headers["x-omnimind-model"] == "qwen2:1.5b-instruct"
        assert "x-omnimind-fallbacks" not in resp.headers
        assert resp.json()["choices"][0]["message"]["content"] == "echo: hello there"
        assert fake.seen[-1]["model"] == "qwen2:1.5b-instruct"
    finally:
        server.close()
