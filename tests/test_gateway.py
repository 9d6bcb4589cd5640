"""The gateway end to end: official `openai` SDK -> real gateway -> fake upstreams on sockets."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from . import schemas
from .conftest import GatewayFactory
from .fake_openai import FakeOpenAI
from .servers import UvicornServer, refused_port

PRIMARY_KEY = "sk-primary-canary-0a1b2c"
BACKUP_KEY = "sk-backup-canary-3d4e5f"
CLIENT_KEY = "sk-client-canary-6a7b8c"

# behaviour of the first entry -> the reason the gateway reports, per mode
FALLBACKS: list[tuple[str, str, tuple[bool, ...]]] = [
    ("status-500", "server_error", (False, True)),
    ("status-502", "server_error", (False, True)),
    ("status-503", "server_error", (False, True)),
    ("status-504", "server_error", (False, True)),
    ("status-408", "server_error", (False, True)),
    ("status-409", "server_error", (False, True)),
    ("status-429", "rate_limited", (False, True)),
    ("status-401", "upstream_auth", (False, True)),
    ("status-403", "upstream_auth", (False, True)),
    ("status-404", "model_missing", (False, True)),
    ("bad-json", "bad_response", (False, True)),
    ("hang", "timeout", (False, True)),
    ("reset", "connect_error", (False, True)),
    ("slow-3000", "timeout", (False, True)),
    ("slow-first-3000", "timeout", (True,)),
    ("error-first", "server_error", (True,)),
    ("not-sse", "bad_response", (True,)),
    ("empty-stream", "bad_response", (True,)),
]


def _pair(alias: str, first: str) -> str:
    """An alias whose first entry behaves as `first` and whose second echoes."""
    return (
        f"  {alias}:\n    - {{provider: primary, model: {first}}}\n"
        "    - {provider: backup, model: echo}\n"
    )


def _config(fake_url: str) -> str:
    aliases = "".join(_pair(f"fb-{b}", b) for b, _, _ in FALLBACKS)
    return f"""
server:
  max_body_bytes: 1000000
providers:
  primary:
    type: openai
    base_url: {fake_url}/primary/v1
    api_key: {PRIMARY_KEY}
    timeout: 1.5
    connect_timeout: 1
    first_token_timeout: 1
    breaker: {{failures: 1000000, max_cooldown: 0.001}}  # resilience has its own tests
  backup:
    type: openai
    base_url: {fake_url}/backup/v1
    api_key: ${{GW_TEST_BACKUP_KEY}}
    headers: {{X-Title: OmniMind}}
    breaker: {{failures: 1000000, max_cooldown: 0.001}}
  dead:
    type: openai
    base_url: http://127.0.0.1:{refused_port()}/v1
    api_key: sk-dead
  nokey:
    type: openai
    base_url: {fake_url}/nokey/v1
    api_key: ${{GW_TEST_UNSET_KEY}}
