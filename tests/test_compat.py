"""Clients as users run them, each against the running gateway (uvicorn on loopback):
the openai Python SDK (sync and async), LangChain's ChatOpenAI, curl and the OpenAI Node SDK.
"""

from __future__ import annotations

import functools
import json
import operator
import os
import shutil
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from .conftest import GatewayFactory
from .fake_openai import FakeOpenAI
from .servers import UvicornServer

CLIENT_KEY = "sk-compat-client"
HELLO: list[Any] = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
NPM_INSTALL_TIMEOUT = 240


class City(BaseModel):
    city: str
    country: str


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str) -> UvicornServer:
    return start_gateway(f"""
        server: {{audit_log: off}}
        providers:
          upstream: {{type: openai, base_url: "{fake_url}/compat/v1", api_key: sk-upstream}}
        models:
          omnimind-fast: [{{provider: upstream, model: echo}}]
          omnimind-tools: [{{provider: upstream, model: tools}}]
          omnimind-json: [{{provider: upstream, model: json}}]
        """)


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


# ---- openai Python SDK -------------------------------------------------------------------


def test_openai_sync(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="omnimind-fast", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.usage is not None and answer.usage.total_tokens > 0
    stream = client.chat.completions.create(
        model="omnimind-fast",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: hello there"
    )
    assert chunks[-1].usage is not None


async def test_openai_async(gw: UvicornServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY) as aclient:
        answer = await aclient.chat.completions.create(model="omnimind-fast", messages=HELLO)
        assert answer.choices[0].message.content == "echo: hello there"
        stream = await aclient.chat.completions.create(
            model="omnimind-fast",
            messages=HELLO,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "echo: hello there"


def test_openai_tool_calls(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="omnimind-tools",
        messages=HELLO,
        tools=[WEATHER_TOOL],
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]
    stream = client.chat.completions.create(
        model="omnimind-tools",
        messages=HELLO,
        tools=[WEATHER_TOOL],
        stream=True,
    )
    calls = [tc for c in stream if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert calls[0].function.name == "weather"  # type: ignore[union-attr]


def test_openai_json_response_format(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    expected = {"city": "Paris", "country": "France"}
    answer = client.chat.completions.create(
        model="omnimind-json",
        messages=HELLO,
        response_format={"type": "json_object"},
    )
    assert json.loads(answer.choices[0].message.content or "") == expected
    assert fake.calls("compat")[-1].body["response_format"] == {"type": "json_object"}
    stream = client.chat.completions.create(
        model="omnimind-json",
        messages=HELLO,
        response_format={"type": "json_object"},
        stream=True,
    )
    assert json.loads("".join(c.choices[0].delta.content or "" for c in stream)) == expected


def test_openai_structured_output_parse(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    answer = client.chat.completions.parse(
        model="omnimind-json",
        messages=HELLO,
        response_format=City,
    )
    assert answer.choices[0].message.parsed == City(city="Paris", country="France")
    sent = fake.calls("compat")[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["name"] == "City"


# ---- LangChain ---------------------------------------------------------------------------


@pytest.fixture
def chat(gw: UvicornServer) -> Iterator[Callable[..., Any]]:
    """`ChatOpenAI(base_url=<gateway>, api_key=..., model=<alias>)`, with our own HTTP client.

    Left to itself langchain-openai keeps process-wide httpx clients per base_url (an
    lru_cache); an async one's pooled connections would outlive the test's event loop, so
    async tests pass `http_async_client` of their own.
    """
    from langchain_openai import ChatOpenAI

    with httpx.Client() as http:

        def make(model: str, **kwargs: Any) -> Any:
            return ChatOpenAI(
                base_url=f"{gw.url}/v1",
                api_key=CLIENT_KEY,  # type: ignore[arg-type]
                model=model,
                max_retries=0,
                http_client=http,
                **kwargs,
            )

        yield make


def test_langchain_invoke_and_stream(chat: Callable[..., Any]) -> None:
    llm = chat("omnimind-fast")
    assert llm.invoke("hello there").content == "echo: hello there"
    assert "".join(str(c.content) for c in llm.stream("hello there")) == "echo: hello there"


async def test_langchain_async(chat: Callable[..., Any]) -> None:
    async with httpx.AsyncClient() as http:
        llm = chat("omnimind-fast", http_async_client=http)
        assert (await llm.ainvoke("hello there")).content == "echo: hello there"
        parts = [str(c.content) async for c in llm.astream("hello there")]
    assert "".join(parts) == "echo: hello there"


def test_langchain_bind_tools(chat: Callable[..., Any], fake: FakeOpenAI) -> None:
    from langchain_core.tools import tool

    @tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return "sunny"

    llm = chat("omnimind-tools").bind_tools([weather])
    message = llm.invoke("Weather in Paris?")
    assert message.tool_calls == [
        {"name": "weather", "args": {"city": "Paris"}, "id": "call_1", "type": "tool_call"}
    ]
    assert fake.calls("compat")[-1].body["tools"][0]["function"]["name"] == "weather"
    streamed = functools.reduce(operator.add, llm.stream("Weather in Paris?"))
    assert streamed.tool_calls == message.tool_calls


@pytest.mark.parametrize(
    ("method", "sent_type"),
    [(None, "json_schema"), ("json_mode", "json_object")],
    ids=["default", "json_mode"],
)
def test_langchain_structured_output(
    chat: Callable[..., Any], fake: FakeOpenAI, method: str | None, sent_type: str
) -> None:
    # langchain-openai 1.x: ChatOpenAI.with_structured_output defaults to method="json_schema",
    # i.e. response_format {"type": "json_schema", ...} parsed by the openai SDK (not tools).
    llm = chat("omnimind-json")
    kwargs = {} if method is None else {"method": method}
    structured = llm.with_structured_output(City, **kwargs)
    assert structured.invoke("Where is the Eiffel Tower?") == City(city="Paris", country="France")
    assert fake.calls("compat")[-1].body["response_format"]["type"] == sent_type


# ---- curl --------------------------------------------------------------------------------


def _curl(gw: UvicornServer, body: dict[str, Any]) -> str:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        [
            "curl", "-sS", "-N", "--fail-with-body", "--max-time", "30",
            f"{gw.url}/v1/chat/completions",
            "-H", "Content-Type: application/json",
            "-H", f"Authorization: Bearer {CLIENT_KEY}",
            "-d", json.dumps(body),
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_curl(gw: UvicornServer) -> None:
    answer = json.loads(_curl(gw, {"model": "omnimind-fast", "messages": HELLO}))
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "echo: hello there"
    events = [
        line[6:]
        for line in _curl(
            gw, {"model": "omnimind-fast", "messages": HELLO, "stream": True}
        ).splitlines()
        if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
        "echo: hello there"
    )


# ---- the OpenAI Node SDK -----------------------------------------------------------------

NODE_SCRIPT = """
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.GATEWAY_URL, apiKey: "sk-compat-client",
                            maxRetries: 0 });
const messages = [{ role: "user", content: "hello there" }];
const answer = await client.chat.completions.create({ model: "omnimind-fast", messages });
const stream = await client.chat.completions.create({ model: "omnimind-fast", messages,
                                                      stream: true });
let streamed = "";
for await (const chunk of stream) streamed += chunk.choices[0]?.delta?.content ?? "";
console.log(JSON.stringify({ content: answer.choices[0].message.content, streamed }));
"""


@pytest.fixture(scope="session")
def node_openai(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the `openai` npm package installed (once per session), or a skip."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the OpenAI Node SDK test")
    folder = tmp_path_factory.mktemp("node-openai")
    (folder / "package.json").write_text('{"private": true, "type": "module"}\n')
    try:
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--no-package-lock", "openai"],
            cwd=folder, capture_output=True, text=True, timeout=NPM_INSTALL_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install openai took over {NPM_INSTALL_TIMEOUT} s (registry unreachable?)")
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        pytest.skip("npm install openai failed (registry unreachable?): " + " / ".join(tail))
    return folder


def test_openai_node_sdk(gw: UvicornServer, node_openai: Path) -> None:
    script = node_openai / "check.mjs"
    script.write_text(textwrap.dedent(NODE_SCRIPT))
    done = subprocess.run(
        ["node", str(script)],
        cwd=node_openai,
        env={**os.environ, "GATEWAY_URL": f"{gw.url}/v1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "content": "echo: hello there",
        "streamed": "echo: hello there",
    }
