"""`POST /v1/responses` end to end: the official `openai` client's `responses.create` against
a real gateway, over the OpenAI-compatible fake and over the Anthropic fake, each also
behind a dead first entry. Answers and events are checked against OpenAI's schema."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from . import schemas
from .conftest import GatewayFactory
from .fake_anthropic import FakeAnthropic
from .fake_openai import FakeOpenAI
from .servers import AiohttpServer, UvicornServer, refused_port

GATEWAY_KEY = "gw-responses-key"
WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": False,
}
ALIASES = ["over-openai", "over-claude", "dead-then-openai", "dead-then-claude"]


@pytest.fixture(scope="module")
def claude_url() -> Iterator[str]:
    server = AiohttpServer(FakeAnthropic().app())
    yield server.url
    server.close()


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str, claude_url: str) -> UvicornServer:
    dead = f"http://127.0.0.1:{refused_port()}/v1"
    return start_gateway(f"""
        server: {{audit_log: off, api_keys: ["{GATEWAY_KEY}", "gw-other-key"]}}
        providers:
          oa: {{type: openai, base_url: "{fake_url}/resp/v1"}}
          claude: {{type: anthropic, base_url: "{claude_url}"}}
          dead: {{type: openai, base_url: "{dead}", breaker: {{failures: 1000000}}}}
        models:
          over-openai: [{{provider: oa, model: echo}}]
          over-claude: [{{provider: claude, model: echo}}]
          dead-then-openai: [{{provider: dead, model: echo}}, {{provider: oa, model: echo}}]
          dead-then-claude: [{{provider: dead, model: echo}}, {{provider: claude, model: echo}}]
          tools-openai: [{{provider: oa, model: tools}}]
          tools-anthropic: [{{provider: claude, model: tools}}]
          json: [{{provider: oa, model: json}}]
          fails-midway: [{{provider: oa, model: error-mid}}]
        """)


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=GATEWAY_KEY, max_retries=0) as c:
        yield c


@pytest.mark.parametrize("alias", ALIASES)
def test_create(client: openai.OpenAI, alias: str) -> None:
    response = client.responses.create(model=alias, input="hello there", instructions="Be brief.")
    schemas.response(response.model_dump(mode="json", exclude_unset=True))
    assert response.status == "completed" and response.output_text == "echo: hello there"
    assert response.usage is not None and response.usage.output_tokens > 0


@pytest.mark.parametrize("alias", ALIASES)
def test_stream(client: openai.OpenAI, alias: str) -> None:
    events = list(client.responses.create(model=alias, input="one two three", stream=True))
    for event in events:
        schemas.response_event(event.model_dump(mode="json", exclude_unset=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "echo: one two three"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage is not None


def test_stream_helper(client: openai.OpenAI) -> None:
    with client.responses.stream(model="dead-then-claude", input="a b") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == "echo: a b"


@pytest.mark.parametrize("alias", ["tools-openai", "tools-anthropic"])
@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip(client: openai.OpenAI, alias: str, stream: bool) -> None:
    ask: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    if stream:
        with client.responses.stream(model=alias, input=ask, tools=[WEATHER]) as s:
            first = s.get_final_response()
    else:
        first = client.responses.create(model=alias, input=ask, tools=[WEATHER])
    call = next(item for item in first.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
    second = client.responses.create(
        model=alias,
        input=[*ask, *first.output, output],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    if alias == "tools-anthropic":
        assert second.output_text == f"tool {call.call_id} said: sunny"


def test_tool_output_reaches_openai_upstream(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    items: Any = [
        {"role": "user", "content": "weather?"},
        {
            "type": "function_call",
            "call_id": "call_5",
            "name": "get_weather",
            "arguments": '{"city":"Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_5", "output": "sunny"},
    ]
    client.responses.create(
        model="tools-openai", input=items, tools=[WEATHER], max_output_tokens=40
    )
    body = next(s.body for s in reversed(fake.seen) if s.tag == "resp")
    assert body["messages"][1]["tool_calls"][0]["id"] == "call_5"
    assert body["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_5"}
    assert body["max_tokens"] == 40 and body["tools"][0]["function"]["name"] == "get_weather"


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = client.responses.create(
        model="json",
        input="capital of France?",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    assert json.loads(response.output_text) == {"city": "Paris"}


def test_previous_response_id(gw: UvicornServer, client: openai.OpenAI, fake: FakeOpenAI) -> None:
    first = client.responses.create(model="over-openai", input="first turn")
    second = client.responses.create(
        model="over-openai", input="second turn", previous_response_id=first.id
    )
    assert second.previous_response_id == first.id
    body = next(s.body for s in reversed(fake.seen) if s.tag == "resp")
    assert [m["content"] for m in body["messages"]] == [
        "first turn",
        "echo: first turn",
        "second turn",
    ]
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="gw-other-key", max_retries=0) as other:
        with pytest.raises(openai.BadRequestError):  # another key never sees it
            other.responses.create(model="over-openai", input="x", previous_response_id=first.id)
    unstored = client.responses.create(model="over-openai", input="x", store=False)
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model="over-openai", input="y", previous_response_id=unstored.id)
    assert err.value.code == "previous_response_not_found"


def test_failure_after_start_is_response_failed(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="fails-midway", input="a b c", stream=True))
    assert events[0].type == "response.created"
    assert events[-1].type == "response.failed"
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed" and failed.error is not None


def test_errors_are_openai_shaped(gw: UvicornServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="no-such-alias", input="x")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="over-openai", input="x", tools=[{"type": "web_search"}])
    answer = httpx.post(
        f"{gw.url}/v1/responses",
        headers={"authorization": f"Bearer {GATEWAY_KEY}"},
        json={"model": "over-openai", "input": "x", "background": True},
    )
    assert answer.status_code == 400
    schemas.error(answer.json())


def test_gateway_headers(gw: UvicornServer) -> None:
    answer = httpx.post(
        f"{gw.url}/v1/responses",
        headers={"authorization": f"Bearer {GATEWAY_KEY}"},
        json={"model": "dead-then-claude", "input": "hi"},
    )
    assert answer.status_code == 200 and answer.json()["status"] == "completed"
    schemas.response(answer.json())  # the wire bytes themselves, not the SDK's model of them
    assert answer.headers["x-omnimind-provider"] == "claude"
    assert answer.headers["x-omnimind-fallbacks"] == "dead:connect_error"


def test_a_streamed_response_is_stored_too(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    with client.responses.stream(model="over-openai", input="streamed turn") as stream:
        first = stream.get_final_response()
    client.responses.create(model="over-openai", input="next", previous_response_id=first.id)
    body = next(s.body for s in reversed(fake.seen) if s.tag == "resp")
    assert [m["content"] for m in body["messages"]] == [
        "streamed turn",
        "echo: streamed turn",
        "next",
    ]


@pytest.mark.parametrize("alias", ["over-openai", "tools-anthropic"])
def test_raw_stream_events_match_the_schema(gw: UvicornServer, alias: str) -> None:
    body = {"model": alias, "input": "weather?", "tools": [WEATHER], "stream": True}
    headers = {"authorization": f"Bearer {GATEWAY_KEY}"}
    with httpx.stream("POST", f"{gw.url}/v1/responses", headers=headers, json=body) as resp:
        lines = [line for line in resp.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert names == [e["type"] for e in events]
    for event in events:
        schemas.response_event(event)
    assert events[-1]["type"] == "response.completed"