models:
  echo:
    - {{provider: primary, model: echo}}
    - {{provider: backup, model: echo}}
  dead-first:
    - {{provider: dead, model: x}}
    - {{provider: backup, model: echo}}
  nokey-first:
    - {{provider: nokey, model: x}}
    - {{provider: backup, model: echo}}
  all-fail:
    - {{provider: primary, model: status-500}}
    - {{provider: backup, model: status-503}}
  all-429:
    - {{provider: primary, model: status-429}}
    - {{provider: backup, model: status-429}}
  last-timeout:
    - {{provider: primary, model: status-500}}
    - {{provider: backup, model: hang, timeout: 0.5, first_token_timeout: 0.5}}
  tools:
    - {{provider: primary, model: tools}}
  mid:
    - {{provider: primary, model: placeholder}}
{aliases}
""" + "".join(
        _pair(b, b)
        for b in (
            "status-400",
            "status-413",
            "status-422",
            "error-mid",
            "reset-mid",
            "no-done",
            "keepalive",
            "ragged",
            "drip-5-20",
        )
    )


@pytest.fixture(scope="module")
def gw(start_gateway: GatewayFactory, fake_url: str) -> Iterator[UvicornServer]:
    os.environ["GW_TEST_BACKUP_KEY"] = BACKUP_KEY
    os.environ.pop("GW_TEST_UNSET_KEY", None)
    yield start_gateway(_config(fake_url))


@pytest.fixture
def client(gw: UvicornServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def http(gw: UvicornServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=30) as c:
        yield c


MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def _sse_events(text: str) -> list[str]:
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


# ---- happy path, both SDK flavours -------------------------------------------------------


def test_non_stream_answer_and_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: hello there"
    assert raw.headers["x-omnimind-provider"] == "primary"
    assert raw.headers["x-omnimind-model"] == "echo"
    assert raw.headers["x-omnimind-attempts"] == "1"
    assert int(raw.headers["x-omnimind-latency-ms"]) >= 0
    assert "x-omnimind-fallbacks" not in raw.headers
    assert len(raw.headers["x-request-id"]) >= 16


def test_stream_answer_and_headers(client: openai.OpenAI) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="echo", messages=MESSAGES, stream=True
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-omnimind-provider"] == "primary"
        assert resp.headers["x-omnimind-attempts"] == "1"
        assert int(resp.headers["x-omnimind-latency-ms"]) >= 0
        text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    assert text == "echo: hello there"


async def test_async_sdk_stream_and_not(gw: UvicornServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY) as aclient:
        answer = await aclient.chat.completions.create(model="echo", messages=MESSAGES)
        assert answer.choices[0].message.content == "echo: hello there"
        stream = await aclient.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == "echo: hello there"


def test_wire_format_matches_openai_spec(http: httpx.Client) -> None:
    body = {"model": "echo", "messages": MESSAGES}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200
    schemas.completion(resp.json())
    resp = http.post(
        "/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    events = _sse_events(resp.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    for c in chunks:
        schemas.chunk(c)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


def test_requests_leave_no_cyclic_garbage(client: openai.OpenAI) -> None:
    """Answered, streamed and failed requests free what they made by reference counting:
    a cycle left per request (a disconnect watcher and its task, a stream and its chain
    walk) made the collector run every few hundred requests (bench/: ~40 us a request)."""
    ours = ("proxy.",)  # the gateway's objects (the fake upstream's are not)

    def leftovers() -> list[str]:
        gc.collect()
        names = [f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage]
        gc.garbage.clear()
        return [n for n in names if n.startswith(ours)]

    def requests() -> None:
        client.chat.completions.create(model="echo", messages=MESSAGES)
        for _ in client.chat.completions.create(model="echo", messages=MESSAGES, stream=True):
            pass
        with pytest.raises(openai.InternalServerError):  # two failed attempts, then a 502
            client.chat.completions.create(model="all-fail", messages=MESSAGES)

    requests()  # warm: first-use caches, pools
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        leftovers()
        for _ in range(5):
            requests()
        time.sleep(0.2)  # the server thread settles the last stream
        found = leftovers()
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not found, sorted(set(found))


def test_keepalive_comments_are_tolerated(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="keepalive", messages=MESSAGES, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "echo: hello there"


def test_unusual_sse_framing_is_relayed_intact(client: openai.OpenAI) -> None:
    """CRLF and lone-CR line ends, multi-line data, extra fields, reads split anywhere."""
    stream = client.chat.completions.create(
        model="ragged", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    for c in chunks:
        schemas.chunk(c.model_dump(exclude_unset=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "echo: hello there"
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0


def test_stream_relays_chunk_by_chunk(http: httpx.Client) -> None:
    body = {"model": "drip-5-20", "messages": MESSAGES, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert [json.loads(e[6:])["choices"][0]["delta"]["content"] for e in events[:-1]] == [
        "0 ",
        "1 ",
        "2 ",
        "3 ",
        "4 ",
    ]


# ---- fallback ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "reason", "stream"),
    [(b, r, s) for b, r, modes in FALLBACKS for s in modes],
)
def test_falls_back(
    client: openai.OpenAI, fake: FakeOpenAI, behaviour: str, reason: str, stream: bool
) -> None:
    before = len(fake.calls("backup"))
    if stream:
        with client.chat.completions.with_streaming_response.create(
            model=f"fb-{behaviour}", messages=MESSAGES, stream=True
        ) as resp:
            headers = resp.headers
            text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=f"fb-{behaviour}", messages=MESSAGES
        )
        headers, text = raw.headers, raw.parse().choices[0].message.content
    assert text == "echo: hello there"
    assert headers["x-omnimind-provider"] == "backup"
    assert headers["x-omnimind-attempts"] == "2"
    assert headers["x-omnimind-fallbacks"] == f"primary:{reason}"
    assert len(fake.calls("backup")) == before + 1


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("alias", "reason"), [("dead-first", "connect_error"), ("nokey-first", "unavailable")]
)
def test_dead_or_keyless_provider_is_passed(
    client: openai.OpenAI, fake: FakeOpenAI, alias: str, reason: str, stream: bool
) -> None:
    before = len(fake.calls("nokey"))
    raw = client.chat.completions.with_raw_response.create(
        model=alias, messages=MESSAGES, stream=stream
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-fallbacks"] == f"{alias.split('-')[0]}:{reason}"
    assert len(fake.calls("nokey")) == before  # a keyless provider is never called


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("status", [400, 413, 422])
def test_client_errors_are_returned_not_retried(
    http: httpx.Client, fake: FakeOpenAI, status: int, stream: bool
) -> None:
    before = len(fake.calls("backup"))
    resp = http.post(
        "/v1/chat/completions",
        json={"model": f"status-{status}", "messages": MESSAGES, "stream": stream},
    )
    assert resp.status_code == status
    schemas.error(resp.json())
    assert resp.json()["error"]["message"] == f"fake upstream says {status}"
    assert resp.json()["error"]["code"] == f"fake_{status}"
    assert len(fake.calls("backup")) == before


def test_client_error_through_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="status-400", messages=MESSAGES)
    assert err.value.status_code == 400


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("alias", "status", "code"),
    [
        ("all-fail", 502, "all_providers_failed"),
        ("all-429", 429, "rate_limit_exceeded"),
        ("last-timeout", 504, "upstream_timeout"),
    ],
)
def test_all_fail(http: httpx.Client, alias: str, status: int, code: str, stream: bool) -> None:
    resp = http.post(
        "/v1/chat/completions", json={"model": alias, "messages": MESSAGES, "stream": stream}
    )
    assert resp.status_code == status
    body = resp.json()
    schemas.error(body)
    assert body["error"]["code"] == code
    message = body["error"]["message"]
    assert message.index("primary") < message.index("backup")  # every attempt, in order
    assert resp.headers["x-omnimind-attempts"] == "2"
    if status == 429:
        assert resp.headers["retry-after"] == "7"
    assert PRIMARY_KEY not in resp.text and BACKUP_KEY not in resp.text


def test_prefer_provider_header(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, extra_headers={"x-omnimind-prefer-provider": "backup"}
    )
    assert raw.headers["x-omnimind-provider"] == "backup"
    assert raw.headers["x-omnimind-attempts"] == "1"


# ---- mid-stream failures -----------------------------------------------------------------


@pytest.mark.parametrize("alias", ["error-mid", "reset-mid", "no-done"])
def test_mid_stream_failure_ends_with_an_error_event(http: httpx.Client, alias: str) -> None:
    resp = http.post(
        "/v1/chat/completions", json={"model": alias, "messages": MESSAGES, "stream": True}
    )
    assert resp.headers["x-omnimind-provider"] == "primary"  # committed after the first chunk
    events = _sse_events(resp.text)
    assert "[DONE]" not in events  # never looks like a complete answer
    last = json.loads(events[-1])
    schemas.error(last)
    for event in events[:-1]:
        schemas.chunk(json.loads(event))


def test_mid_stream_failure_raises_in_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="error-mid", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


# ---- what goes upstream ------------------------------------------------------------------


def test_body_forwarded_untouched_but_model(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    extra = {
        "top_k": 5,
        "user": "u-1",
        "seed": 7,
        "logprobs": False,
        "n": 1,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    client.chat.completions.create(
        model="echo", messages=MESSAGES, temperature=0.25, extra_body=extra
    )
    sent = fake.calls("primary")[-1].body
    assert sent["model"] == "echo"
    assert sent["messages"] == MESSAGES and sent["temperature"] == 0.25
    for key, value in extra.items():
        assert sent[key] == value


def test_keys_are_isolated(client: openai.OpenAI, fake: FakeOpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fb-status-500",
        messages=MESSAGES,
        extra_headers={
            "X-Secret-Client-Header": "nope",
            "Proxy-Authorization": "Basic x",
            "x-request-id": "req-123",
        },
    )
    primary, backup = fake.calls("primary")[-1], fake.calls("backup")[-1]
    assert primary.headers["authorization"] == f"Bearer {PRIMARY_KEY}"
    assert backup.headers["authorization"] == f"Bearer {BACKUP_KEY}"
    assert backup.headers["x-title"] == "OmniMind"
    for seen in (primary, backup):
        flat = json.dumps(seen.headers)
        assert CLIENT_KEY not in flat and "x-secret-client-header" not in flat
        assert "proxy-authorization" not in seen.headers
        assert str(uuid.UUID(seen.headers["x-request-id"])) == seen.headers["x-request-id"]
    assert raw.headers["x-request-id"] == "req-123"
    assert PRIMARY_KEY not in str(raw.headers) and BACKUP_KEY not in raw.text


def test_tool_calls_pass_through(client: openai.OpenAI) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    answer = client.chat.completions.create(model="tools", messages=MESSAGES, tools=tools)
    call = answer.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {
        "city": "Paris"
    }
    stream = client.chat.completions.create(
        model="tools", messages=MESSAGES, tools=tools, stream=True
    )
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].tool_calls[0].function.name == "weather"  # type: ignore[index,union-attr]


async def test_64_concurrent_streams(gw: UvicornServer) -> None:
    async with openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=CLIENT_KEY) as aclient:

        async def one(i: int) -> str:
            stream = await aclient.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": f"n{i}"}], stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        texts = await asyncio.gather(*(one(i) for i in range(64)))
    assert texts == [f"echo: n{i}" for i in range(64)]


# ---- the gateway's own errors ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "model"),
        (b'{"model": "echo"}', 400, "messages"),
        (b'{"model": 5, "messages": []}', 400, "model"),
        (b'{"model": "echo", "messages": "hi"}', 400, "messages"),
        (b'{"model": "echo", "messages": [], "stream": "yes"}', 400, "stream"),
        (b'{"model": "nope", "messages": []}', 404, "model"),
    ],
)
def test_bad_requests(http: httpx.Client, body: bytes, status: int, param: str | None) -> None:
    resp = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == status
    schemas.error(resp.json())
    assert resp.json()["error"]["param"] == param
    if status == 404:
        assert resp.json()["error"]["code"] == "model_not_found"


def test_unknown_model_in_sdk(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)


def test_body_too_large(http: httpx.Client) -> None:
    big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 1_200_000}]}
    resp = http.post("/v1/chat/completions", json=big)
    assert resp.status_code == 413
    schemas.error(resp.json())


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/nothing", 404),
        ("GET", "/v1/chat/completions", 405),
        ("GET", "/v1/models/nope", 404),
    ],
)
def test_routing_errors_are_openai_shaped(
    http: httpx.Client, method: str, path: str, status: int
) -> None:
    resp = http.request(method, path)
    assert resp.status_code == status
    schemas.error(resp.json())


def test_models_and_health(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["echo", "dead-first"] and "fb-hang" in ids
    assert client.models.retrieve("echo").id == "echo"
    assert http.get("/health").status_code == 200


def test_fake_upstream_is_honest(fake_url: str) -> None:
    """The official SDK, pointed straight at the fake, gets what it expects from OpenAI."""
    with openai.OpenAI(base_url=f"{fake_url}/direct/v1", api_key="k") as direct:
        answer = direct.chat.completions.create(model="echo", messages=MESSAGES)
        assert answer.choices[0].message.content == "echo: hello there"
        stream = direct.chat.completions.create(
            model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            "echo: hello there"
        )
        assert chunks[-1].usage is not None
        ragged = direct.chat.completions.create(model="ragged", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in ragged) == "echo: hello there"
        with pytest.raises(openai.RateLimitError):
            direct.chat.completions.create(model="status-429", messages=MESSAGES)
