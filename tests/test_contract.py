"""The provider contract, for every adapter: the same promises through a real gateway.

Each adapter in `ADAPTERS` gets a gateway (one per adapter, on its fake upstream) with the
same aliases, and every test here runs against each:

    answer       answers normally (an OpenAI-shaped body; a stream of chunks, usage on ask)
    error-first  fails before its first chunk, then the backup answers (a fallback)
    truncated    a stream cut before its end (an error event, never [DONE])
    long         a stream that goes on for seconds (closing it must stop the upstream)
    f-<fault>    the fault matrix: each fault once per mode, a fallback or an error event

plus `aclose` on the engine's `OwnedStream`, called twice at every point of a stream.
A new provider type adds one `Backend` in `_backend`, its name in `ADAPTERS` and its
faults in `FAULTS`. The fault matrix replaces the ones that were in
test_resilience.py (OpenAI) and test_ollama.py (Ollama).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy.config import load
from proxy.engine import Engine
from proxy.wire import ChatRequest

from . import schemas
from .conftest import GatewayFactory
from .fake_anthropic import FakeAnthropic
from .fake_ollama import FakeOllama
from .fake_openai import FakeOpenAI
from .helpers import (
    NO_BREAKER,
    Config,
    chat,
    entry,
    openai_provider,
    sse_data,
    sse_json,
    start,
    write_config,
)
from .servers import AiohttpServer, UvicornServer, open_fds, refused_port, settle

ADAPTERS = ("openai", "ollama", "huggingface", "anthropic")  # a new provider type: add it here
REQUEST_TIMEOUT = 4
LONG_ANSWER = 4000  # max_tokens of a local generation that runs until it is stopped

# (fault, the reason x-omnimind-fallbacks shows or None for any, outcome, modes)
Fault = tuple[str, str | None, str, tuple[bool, ...]]


@dataclass
class Backend:
    """One adapter under the contract: its provider and what its fake can be asked."""

    name: str  # the provider id
    provider: Config
    answer: str  # model names on the fake, for the aliases of the module doc
    error_first: str
    error_first_reason: str
    long: str
    active: Callable[[], int]  # upstream requests (or local generations) in flight
    truncated: str | None = None  # None: the adapter has no wire to cut
    dead: Config | None = None  # the same provider type at a refused port
    slow_options: Config = field(default_factory=dict)  # provider options for `long`
    long_fields: Config = field(default_factory=dict)  # request fields for `long`
    gw: UvicornServer | None = None
    config: Config = field(default_factory=dict)

    def http(self) -> httpx.Client:
        assert self.gw is not None
        return httpx.Client(base_url=self.gw.url, timeout=30)


BOTH = (False, True)
BODY = (False,)
STREAM = (True,)
OPENAI_FAULTS: list[Fault] = [
    ("refused", "connect_error", "fallback", BOTH),
    ("reset", "connect_error", "fallback", BOTH),
    ("hang", "timeout", "fallback", BOTH),
    ("slow-first-3000", "timeout", "fallback", BOTH),
    ("status-429", "rate_limited", "fallback", BOTH),
    ("status-500", "server_error", "fallback", BOTH),
    ("status-502", "server_error", "fallback", BOTH),
    ("status-503", "server_error", "fallback", BOTH),
    ("bad-json", "bad_response", "fallback", BOTH),
    ("reset-mid", None, "fallback", BODY),  # a cut body
    ("reset-mid", None, "error-event", STREAM),  # committed at the first chunk
    ("no-done", None, "fallback", BODY),
    ("no-done", None, "error-event", STREAM),
    ("error-mid", "server_error", "fallback", BODY),  # a 200 with an error body
    ("error-mid", None, "error-event", STREAM),
]
OLLAMA_FAULTS: list[Fault] = [
    ("refused", "connect_error", "fallback", BOTH),
    ("status-500", "server_error", "fallback", BOTH),
    ("status-503", "server_error", "fallback", BOTH),
    ("bad-json", "bad_response", "fallback", BOTH),
    ("error-first", "server_error", "fallback", STREAM),
    ("error-mid", None, "error-event", STREAM),
    ("truncated", None, "error-event", STREAM),
]
HF_FAULTS: list[Fault] = [
    ("/nonexistent/omnimind-weights", "unavailable", "fallback", BOTH),
]
ANTHROPIC_FAULTS: list[Fault] = [
    ("refused", "connect_error", "fallback", BOTH),
    ("status-429", "rate_limited", "fallback", BOTH),
    ("status-500", "server_error", "fallback", BOTH),
    ("status-529", "server_error", "fallback", BOTH),  # overloaded_error
    ("error-mid", None, "error-event", STREAM),
    ("truncated", None, "error-event", STREAM),
]
FAULTS = {
    "openai": OPENAI_FAULTS,
    "ollama": OLLAMA_FAULTS,
    "huggingface": HF_FAULTS,
    "anthropic": ANTHROPIC_FAULTS,
}
SLOW: set[str] = set()  # adapters whose contract is too slow for the default run


def _adapter(name: str) -> Any:
    return pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else [], id=name)


def _cases() -> list[Any]:
    return [
        pytest.param(
            adapter,
            fault,
            reason,
            outcome,
            stream,
            marks=[pytest.mark.slow] if adapter in SLOW else [],
            id=f"{adapter}-{fault.rsplit('/', 1)[-1]}-{'stream' if stream else 'body'}",
        )  # fmt: skip
        for adapter, faults in FAULTS.items()
        for fault, reason, outcome, modes in faults
        for stream in modes
    ]


@pytest.fixture(scope="module")
def ollama_emulator() -> Iterator[tuple[FakeOllama, str]]:
    fake = FakeOllama()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


@pytest.fixture(scope="module")
def anthropic_fake() -> Iterator[tuple[FakeAnthropic, str]]:
    fake = FakeAnthropic()
    server = AiohttpServer(fake.app())
    yield fake, server.url
    server.close()


def _generating() -> int:
    from proxy.providers.hf_worker import rows_in_flight

    return rows_in_flight()


def _backend(name: str, request: pytest.FixtureRequest) -> Backend:
    limits = {"max_concurrency": 4, "breaker": NO_BREAKER}
    dead_url = f"http://127.0.0.1:{refused_port()}"
    if name == "openai":
        fake: FakeOpenAI = request.getfixturevalue("fake")
        url = request.getfixturevalue("fake_url")
        timeouts = {"timeout": 1, "connect_timeout": 1, "first_token_timeout": 1}
        return Backend(
            name, openai_provider(url, "contract", **limits, **timeouts),
            answer="echo", error_first="error-first", error_first_reason="server_error",
            long="drip-100-50", truncated="no-done", active=lambda: fake.active,
            dead={"type": "openai", "base_url": f"{dead_url}/v1", **limits},
        )  # fmt: skip
    if name == "ollama":
        emulator, url = request.getfixturevalue("ollama_emulator")
        return Backend(
            name, {"type": "ollama", "base_url": url, **limits},
            answer="echo", error_first="error-first", error_first_reason="server_error",
            long="long", truncated="truncated", active=lambda: emulator.active,
            dead={"type": "ollama", "base_url": dead_url, **limits},
            slow_options={"options": {"drip_ms": 300}},
        )  # fmt: skip
    if name == "huggingface":
        tiny = str(request.getfixturevalue("tiny_dir"))
        return Backend(
            name, {"type": "huggingface", "max_new_tokens": 12, **limits},
            answer=tiny, error_first="/nonexistent/omnimind-weights",
            error_first_reason="unavailable", long=tiny, active=_generating,
            long_fields={"max_tokens": LONG_ANSWER},
        )  # fmt: skip
    if name == "anthropic":
        claude, url = request.getfixturevalue("anthropic_fake")
        return Backend(
            name, {"type": "anthropic", "base_url": url, **limits},
            answer="claude-echo", error_first="status-529", error_first_reason="server_error",
            long="slow", truncated="truncated", active=lambda: claude.active,
            dead={"type": "anthropic", "base_url": dead_url, **limits},
        )  # fmt: skip
    raise AssertionError(f"no contract backend for {name}")


def _config(backend: Backend, fake_url: str) -> Config:
    name = backend.name
    backup = entry("backup", "echo")
    providers: Config = {
        name: backend.provider,
        "slow": {**backend.provider, **backend.slow_options},
        "backup": openai_provider(fake_url, "contract-backup", breaker=NO_BREAKER),
    }
    models: Config = {
        "answer": [entry(name, backend.answer)],
        "error-first": [entry(name, backend.error_first), backup],
        "long": [entry("slow", backend.long)],
        "backup": [backup],
    }
    if backend.truncated is not None:
        models["truncated"] = [entry(name, backend.truncated)]
    if backend.dead is not None:
        providers["dead"] = backend.dead
        models["f-refused"] = [entry("dead", backend.answer), backup]
    for fault in {f[0] for f in FAULTS[name]}:
        if fault != "refused":
            models[f"f-{fault}"] = [entry(name, fault), backup]
    return {
        "server": {"request_timeout": REQUEST_TIMEOUT, "audit_log": "off"},
        "providers": providers,
        "models": models,
    }


@pytest.fixture(scope="module")
def backends(
    start_gateway: GatewayFactory, fake_url: str
) -> Callable[[str, pytest.FixtureRequest], Backend]:
    """Each adapter's backend with its gateway, started on first use and kept."""
    made: dict[str, Backend] = {}

    def get(name: str, request: pytest.FixtureRequest) -> Backend:
        if name not in made:
            found = _backend(name, request)
            found.config = _config(found, fake_url)
            found.gw = start(start_gateway, found.config)
            made[name] = found
        return made[name]

    return get


