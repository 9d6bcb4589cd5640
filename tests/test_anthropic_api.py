"""`POST /v1/messages` end to end: the official `anthropic` client against a real gateway,
over the OpenAI-compatible fake and over the Anthropic fake (via the `anthropic` provider),
each also behind a dead first entry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pydantic
import pytest

from .conftest import GatewayFactory
from .fake_anthropic import FakeAnthropic
from .fake_openai import FakeOpenAI
from .servers import AiohttpServer, UvicornServer, refused_port

GATEWAY_KEY = "gw-anthropic-key"
UPSTREAM_KEY = "sk-ant-upstream"
WEATHER: Any = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
ALIASES = ["over-openai", "over-claude", "dead-then-openai", "dead-then-claude"]


@pytest.fixture(scope="module")
def claude_fake() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic(api_key=UPSTREAM_KEY)
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


@pytest.fixture(scope="module")
def gw(
    start_gateway: GatewayFactory, fake_url: str, claude_fake: tuple[FakeAnthropic, str]
) -> UvicornServer:
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    return start_gateway(f"""
        server: {{audit_log: off, api_keys: ["{GATEWAY_KEY}"]}}
        providers:
          oa: {{type: openai, base_url: "{fake_url}/msgs/v1"}}
          claude: {{type: anthropic, base_url: "{claude_fake[1]}", api_key: {UPSTREAM_KEY}}}
          dead: {{type: openai, base_url: "{dead}", breaker: {{failures: 1000000}}}}
        models:
          over-openai: [{{provider: oa, model: echo}}]
          over-claude: [{{provider: claude, model: echo}}]
          dead-then-openai: [{{provider: dead, model: echo}}, {{provider: oa, model: echo}}]
          dead-then-claude: [{{provider: dead, model: echo}}, {{provider: claude, model: echo}}]
          tools-openai: [{{provider: oa, model: tools}}]
          tools-anthropic: [{{provider: claude, model: tools}}]
          fails-midway: [{{provider: oa, model: error-mid}}]
          all-dead: [{{provider: dead, model: echo}}]
        """)


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=GATEWAY_KEY, max_retries=0) as c:
        yield c


@pytest.mark.parametrize("alias", ALIASES)
def test_create(client: anthropic.Anthropic, alias: str) -> None:
    message = client.messages.create(
        model=alias,
        max_tokens=100,
        system="Be brief.",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert message.content[0].type == "text" and message.content[0].text == "echo: hello there"
    assert message.stop_reason == "end_turn" and message.usage.output_tokens > 0
    assert message.usage.input_tokens > 0


@pytest.mark.parametrize("alias", ALIASES)
def test_stream(client: anthropic.Anthropic, alias: str) -> None:
    with client.messages.stream(
        model=alias, max_tokens=100, messages=[{"role": "user", "content": "one two three"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == "echo: one two three"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0 and final.usage.input_tokens > 0


@pytest.mark.parametrize("alias", ["tools-openai", "tools-anthropic"])
def test_tool_round_trip(client: anthropic.Anthropic, alias: str) -> None:
    ask: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    with client.messages.stream(model=alias, max_tokens=100, tools=[WEATHER], messages=ask) as s:
        first = s.get_final_message()
    call = next(b for b in first.content if b.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert first.stop_reason == "tool_use"
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}
    second = client.messages.create(
        model=alias,
        max_tokens=100,
        tools=[WEATHER],
        messages=[
            *ask,
            {"role": "assistant", "content": first.content},
            {"role": "user", "content": [result]},
        ],
    )
    if alias == "tools-anthropic":
        assert second.content[0].type == "text"
        assert second.content[0].text == f"tool {call.id} said: sunny"
    else:  # the OpenAI fake calls its tool again; the round trip is in what it received
        assert second.stop_reason == "tool_use"


def test_tool_result_reaches_openai_upstream(client: anthropic.Anthropic, fake: FakeOpenAI) -> None:
    messages: Any = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_9",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                }
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "sunny"}],
        },
    ]
    client.messages.create(model="tools-openai", max_tokens=50, tools=[WEATHER], messages=messages)
    body = next(s.body for s in reversed(fake.seen) if s.tag == "msgs")
    assert body["messages"][1]["tool_calls"][0]["id"] == "toolu_9"
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "toolu_9"}
    assert body["max_tokens"] == 50 and body["tools"][0]["function"]["name"] == "get_weather"


def test_anthropic_upstream_gets_its_own_headers_only(
    gw: UvicornServer, claude_fake: tuple[FakeAnthropic, str]
) -> None:
    answer = httpx.post(
        f"{gw.url}/v1/messages",
        headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"},
        json={
            "model": "over-claude",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert answer.status_code == 200 and answer.json()["type"] == "message"
    seen = claude_fake[0].seen[-1]
    assert seen.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in seen.headers
    assert GATEWAY_KEY not in str(seen.headers)


def test_errors_are_anthropic_shaped(gw: UvicornServer, client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        client.messages.create(
            model="no-such-alias", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    bad = httpx.post(
        f"{gw.url}/v1/messages",
        headers={"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"},
        json={"model": "over-openai", "messages": [{"role": "user", "content": "x"}]},
    )
    assert bad.status_code == 400 and bad.json()["type"] == "error"
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.json()["error"]["message"]
    with anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as auth:
            wrong.messages.create(
                model="over-openai", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    assert auth.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.APIStatusError) as dead:
        client.messages.create(
            model="all-dead", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert dead.value.status_code >= 500 and dead.value.body["type"] == "error"  # type: ignore[index]


def test_failure_after_start_is_an_error_event(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError):
        with client.messages.stream(
            model="fails-midway", max_tokens=50, messages=[{"role": "user", "content": "a b c"}]
        ) as stream:
            for _ in stream:
                pass


def test_count_tokens(client: anthropic.Anthropic) -> None:
    counted = client.messages.count_tokens(
        model="over-openai",
        system="Be brief.",
        tools=[WEATHER],
        messages=[{"role": "user", "content": "hello there " * 50}],
    )
    assert 100 < counted.input_tokens < 1000


def test_stop_sequence_survives_an_anthropic_upstream(client: anthropic.Anthropic) -> None:
    ask: Any = [{"role": "user", "content": "hello there friend"}]
    message = client.messages.create(
        model="over-claude", max_tokens=50, stop_sequences=["friend"], messages=ask
    )
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "friend")
    with client.messages.stream(
        model="dead-then-claude", max_tokens=50, stop_sequences=["friend"], messages=ask
    ) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "friend")
    assert final.content[0].type == "text" and final.content[0].text == "echo: hello there "


def test_gateway_headers_and_unknown_alias_count(gw: UvicornServer) -> None:
    headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
    ask = {"max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(
        f"{gw.url}/v1/messages", headers=headers, json={"model": "dead-then-claude", **ask}
    )
    assert answer.headers["x-omnimind-provider"] == "claude"
    assert answer.headers["x-omnimind-fallbacks"] == "dead:connect_error"
    assert answer.headers["x-omnimind-attempts"] == "2"
    counted = httpx.post(
        f"{gw.url}/v1/messages/count_tokens", headers=headers, json={"model": "nope", **ask}
    )
    assert counted.status_code == 404 and counted.json()["error"]["type"] == "not_found_error"


def test_anthropic_upstream_is_relayed_as_is(
    gw: UvicornServer, claude_fake: tuple[FakeAnthropic, str]
) -> None:
    headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
    body: dict[str, Any] = {
        "model": "dead-then-claude",
        "max_tokens": 20,
        "top_k": 5,
        "thinking": {"type": "disabled"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi", "citations": None}]}
        ],
    }
    answer = httpx.post(f"{gw.url}/v1/messages", headers=headers, json=body)
    sent = claude_fake[0].seen[-1].body
    assert sent == {**body, "model": "echo", "stream": False}  # the client's body, untouched
    relayed = answer.json()
    assert relayed["usage"]["cache_read_input_tokens"] == 0  # the upstream's own fields
    assert relayed["id"].startswith("msg_") and relayed["content"][0]["text"] == "echo: hi"
    with httpx.stream(
        "POST", f"{gw.url}/v1/messages", headers=headers, json={**body, "stream": True}
    ) as streamed:
        lines = [line for line in streamed.iter_lines() if line.startswith("event: ")]
    assert claude_fake[0].seen[-1].body["stream"] is True
    # the fake's own order (its ping after the first block start), not the translator's
    assert lines[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert lines[-2:] == ["event: message_delta", "event: message_stop"]


@pytest.mark.parametrize("alias", ["over-openai", "tools-openai"])
def test_raw_wire_matches_the_sdk_types(gw: UvicornServer, alias: str) -> None:
    """The SDK builds its objects without validating: validate the wire bytes here."""
    headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
    body: dict[str, Any] = {
        "model": alias,
        "max_tokens": 20,
        "tools": [WEATHER],
        "messages": [{"role": "user", "content": "hi"}],
    }
    answer = httpx.post(f"{gw.url}/v1/messages", headers=headers, json=body)
    anthropic.types.Message.model_validate(answer.json())
    with httpx.stream(
        "POST", f"{gw.url}/v1/messages", headers=headers, json={**body, "stream": True}
    ) as resp:
        lines = [line for line in resp.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [line[7:] for line in lines if line.startswith("event: ")] == [e["type"] for e in events]
    adapter = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for event in events:
        if event["type"] != "ping":
            adapter.validate_python(event)
