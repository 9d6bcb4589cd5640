"""The Anthropic fake, checked with the official `anthropic` client (keeps the fake honest)."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import pytest

from .fake_anthropic import FakeAnthropic
from .servers import AiohttpServer

KEY = "sk-ant-fake-key"
WEATHER = {
    "name": "get_weather",
    "description": "Weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic(api_key=KEY)
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


@pytest.fixture
def client(fake_server: tuple[FakeAnthropic, str]) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=fake_server[1], api_key=KEY, max_retries=0) as c:
        yield c


def test_create_text(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model="claude-echo",
        max_tokens=50,
        system="be brief",
        messages=[{"role": "user", "content": "hello there"}],
    )
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello there"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 3


def test_stop_sequence_and_max_tokens(client: anthropic.Anthropic) -> None:
    stopped = client.messages.create(
        model="claude-echo",
        max_tokens=50,
        stop_sequences=["there"],
        messages=[{"role": "user", "content": "hello there friend"}],
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "there"
    cut = client.messages.create(
        model="claude-echo", max_tokens=2, messages=[{"role": "user", "content": "a b c d"}]
    )
    assert cut.stop_reason == "max_tokens"
    assert cut.content[0].type == "text" and cut.content[0].text == "echo: a"


def test_stream_text(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="claude-echo", max_tokens=50, messages=[{"role": "user", "content": "one two"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and "message_delta" in kinds
    assert final.content[0].type == "text" and final.content[0].text == "echo: one two"
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 3


def test_tool_round_trip_streamed(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="tools",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        first = stream.get_final_message()
    call = first.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert call.input == {"city": "Paris"} and first.stop_reason == "tool_use"
    second = client.messages.create(
        model="tools",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": first.content},  # type: ignore[typeddict-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.content[0].type == "text"
    assert second.content[0].text == f"tool {call.id} said: sunny"


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, anthropic.BadRequestError),
        (404, anthropic.NotFoundError),
        (429, anthropic.RateLimitError),
        (529, anthropic.APIStatusError),
    ],
)
def test_errors(client: anthropic.Anthropic, status: int, error_type: type[Exception]) -> None:
    with pytest.raises(error_type) as err:
        client.messages.create(
            model=f"status-{status}", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert isinstance(err.value, anthropic.APIStatusError)
    assert err.value.status_code == status
    body = err.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    if status == 429:
        assert err.value.response.headers["retry-after"] == "7"
    if status == 529:
        assert body["error"]["type"] == "overloaded_error"


def test_error_event_mid_stream(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError) as err:  # the SDK raises on an error event
        with client.messages.stream(
            model="error-mid", max_tokens=50, messages=[{"role": "user", "content": "a b c d"}]
        ) as stream:
            for _ in stream:
                pass
    assert "Overloaded" in str(err.value)


def test_wrong_key_and_models(fake_server: tuple[FakeAnthropic, str]) -> None:
    with anthropic.Anthropic(base_url=fake_server[1], api_key="wrong", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            bad.messages.create(
                model="claude-echo", max_tokens=5, messages=[{"role": "user", "content": "x"}]
            )
    with anthropic.Anthropic(base_url=fake_server[1], api_key=KEY, max_retries=0) as good:
        ids = [m.id for m in good.models.list()]
    assert "claude-echo" in ids
    seen = fake_server[0].seen[-1]
    sent = seen.headers.get("x-api-key") or seen.headers["authorization"].removeprefix("Bearer ")
    assert sent == KEY and "anthropic-version" in seen.headers