@pytest.fixture(params=[_adapter(a) for a in ADAPTERS])
def backend(
    request: pytest.FixtureRequest, backends: Callable[[str, pytest.FixtureRequest], Backend]
) -> Backend:
    return backends(request.param, request)


@pytest.fixture
def http(backend: Backend) -> Iterator[httpx.Client]:
    with backend.http() as client:
        yield client


def _post(http: httpx.Client, alias: str, stream: bool = False, **fields: Any) -> httpx.Response:
    return http.post("/v1/chat/completions", json=chat(alias, stream, **fields))


def _text(resp: httpx.Response, stream: bool) -> str:
    if stream:
        return "".join(
            c["choices"][0]["delta"].get("content") or "" for c in sse_json(resp) if c["choices"]
        )
    return str(resp.json()["choices"][0]["message"]["content"])


# ---- answers --------------------------------------------------------------------------------


def test_answer_is_openai_shaped(backend: Backend, http: httpx.Client) -> None:
    resp = _post(http, "answer")
    assert resp.status_code == 200 and resp.headers["x-omnimind-provider"] == backend.name
    body = resp.json()
    schemas.completion(body)
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0


def test_stream_is_openai_shaped_with_usage_on_ask(backend: Backend, http: httpx.Client) -> None:
    resp = _post(http, "answer", True, stream_options={"include_usage": True})
    assert resp.headers["content-type"].startswith("text/event-stream")
    chunks = sse_json(resp)
    for chunk in chunks:
        schemas.chunk(chunk)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] is not None
    last = chunks[-1]
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    plain = sse_json(_post(http, "answer", True))
    assert all(c["choices"] and not c.get("usage") for c in plain)  # usage only on ask


