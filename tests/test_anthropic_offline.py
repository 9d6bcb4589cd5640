"""Both translated APIs from a local model, offline, behind a dead first entry (the shape of
the shipped `omnimind-fast`: Ollama not running, then local transformers inference), and
an `anthropic` entry without its key skipped at no cost (an `omnimind-hq` that lists one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from .conftest import GatewayFactory
from .servers import UvicornServer, refused_port


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, tiny_dir: Path, fake_url: str) -> UvicornServer:
    dead = f"http://127.0.0.1:{refused_port()}"
    return start_gateway(f"""
        server: {{audit_log: off}}
        providers:
          ollama: {{type: ollama, base_url: "{dead}", connect_timeout: 1}}
          local: {{type: huggingface, max_new_tokens: 8}}
          claude: {{type: anthropic, api_key: "${{OMNIMIND_TEST_UNSET_KEY:-}}"}}
          backup: {{type: openai, base_url: "{fake_url}/offline/v1"}}
        models:
          omnimind-fast:
            - {{provider: ollama, model: "qwen2:1.5b-instruct"}}
            - {{provider: local, model: "{tiny_dir}"}}
          omnimind-hq:
            - {{provider: claude, model: claude-sonnet-4-5}}
            - {{provider: backup, model: echo}}
        """)


@pytest.fixture
def claude(gw: UvicornServer) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key="unused-locally", max_retries=0) as c:
        yield c


@pytest.fixture
def oai(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused-locally", max_retries=0) as c:
        yield c


def test_messages_from_a_local_model(claude: anthropic.Anthropic) -> None:
    ask: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hello!"}]
    message = claude.messages.create(model="omnimind-fast", max_tokens=5, messages=ask)
    assert message.content[0].type == "text" and message.usage.output_tokens > 0
    assert message.stop_reason in ("end_turn", "max_tokens")
    with claude.messages.stream(model="omnimind-fast", max_tokens=5, messages=ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.content[0].text == text


def test_responses_from_a_local_model(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="omnimind-fast", input="Hello!", max_output_tokens=5)
    assert response.status in ("completed", "incomplete") and response.usage is not None
    events = list(oai.responses.create(model="omnimind-fast", input="Hello!", stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")


def test_hq_with_an_anthropic_entry_without_key(gw: UvicornServer) -> None:
    answer = httpx.post(
        f"{gw.url}/v1/messages",
        json={
            "model": "omnimind-hq",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    assert answer.status_code == 200 and answer.json()["content"][0]["text"] == "echo: hi"
    assert answer.headers["x-omnimind-fallbacks"] == "claude:unavailable"
