"""Ollama's native API: the emulator checked with the official `ollama` client, then the
gateway translating it for the official `openai` SDK."""

from __future__ import annotations

import base64
import json
import os
import time
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
from .fake_ollama import FakeOllama
from .servers import AiohttpServer, UvicornServer, refused_port

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


def _config(ollama_url: str, fake_url: str, extra: str = "") -> str:
    return (
        f"""
providers:
  ollama:
    type: ollama
    base_url: {ollama_url}
    options: {{num_ctx: 4096}}
    keep_alive: 5m
    breaker: {{failures: 1000000}}
    {extra}
  down:
    type: ollama
    base_url: http://127.0.0.1:{refused_port()}
  backup:
    type: openai
    base_url: {fake_url}/backup/v1
models:
"""
        + "".join(
            f"  {m}:\n    - {{provider: ollama, model: {m}}}\n"
            "    - {provider: backup, model: echo}\n"
            for m in (
                "echo",
                "tools",
                "long",
                "status-500",
                "status-503",
                "status-400",
                "error-first",
                "error-mid",
                "truncated",
                "not-pulled",
            )
        )
        + "  down:\n    - {provider: down, model: echo}\n    - {provider: backup, model: echo}\n"
    )


@pytest.fixture(scope="module")
def gw(
    start_gateway: GatewayFactory, fake_url: str, emulator: tuple[FakeOllama, str]
) -> UvicornServer:
    return start_gateway(_config(emulator[1], fake_url))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="k", max_retries=0) as c:
        yield c


def _last(emulator: tuple[FakeOllama, str]) -> dict[str, Any]:
    return emulator[0].seen[-1]


def test_non_stream_answer_and_usage(client: openai.OpenAI, gw: UvicornServer) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=USER)
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.choices[0].finish_reason == "stop"
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
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: hello there"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions",
        json={"model": "echo", "messages": USER, "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        schemas.chunk(json.loads(event))


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
        model="echo", messages=USER, response_format={"type": "json_object"}
    )
    assert _last(emulator)["format"] == "json"


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="long", messages=USER, max_tokens=3)
    assert answer.choices[0].message.content == "w0 w1 w2"
    assert answer.choices[0].finish_reason == "length"


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
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    else:
        answer = client.chat.completions.create(model="tools", messages=USER, tools=TOOLS)
        assert answer.choices[0].finish_reason == "tool_calls"
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
    assert sent[1]["tool_calls"] == [{"function": {"name": "weather",
                                                   "arguments": {"city": "Paris"}}}]  # fmt: skip
    assert sent[2] == {"role": "tool", "content": "sunny", "tool_name": "weather"}


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
    assert _last(emulator)["messages"][0]["images"] == [png]
    remote: Any = [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
    with pytest.raises(openai.BadRequestError):  # Ollama cannot fetch URLs: the client's fault
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": remote}])


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("alias", "reason"),
    [
        ("down", "down:connect_error"),
        ("not-pulled", "ollama:model_missing"),
        ("status-500", "ollama:server_error"),
        ("status-503", "ollama:server_error"),
    ],
)
def test_falls_back(client: openai.OpenAI, alias: str, reason: str, stream: bool) -> None:
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=USER, stream=stream
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == reason
    if alias == "down":
        assert time.monotonic() - started < 1.0  # refused at once, not after a timeout


def test_error_line_before_content_falls_back(client: openai.OpenAI) -> None:
    stream = client.chat.completions.with_streaming_response.create(
        model="error-first", messages=USER, stream=True
    )
    with stream as resp:
        assert resp.headers["x-omnimind-fallbacks"] == "ollama:server_error"
        assert "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices) == (
            "echo: hello there"
        )


@pytest.mark.parametrize("alias", ["error-mid", "truncated"])
def test_failure_after_content_ends_with_an_error_event(gw: UvicornServer, alias: str) -> None:
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": alias, "messages": USER, "stream": True}
    )
    assert resp.headers["x-omnimind-provider"] == "ollama"
    events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    schemas.error(json.loads(events[-1]))


def test_bad_request_is_returned(gw: UvicornServer, emulator: tuple[FakeOllama, str]) -> None:
    resp = httpx.post(
        f"{gw.url}/v1/chat/completions", json={"model": "status-400", "messages": USER}
    )
    assert resp.status_code == 400
    schemas.error(resp.json())
    assert resp.json()["error"]["message"] == "emulated 400"


def test_default_models_yaml_serves_fast_tier_from_ollama(
    emulator: tuple[FakeOllama, str], tmp_path: Path
) -> None:
    """The shipped models.yaml, with OLLAMA_BASE_URL at an Ollama: its first tier answers."""
    fake, url = emulator
    config_text = (ROOT / "models.yaml").read_text().replace("qwen2:1.5b-instruct", "echo")
    path = tmp_path / "models.yaml"
    path.write_text(config_text, encoding="utf-8")
    old = os.environ.get("OLLAMA_BASE_URL")
    os.environ["OLLAMA_BASE_URL"] = url
    try:
        server = UvicornServer(create_app(load(path)))
    finally:
        if old is None:
            del os.environ["OLLAMA_BASE_URL"]
        else:
            os.environ["OLLAMA_BASE_URL"] = old
    try:
        resp = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "omnimind-fast", "messages": USER}, timeout=30,
        )  # fmt: skip
        assert resp.headers["x-omnimind-provider"] == "ollama"
        assert "x-omnimind-fallbacks" not in resp.headers
        assert fake.seen[-1]["model"] == "echo"
    finally:
        server.close()