@pytest.mark.parametrize("stream", [False, True])
def test_stream_and_body_say_the_same(backend: Backend, http: httpx.Client, stream: bool) -> None:
    if backend.name == "huggingface":  # random weights: compare with greedy decoding
        fields: Config = {"temperature": 0, "max_tokens": 6}
    else:
        fields = {}
    text = _text(_post(http, "answer", stream, **fields), stream)
    assert text == _text(_post(http, "answer", not stream, **fields), not stream)


# ---- failures -------------------------------------------------------------------------------


def test_error_before_the_first_chunk_falls_back(backend: Backend, http: httpx.Client) -> None:
    resp = _post(http, "error-first", True)
    assert resp.headers["x-omnimind-provider"] == "backup"
    assert resp.headers["x-omnimind-fallbacks"] == f"{backend.name}:{backend.error_first_reason}"
    assert _text(resp, True) == "echo: hello there"


def test_truncated_stream_is_an_error(backend: Backend, http: httpx.Client) -> None:
    if backend.truncated is None:
        pytest.skip(f"{backend.name} has no wire a stream could be cut on")
    resp = _post(http, "truncated", True)
    assert resp.headers["x-omnimind-provider"] == backend.name  # committed at the first chunk
    data = sse_data(resp)
    assert "[DONE]" not in data
    error = json.loads(data[-1])
    schemas.error(error)
    for chunk in data[:-1]:
        schemas.chunk(json.loads(chunk))


def test_cancel_closes_the_upstream(backend: Backend, http: httpx.Client) -> None:
    settle(backend.active, 0)
    body = chat("long", True, **backend.long_fields)
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.headers["x-omnimind-provider"] == "slow"
        lines = resp.iter_lines()  # kept: closing the iterator closes the response
        assert next(lines).startswith("data: ")
        assert backend.active() == 1
    gone = time.monotonic()
    assert settle(backend.active, 0, within=3) == 0
    assert time.monotonic() - gone < 2  # the whole answer would take 3 s or more


@pytest.mark.parametrize(("adapter", "fault", "reason", "outcome", "stream"), _cases())
def test_fault_matrix(
    request: pytest.FixtureRequest,
    backends: Callable[[str, pytest.FixtureRequest], Backend],
    adapter: str,
    fault: str,
    reason: str | None,
    outcome: str,
    stream: bool,
) -> None:
    """Every fault ends in the backup's answer or an error event within the deadline, the
    upstream closed, the gateway's tasks and file descriptors back at their baseline."""
    backend = backends(adapter, request)
    assert backend.gw is not None
    with backend.http() as http:
        _post(http, "answer", stream)  # warm the connection pools first
        _post(http, "backup", stream)
        fds, tasks = open_fds(), backend.gw.task_count()
        started = time.monotonic()
        resp = _post(http, f"f-{fault}", stream)
        elapsed = time.monotonic() - started
    assert elapsed < REQUEST_TIMEOUT + 0.5  # the request deadline bounds every fault
    if fault == "refused":
        assert elapsed < 1.5  # refused at once, not after connect_timeout
    if outcome == "fallback":
        assert resp.status_code == 200
        assert resp.headers["x-omnimind-provider"] == "backup"
        failed = "dead" if fault == "refused" else backend.name
        fallbacks = resp.headers["x-omnimind-fallbacks"]
        assert fallbacks == f"{failed}:{reason}" if reason else fallbacks.startswith(f"{failed}:")
        if not stream:
            schemas.completion(resp.json())
        assert _text(resp, stream) == "echo: hello there"
    else:
        data = sse_data(resp)
        assert resp.headers["x-omnimind-provider"] == backend.name
        assert "[DONE]" not in data
        schemas.error(json.loads(data[-1]))
    assert settle(backend.active, 0) == 0  # the upstream saw its connection closed
    assert settle(backend.gw.task_count, tasks) <= tasks
    assert settle(open_fds, fds, slack=2) <= fds + 2


# ---- the engine's OwnedStream ---------------------------------------------------------------


@pytest.mark.parametrize("read", [0, 1, -1])  # chunks read before closing; -1: all of them
async def test_aclose_is_idempotent_and_frees_everything(
    backend: Backend, tmp_path: Path, read: int
) -> None:
    engine = Engine(load(write_config(tmp_path, backend.config)))
    try:
        request = ChatRequest.from_obj(chat("answer", True))
        answer = await engine.stream(request)
        stream = answer.stream
        assert stream is not None and answer.provider == backend.name
        held = engine.pool.held[backend.name]
        assert held.gate.in_use == 1 and engine.active == 1
        if read == -1:
            chunks = [chunk async for chunk in stream]
            assert chunks and stream.outcome == "ok"
        for _ in range(read if read > 0 else 0):
            await anext(stream)
        await stream.aclose()
        await stream.aclose()  # harmless
        assert stream.closed
        assert held.gate.in_use == 0 and held.leases == 0
        assert engine.active == 0  # settled exactly once
        assert [chunk async for chunk in stream] == []
        assert settle(backend.active, 0) == 0
    finally:
        await engine.aclose()
